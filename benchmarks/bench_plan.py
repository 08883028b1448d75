"""Planning time and peak memory of ``fastclip embed``'s plan for a long list of image paths:
this checkout's streamed plan against the plan of an earlier revision, which listed every
input in memory.

    python benchmarks/bench_plan.py --lines 2000000 --baseline 9516257 \
        --output benchmarks/results/plan_cpu

Each plan is made in a fresh process, alone; its peak resident memory is the process's
``ru_maxrss`` less what the same process held after importing fastclip. The list's paths
are not read (planning lists inputs, it does not open them). It writes ``<output>.json`` and
``<output>.md`` with the machine described.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from machine import report, small_machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLAN = r"""
import json, resource, sys, time
import fastclip.embed.plan as plan
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
made = plan.plan_job(images=[sys.argv[1]], shard_size=int(sys.argv[2]))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": (peak - before) / 1024,
                  "chunks": len(made.chunks), "fingerprint": made.fingerprint,
                  "module": plan.__file__}))
"""


def write_list(path, lines):
    with open(path, "w") as f:
        for i in range(lines):
            f.write(f"images/{i // 10000:05d}/{i:09d}.jpg\n")


def plan_in_process(code_root, list_path, shard_size):
    environment = dict(os.environ, PYTHONPATH=code_root)
    result = subprocess.run([sys.executable, "-c", PLAN, list_path, str(shard_size)],
                            capture_output=True, text=True, env=environment, check=True,
                            cwd=tempfile.gettempdir())
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline_tree(revision, folder):
    """The ``fastclip`` package of ``revision``, unpacked into ``folder``."""
    archive = subprocess.run(["git", "-C", REPO, "archive", revision, "fastclip"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--baseline", default="9516257",
                        help="the revision whose plan is the baseline (default: the last one "
                             "that listed every input in memory)")
    parser.add_argument("--output", default=None, help="write <output>.json and <output>.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fastclip_plan_") as folder:
        list_path = os.path.join(folder, "list.txt")
        write_list(list_path, args.lines)
        old = os.path.join(folder, "baseline")
        os.makedirs(old)
        runs = {"baseline": plan_in_process(baseline_tree(args.baseline, old), list_path,
                                            args.shard_size),
                "streamed": plan_in_process(REPO, list_path, args.shard_size)}
    if runs["baseline"]["fingerprint"] != runs["streamed"]["fingerprint"]:
        raise SystemExit("The two plans differ: their fingerprints are not equal.")
    result = {"machine": small_machine(),
              "lines": args.lines, "shard_size": args.shard_size, "baseline": args.baseline,
              "runs": runs,
              # Peaks under 1 MiB are not told apart from the process's own noise.
              "memory_ratio": runs["baseline"]["peak_mib"] / max(runs["streamed"]["peak_mib"],
                                                                 1.0),
              "time_ratio": runs["streamed"]["seconds"] / runs["baseline"]["seconds"]}
    report(result, markdown, args.output)


def markdown(result):
    m = result["machine"]
    names = {"baseline": f"in memory (revision {result['baseline']})",
             "streamed": "streamed (this checkout)"}
    rows = "\n".join(f"| {names[name]} | {run['seconds']:.1f} | {run['peak_mib']:.0f} |"
                     for name, run in result["runs"].items())
    return (f"# Planning a list of {result['lines']:,} image paths\n\n"
            f"{m['cpu_model']}, {m['cpu_cores']} cores, Python {m['python']}; shard size "
            f"{result['shard_size']:,}; each plan in a fresh process. Both plans have the "
            "same fingerprint.\n\n"
            "| plan | seconds | peak memory (MiB) |\n| --- | ---: | ---: |\n"
            f"{rows}\n\nThe streamed plan holds {result['memory_ratio']:.0f}x less memory and "
            f"takes {result['time_ratio']:.2f}x the baseline's time.\n")


if __name__ == "__main__":
    main()
