"""The benchmarks' sizes option, and the description of the machine stored with every result."""

import os
import platform

import pytest
import torch

SIZES = ("cpu", "gpu", "tiny")


def bench_sizes(config):
    """``--bench-sizes``, else ``FASTCLIP_BENCH_SIZES``, else ``cpu``."""
    sizes = config.getoption("--bench-sizes") or os.environ.get("FASTCLIP_BENCH_SIZES") or "cpu"
    if sizes not in SIZES:
        raise pytest.UsageError(
            f"FASTCLIP_BENCH_SIZES={sizes!r}; choose one of {', '.join(SIZES)}.")
    return sizes


def cpu_model():
    """The CPU's model name as /proc/cpuinfo gives it (platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """The CPU features that decide the speed of bf16 on the CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    return sorted(set(flags) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def package_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # not installed, or installed without metadata
        return None


def small_machine():
    """The machine as the stand-alone scripts (bench_plan, bench_storage) record it."""
    import sys
    return {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
            "python": sys.version.split()[0]}


def report(result, markdown, output=None):
    """Print ``markdown(result)``; with ``output``, write ``<output>.json`` and ``.md``."""
    import json
    text = markdown(result)
    print(text)
    if output:
        with open(output + ".json", "w") as f:
            json.dump(result, f, indent=2)
        with open(output + ".md", "w") as f:
            f.write(text)


def machine_description(sizes):
    """The machine and software a result was measured on."""
    cuda = torch.cuda.is_available()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "open_clip": package_version("open_clip_torch"),
        "transformers": package_version("transformers"),
        "fastclip": package_version("fastclip"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "bench_sizes": sizes,
    }




def main(argv=None):
    """Print the GPU suite's summary.json: the machine, and its steps' exit statuses (from
    the tab-separated file ``--steps``). Exits 1 when a step that ran failed."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--steps", help="lines of: name, exit status or 'skipped', seconds")
    parser.add_argument("--sizes", default="cpu", choices=SIZES)
    args = parser.parse_args(argv)
    steps = []
    if args.steps:
        with open(args.steps) as f:
            for line in f:
                name, status, seconds = line.rstrip("\n").split("\t")
                steps.append({"name": name, "status": status, "seconds": int(seconds)})
    print(json.dumps({"machine": machine_description(args.sizes), "steps": steps}, indent=2))
    return 0 if all(step["status"] in ("0", "skipped") for step in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
