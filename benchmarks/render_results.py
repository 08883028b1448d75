"""Render pytest-benchmark JSON written by ``bench_models.py``, ``bench_tokenizer.py`` and
``bench_cpu_ops.py`` into a markdown table and a PNG plot, for the README's performance
section.

    python benchmarks/render_results.py benchmarks/results/models_cpu.json \\
        benchmarks/results/tokenizer_cpu.json --output benchmarks/results/performance_cpu

writes ``<output>.md`` and ``<output>.png``. Only benchmarks whose ``extra_info`` holds
``items_per_second`` (the interleaved comparisons) are rendered.
"""

import argparse
import json
import os


def load_comparisons(paths):
    """(machine description, comparisons) from pytest-benchmark JSON files; a comparison is
    one case's extra_info, with its file's name."""
    machine, comparisons = None, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {}).get("fastclip_bench")
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "items_per_second" in info:
                comparisons.append(dict(info, source=os.path.basename(path)))
    return machine, comparisons


def case_name(info):
    if info.get("task") == "cpu-op":
        return (f"{info['op']} ({info['tower']} shape, batch {info['batch']}), "
                f"{info['dtype']}, tokens/s")
    if info.get("task") == "tokenize":
        return f"tokenize, {info['captions']:,} captions of unseen words"
    return f"{info['model']} {info['task']}, batch {info['batch']}, {info['dtype']}"


def machine_line(machine):
    if not machine:
        return "Machine: not recorded."
    device = machine.get("gpu") or f"{machine['cpu_model']}, {machine['cpu_cores']} cores"
    load = machine.get("load_average")
    load = f", load average {load[0]:.1f} during the run" if load else ""
    return (f"Machine: {device} ({', '.join(machine.get('cpu_flags') or []) or 'no flags'}); "
            f"torch {machine['torch']}, triton {machine['triton']}, CUDA {machine['cuda']}, "
            f"open_clip {machine['open_clip']}, transformers {machine['transformers']}{load}.")


def markdown(machine, comparisons):
    lines = [
        machine_line(machine), "",
        "Every ratio is measured in one run: each round calls every contender once, in a "
        "rotating order, and the ratio is of the median times (above 1: faster than the "
        "baseline).", "",
        "| case | contender | items/s | vs baseline | baseline |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for info in comparisons:
        speedups = info.get("speedup_vs_baseline", {})
        for contender, rate in info["items_per_second"].items():
            ratio = speedups.get(contender)
            lines.append(f"| {case_name(info)} | {contender} | {rate:,.1f} | "
                         f"{f'{ratio:.2f}x' if ratio else '-'} | {info['baseline']} |")
    return "\n".join(lines) + "\n"


def plot(comparisons, path):
    """One horizontal bar per (case, contender): its speed as a ratio to the case's baseline."""
    import matplotlib
    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels, ratios, colors = [], [], []
    for info in comparisons:
        for contender, ratio in info.get("speedup_vs_baseline", {}).items():
            labels.append(f"{case_name(info)}: {contender}")
            ratios.append(ratio)
            colors.append("tab:orange" if contender.startswith("fastclip") else "tab:gray")
    figure, axes = plt.subplots(figsize=(10, 0.28 * len(labels) + 1.2))
    positions = range(len(labels))[::-1]
    axes.barh(list(positions), ratios, color=colors)
    axes.set_yticks(list(positions), labels, fontsize=7)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("speed relative to the baseline (log scale; above 1 is faster)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--output", required=True,
                        help="path without extension: writes <output>.md and <output>.png")
    parser.add_argument("--no-plot", action="store_true", help="write the markdown table only")
    parser.add_argument("--task", action="append",
                        help="render only comparisons of this task (image, text, tokenize, "
                             "cpu-op); repeat for several; default: all")
    args = parser.parse_args(argv)
    machine, comparisons = load_comparisons(args.json)
    if args.task:
        comparisons = [info for info in comparisons if info.get("task") in args.task]
    if not comparisons:
        raise SystemExit(f"No comparisons (extra_info.items_per_second) in {args.json}.")
    with open(f"{args.output}.md", "w") as f:
        f.write(markdown(machine, comparisons))
    if not args.no_plot:
        plot(comparisons, f"{args.output}.png")
    print(f"wrote {args.output}.md" + ("" if args.no_plot else f" and {args.output}.png"))


if __name__ == "__main__":
    main()
