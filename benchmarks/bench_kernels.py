"""Each fused Triton kernel against the PyTorch computation it replaces, at CLIP's shapes.

Run on a GPU: ``pytest benchmarks/bench_kernels.py --benchmark-columns=median,iqr``. Without
CUDA every benchmark skips (the interpreter measures numpy, not the kernels). Each timed call
runs the op ``REPEATS`` times and synchronizes, so the time per op is the median / REPEATS.
"""

import pytest
import torch

from fastclip.model import ResidualAttentionBlock
from fastclip.ops import reference
from fastclip.ops.dispatch import TORCH, get_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPEATS = 20
DTYPE = torch.float16
# (name, batch, tokens, width, heads): the towers of ViT-B/32, ViT-L/14 and the text encoder.
SHAPES = [
    ("vit_b32", 256, 50, 768, 12),
    ("vit_l14", 64, 257, 1024, 16),
    ("text", 256, 77, 512, 8),
]
IDS = [shape[0] for shape in SHAPES]


def kernels():
    from fastclip import kernels as triton_kernels  # imports triton only when a GPU is here
    return triton_kernels


def randn(*shape, dtype=DTYPE, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=dtype) * scale


def run(benchmark, op, *args):
    def repeated():
        for _ in range(REPEATS):
            op(*args)
        torch.cuda.synchronize()

    repeated()  # compile and warm up outside the timing
    benchmark.pedantic(repeated, rounds=20, warmup_rounds=2)


@pytest.fixture(params=["triton", "torch"])
def implementation(request):
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_layer_norm(benchmark, shape, implementation):
    _, batch, tokens, width, _ = shape
    op = kernels().layer_norm if implementation == "triton" else TORCH.layer_norm
    run(benchmark, op, randn(batch, tokens, width), randn(width, dtype=torch.float32),
        randn(width, dtype=torch.float32), 1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_add_layer_norm(benchmark, shape, implementation):
    _, batch, tokens, width, _ = shape
    op = kernels().add_layer_norm if implementation == "triton" else TORCH.add_layer_norm
    run(benchmark, op, randn(batch, tokens, width), randn(batch, tokens, width),
        randn(width, dtype=torch.float32), randn(width, dtype=torch.float32), 1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_attention(benchmark, shape, implementation):
    name, batch, tokens, width, heads = shape
    op = kernels().attention if implementation == "triton" else TORCH.attention
    run(benchmark, op, randn(batch, tokens, 3 * width), heads, name == "text")


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_linear_quickgelu(benchmark, shape, implementation):
    _, batch, tokens, width, _ = shape
    args = (randn(batch, tokens, width), randn(4 * width, width, scale=0.03),
            randn(4 * width))
    if implementation == "triton":
        run(benchmark, kernels().linear_act, *args, "quick_gelu")
    else:
        run(benchmark, lambda x, w, b: reference.quick_gelu(torch.nn.functional.linear(x, w, b)),
            *args)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_mlp(benchmark, shape, implementation):
    _, batch, tokens, width, _ = shape
    op = kernels().mlp if implementation == "triton" else TORCH.mlp
    run(benchmark, op, randn(batch, tokens, width), randn(4 * width, width, scale=0.03),
        randn(4 * width), randn(width, 4 * width, scale=0.02), randn(width), "quick_gelu")


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_block(benchmark, shape, implementation):
    """A whole residual block: what the fusions add up to."""
    name, batch, tokens, width, heads = shape
    block = ResidualAttentionBlock(width, heads, causal=name == "text").cuda().to(DTYPE).eval()
    backend = get_backend(implementation, "cuda")
    for module in block.modules():
        if "ops" in type(module).__dict__:  # what CLIP.set_backend does for a whole model
            module.ops = backend
    with torch.no_grad():
        run(benchmark, block, randn(batch, tokens, width))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda_graphs"])
def test_small_batch_image_encoding(benchmark, batch, graphs):
    """ViT-B/32's image tower (random weights, fp16, Triton backend) at small batches, where
    launch overhead dominates: plain calls against CUDA graph replays."""
    from fastclip.model import build_model_from_config, convert_weights
    from fastclip.ops.cuda_graphs import enable_cuda_graphs

    model = convert_weights(build_model_from_config("ViT-B/32").cuda().eval(), DTYPE)
    model.set_backend("triton")
    if graphs:
        enable_cuda_graphs(model, batch_sizes=(batch,))
    images = randn(batch, 3, 224, 224)
    with torch.no_grad():
        run(benchmark, model.encode_image, images)
