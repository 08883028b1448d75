"""CUDA graphs for small batches: the same answers as the plain model, on a GPU."""

import pytest
import torch

from fastclip.ops.cuda_graphs import (
    CUDAGraphed,
    captured_batch_size,
    disable_cuda_graphs,
    enable_cuda_graphs,
)

from numerics import assert_close_relative
from small_models import small_clip


def test_batches_pad_to_the_smallest_captured_size():
    sizes = (1, 2, 4, 8)
    assert [captured_batch_size(n, sizes) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


def test_refuses_a_model_off_cuda_and_bad_sizes():
    with pytest.raises(ValueError, match="need the model on a CUDA device; it is on cpu"):
        enable_cuda_graphs(small_clip(vision_patch_size=32, vocab_size=1000))
    with pytest.raises(ValueError, match="batch_sizes must be positive"):
        CUDAGraphed(lambda x: x, "cuda", batch_sizes=(0, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graphs_replay_the_model(backend):
    model = small_clip(vision_patch_size=32, vocab_size=1000).cuda().half().set_backend(backend)
    images = torch.randn(40, 3, 64, 64, device="cuda")
    texts = torch.randint(1, 998, (40, 77), device="cuda")
    texts[:, 20] = 999
    with torch.no_grad():
        expected = model.encode_image(images), model.encode_text(texts)
    enable_cuda_graphs(model, batch_sizes=(1, 4, 8))
    first = model.encode_image(images[:3])
    for batch in (1, 3, 8, 40):  # exact, padded, exact, beyond the largest graph
        assert_close_relative(model.encode_image(images[:batch]), expected[0][:batch], 2e-3)
        assert_close_relative(model.encode_text(texts[:batch]), expected[1][:batch], 2e-3)
    assert_close_relative(first, expected[0][:3], 2e-3)  # not overwritten by later replays
    assert len(model.encode_image.graphs) == 3
    disable_cuda_graphs(model)
    assert not isinstance(model.__dict__.get("encode_image"), CUDAGraphed)


@pytest.mark.gpu
def test_graphs_take_normalize_and_replay_it():
    model = small_clip(vision_patch_size=32, vocab_size=1000).cuda().half()
    images = torch.randn(3, 3, 64, 64, device="cuda")
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True)
    enable_cuda_graphs(model, batch_sizes=(4,))
    assert_close_relative(model.encode_image(images, normalize=True), expected, 2e-3)
    assert len(model.encode_image.graphs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_model_on_another_gpu_than_the_current_one(backend):
    model = small_clip(vision_patch_size=32, vocab_size=1000).to("cuda:1").half()
    model.set_backend(backend)
    images = torch.randn(3, 3, 64, 64, device="cuda:1")
    with torch.cuda.device(1), torch.no_grad():
        expected = model.encode_image(images)
    with torch.cuda.device(0):
        with torch.no_grad():
            assert_close_relative(model.encode_image(images), expected, 2e-3)
        enable_cuda_graphs(model, batch_sizes=(4,))
        assert_close_relative(model.encode_image(images), expected, 2e-3)
