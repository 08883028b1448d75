"""Attention pooling: the single-query algebra against OpenAI's formulation, at the RN50 and
RN50x64 pooling shapes.

On the CPU, with pytest-benchmark (each case is a group; compare the rows of a group):

    pytest benchmarks/bench_attnpool.py --benchmark-json=benchmarks/results/attnpool_cpu.json

``FASTCLIP_BENCH_THREADS=1`` times on one thread: on a shared machine that is the steadier
measure (no thread waits at a barrier for a core another process holds).

On a CUDA device, with CUDA events (the median of many calls, after warm-up):

    python benchmarks/bench_attnpool.py --gpu --json attnpool_gpu.json

Implementations: ``openai`` is ``fastclip.ops.reference.attention_pool2d`` (K and V for every
token), ``algebra`` the PyTorch fallback ``attention_pool2d_single_query``, ``op`` the compiled
``torch.ops.fastclip.attention_pool2d`` (skipped where ``fastclip._C`` is not built).
"""

import argparse
import functools
import json
import os
import platform
import statistics

import pytest
import torch

from fastclip.model import CONFIGS
from fastclip.ops import attention_pool, extension, reference


def pool_shape(name):
    """(C, H = W, heads, output_dim) of a ResNet's AttentionPool2d, from its configuration."""
    config = CONFIGS[name]
    width = config["vision_width"] * 32
    return width, config["image_resolution"] // 32, width // 64, config["embed_dim"]


def random_inputs(name, batch, dtype=torch.float32, device="cpu"):
    width, side, heads, output_dim = pool_shape(name)
    generator = torch.Generator().manual_seed(0)

    def normal(*shape, std):
        return (torch.randn(*shape, generator=generator) * std).to(device, dtype)

    x = torch.randn(batch, width, side, side, generator=generator).relu().to(device, dtype)
    projections = [normal(width, width, std=width ** -0.5), normal(width, std=0.1)] * 3
    return (x, normal(side * side + 1, width, std=width ** -0.5), *projections,
            normal(output_dim, width, std=width ** -0.5), normal(output_dim, std=0.1), heads)


def implementations():
    found = {"openai": reference.attention_pool2d,
             "algebra": attention_pool.attention_pool2d_single_query}
    if extension.LOADED:
        found["op"] = torch.ops.fastclip.attention_pool2d
    return found


# Cases: (architecture, batch). Batch 1 is latency; 32 and 8 are throughput batches that
# keep OpenAI's formulation at RN50x64 (about 0.3 TFLOP per call at batch 8) within reach here.
CPU_CASES = {"RN50-b1": ("RN50", 1), "RN50-b32": ("RN50", 32),
             "RN50x64-b1": ("RN50x64", 1), "RN50x64-b8": ("RN50x64", 8)}


if os.environ.get("FASTCLIP_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTCLIP_BENCH_THREADS"]))


@functools.lru_cache(maxsize=1)
def cached_inputs(case):
    return random_inputs(*CPU_CASES[case])


@pytest.mark.parametrize("implementation", ["openai", "algebra", "op"])
@pytest.mark.parametrize("case", CPU_CASES)
def test_attention_pool2d_cpu(benchmark, case, implementation):
    function = implementations().get(implementation)
    if function is None:
        pytest.skip(f"the compiled op is not available ({extension.ERROR})")
    args = cached_inputs(case)
    benchmark.group = case
    # The machine is shared: the load average says how much the timings were disturbed.
    benchmark.extra_info.update(
        torch=torch.__version__, threads=torch.get_num_threads(), dtype="float32",
        load_average_before=os.getloadavg()[0], extension=attention_pool.extension_info())
    with torch.inference_mode():
        benchmark.pedantic(function, args=args, rounds=5, warmup_rounds=1, iterations=1)


def cuda_milliseconds(function, args, repeats):
    """Median milliseconds per call, by CUDA events, after warm-up."""
    for _ in range(3):
        function(*args)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_timings(names=("RN50", "RN50x64"), batches=(1, 32, 256),
                dtypes=(torch.float16, torch.bfloat16, torch.float32), repeats=30):
    """Rows of {architecture, batch, dtype, implementation, ms} on the current CUDA device."""
    rows = []
    with torch.inference_mode():
        for name in names:
            for batch in batches:
                for dtype in dtypes:
                    args = random_inputs(name, batch, dtype, "cuda")
                    for implementation, function in implementations().items():
                        ms = cuda_milliseconds(function, args, repeats)
                        rows.append(dict(architecture=name, batch=batch,
                                         dtype=str(dtype).removeprefix("torch."),
                                         implementation=implementation, ms=round(ms, 4)))
                        print(rows[-1], flush=True)
                    del args
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="time on the current CUDA device")
    parser.add_argument("--json", help="write the timings and the machine here")
    options = parser.parse_args()
    if not options.gpu:
        parser.error("CPU timings run under pytest (see the module docstring); pass --gpu")
    if not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    result = {
        "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "python": platform.python_version()},
        "extension": attention_pool.extension_info(),
        "timings": gpu_timings(),
    }
    if options.json:
        with open(options.json, "w") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
