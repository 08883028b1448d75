"""``torch.compile`` of a model on the torch backend against the same model in eager mode, on
the CPU: ``encode_image`` of ViT-B/32 at batch 8 (random weights), fp32. Compiled graphs
call the packed oneDNN products, LayerNorm, attention and the patch embedding as ops of their
own (``fastclip_cpu::*``), so compiling keeps the CPU fast path.

Each round calls both once in a rotating order (``timing.Rounds``), after the compile; the
ratio is of the median times, in one run.

    pytest benchmarks/bench_cpu_compile.py --benchmark-json=benchmarks/results/compile_cpu.json
"""

import torch

import fastclip

from machine import bench_sizes
from timing import Rounds


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        sizes = bench_sizes(metafunc.config)
        case = (("random:tiny", 2, 2) if sizes == "tiny" else ("random:ViT-B/32", 8, 15))
        metafunc.parametrize("case", [case], ids=[f"{case[0]}-b{case[1]}"])


def test_compiled_against_eager(benchmark, case):
    spec, batch, rounds_count = case
    model, _ = fastclip.load(spec, device="cpu", backend="torch")
    images = torch.randn(batch, 3, model.visual.input_resolution, model.visual.input_resolution,
                         generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(model.encode_image)
    with torch.no_grad():
        expected, got = model.encode_image(images), compiled(images)  # compiles here
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 1e-5 * scale
        rounds = Rounds({"fastclip[torch] compiled": lambda: compiled(images),
                         "fastclip[torch] eager": lambda: model.encode_image(images)})
        rounds.warm_up()
        benchmark.group = f"compile-{spec}"
        benchmark.pedantic(rounds.run_round, rounds=rounds_count, iterations=1)
    benchmark.extra_info.update(task="image", model=spec.removeprefix("random:"), batch=batch,
                                dtype="fp32", note="torch.compile against eager")
    benchmark.extra_info.update(rounds.summary(batch, "fastclip[torch] eager"))
