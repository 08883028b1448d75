"""The rules every part of fastclip shares: one backend for the whole model, one loading
path (random models included), unit-norm embeddings from the model, atomic writes, and the
settings a resumed job or run must keep."""

import inspect
import os
import stat

import pytest
import torch

import fastclip
from fastclip.embed import EmbedJob
from fastclip.files import atomic_write, is_temporary
from fastclip.model import LayerNorm
from fastclip.ops import dispatch, reference
from fastclip.train import TrainConfig

from small_models import small_clip


def test_set_backend_reaches_every_block_subclasses_included():
    class TracedLayerNorm(LayerNorm):  # what a user's variant of a block looks like
        pass

    model = small_clip()
    model.ln_final = TracedLayerNorm(model.ln_final.normalized_shape[0])
    model.set_backend("torch")
    users = [m for m in model.modules() if hasattr(m, "ops")]
    assert model.ln_final in users and len(users) > 10
    assert all(m.ops is dispatch.TORCH for m in users), \
        [type(m).__name__ for m in users if m.ops is not dispatch.TORCH]
    model.set_backend("reference")
    assert all(m.ops is dispatch.REFERENCE for m in users)


def test_every_backend_provides_the_contracts_ops_with_its_signatures():
    contract = {name: inspect.signature(getattr(dispatch, cls).__call__)
                for name, cls in (("layer_norm", "LayerNorm"), ("add_layer_norm", "AddLayerNorm"),
                                  ("attention", "Attention"), ("mlp", "MLP"),
                                  ("attention_pool2d", "AttentionPool2d"))}
    for backend in (dispatch.REFERENCE, dispatch.TORCH):
        for op in dispatch.OPS:
            assert callable(getattr(backend, op)), (backend, op)
        for op, signature in contract.items():
            expected = [p for p in signature.parameters if p != "self"]
            assert list(inspect.signature(getattr(backend, op)).parameters) == expected, \
                (backend.name, op)


def test_random_models_load_by_name_seeded_without_moving_the_callers_generator():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first, preprocess = fastclip.load("random:tiny", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    second, _ = fastclip.load("random:tiny", device="cpu", dtype=torch.bfloat16)
    assert preprocess.n_px == first.visual.input_resolution == 64
    assert second.dtype == torch.bfloat16 and second.ln_final.weight.dtype == torch.float32
    assert torch.equal(first.visual.proj.bfloat16(), second.visual.proj)
    assert not first.training and first.backend == "torch"
    with pytest.raises(ValueError, match="Unknown architecture 'ViT-Z/1'"):
        fastclip.load("random:ViT-Z/1")


def test_load_takes_a_path_object(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(small_clip().state_dict(), path)
    model, _ = fastclip.load(path, device="cpu")
    torch.testing.assert_close(model.visual.proj, small_clip().visual.proj)


def test_encode_normalize_gives_unit_rows_of_the_same_directions():
    model = small_clip()
    images = torch.randn(3, 3, 64, 64)
    tokens = fastclip.tokenize(["a cat", "a dog on a skateboard"])
    with torch.no_grad():
        for encode, batch in ((model.encode_image, images), (model.encode_text, tokens)):
            raw, unit = encode(batch), encode(batch, normalize=True)
            torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(batch)))
            torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True))
        model.half()
        unit = model.encode_image(images, normalize=True)
        assert unit.dtype == torch.float16
        assert (unit.float().norm(dim=-1) - 1).abs().max() < 1e-3


def test_atomic_write_replaces_whole_files_or_nothing(tmp_path):
    path = tmp_path / "data.bin"
    atomic_write(path, lambda f: f.write(b"first"))
    assert path.read_bytes() == b"first"
    mode = stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # a new file's permissions, not a private temporary's

    def fails_midway(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails_midway)
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_temporary_names_are_recognised():
    assert is_temporary(".img_emb_0.npy.tmp-12-ab") and is_temporary("img_emb_0.npy.tmp-12")
    assert not is_temporary("img_emb_0.npy")


def test_embed_job_marks_the_settings_a_resume_must_keep():
    names = set(EmbedJob.resume_names())
    assert {"model", "model_dtype", "dtype", "normalized", "backend", "gpu_decode",
            "max_pixels", "max_bytes", "image_keys", "caption_key", "enable_metadata",
            "model_sha256"} == names
    job = EmbedJob(output="out", images="photos/", image_keys=["png"])
    assert job.images == ("photos/",) and job.image_keys == ("png",)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        EmbedJob(output="out", batch_size=0)


def test_train_config_names_what_a_resume_would_change():
    saved = TrainConfig(steps=10, lr=1e-3).as_dict()
    assert TrainConfig(steps=10, lr=1e-3, device="cuda", quiet=True).resume_conflicts(saved) \
        == []
    assert TrainConfig(steps=12, lr=1e-3).resume_conflicts(saved) == ["--steps 10 (now 12)"]


def test_reference_linear_act_is_the_fused_kernels_epilogue():
    x, weight, bias, residual = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6), \
        torch.randn(4, 6)
    out = reference.linear_act(x, weight, bias, "quick_gelu", residual)
    torch.testing.assert_close(out, reference.quick_gelu(x @ weight.T + bias) + residual)
    torch.testing.assert_close(reference.linear_act(x, weight, None, "none"), x @ weight.T)
