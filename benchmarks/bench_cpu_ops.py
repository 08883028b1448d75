"""The CPU path's fused products (``fastclip.ops.cpu_linear``) against the PyTorch ops they
replace, at the shapes of ViT-B/32's image tower and the text tower, batch 32:

- ``linear``: the attention's packed QKV projection, ``cpu_linear.linear`` (oneDNN on a
  prepacked weight) against ``F.linear``;
- ``mlp``: a block's MLP with its residual add, ``cpu_linear.mlp`` (QuickGELU and the add in
  the products' epilogues) against ``F.linear``, an in-place QuickGELU, ``F.linear`` and the
  add, and against ``fastclip.ops.reference.mlp``.

Each round calls every contender once in a rotating order (``timing.Rounds``); the ratios
are of the median times, in one run. Without oneDNN every case skips.

    pytest benchmarks/bench_cpu_ops.py --benchmark-json=benchmarks/results/cpu_ops.json
"""

import functools
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from fastclip.ops import cpu_linear, reference

from machine import bench_sizes
from timing import Rounds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Case(NamedTuple):
    op: str  # "linear" or "mlp"
    tower: str
    batch: int
    tokens: int
    width: int
    dtype: str
    rounds: int

    @property
    def id(self):
        return f"{self.op}-{self.tower}-b{self.batch}-{self.dtype}"


def cases(sizes):
    towers = [("ViT-B/32 image", 50, 768), ("text", 77, 512)]
    batch, rounds = (2, 2) if sizes == "tiny" else (32, 7)
    return [Case(op, tower, batch, tokens, width, dtype, rounds)
            for op in ("linear", "mlp") for tower, tokens, width in towers
            for dtype in DTYPES]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        found = cases(bench_sizes(metafunc.config))
        metafunc.parametrize("case", found, ids=[case.id for case in found])


def unfused_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, residual):
    hidden = F.linear(x, fc_weight, fc_bias)
    hidden = hidden.mul_(torch.sigmoid_(hidden * 1.702))
    return residual + F.linear(hidden, proj_weight, proj_bias)


def contenders(case):
    dtype = DTYPES[case.dtype]
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    x = randn(case.batch, case.tokens, case.width)
    width = case.width
    if case.op == "linear":
        weight, bias = randn(3 * width, width, scale=width ** -0.5), randn(3 * width)
        return {"fastclip cpu_linear": functools.partial(cpu_linear.linear, x, weight, bias),
                "F.linear": functools.partial(F.linear, x, weight, bias)}, "F.linear"
    weights = (randn(4 * width, width, scale=width ** -0.5), randn(4 * width),
               randn(width, 4 * width, scale=(4 * width) ** -0.5), randn(width))
    residual = randn(case.batch, case.tokens, width)
    return {
        "fastclip cpu_linear": functools.partial(cpu_linear.mlp, x, *weights, "quick_gelu",
                                                 residual),
        "torch ops": functools.partial(unfused_mlp, x, *weights, residual),
        "reference": lambda: residual + reference.mlp(x, *weights, "quick_gelu"),
    }, "torch ops"


@torch.inference_mode()
def test_cpu_op(benchmark, case):
    if not cpu_linear.enabled():
        pytest.skip("no oneDNN (mkldnn) CPU ops in this PyTorch")
    if DTYPES[case.dtype] not in cpu_linear._DTYPES:
        pytest.skip(f"oneDNN has no {case.dtype} products on this CPU")
    with torch.inference_mode(False):  # weights as a model holds them, not inference tensors
        found, baseline = contenders(case)
    outputs = {name: fn().double() for name, fn in found.items()}
    truth = outputs[baseline]
    scale = truth.abs().max().item()
    tolerance = 1e-5 if case.dtype == "fp32" else 2e-2
    for name, output in outputs.items():
        error = (output - truth).abs().max().item() / scale
        assert error <= tolerance, f"{name} differs from {baseline} by {error:.2e} of magnitude"

    rounds = Rounds(found)
    rounds.warm_up()
    benchmark.group = case.id
    benchmark.pedantic(rounds.run_round, rounds=case.rounds, iterations=1)
    benchmark.extra_info.update(case._asdict(), task="cpu-op")
    benchmark.extra_info.update(rounds.summary(case.batch * case.tokens, baseline))
