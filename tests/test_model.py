"""The reference model against OpenAI's architecture as open_clip implements it, for all nine
released configurations, on randomly initialized fp32 weights."""

import zlib

import pytest
import torch

import fastclip
from fastclip.model import CONFIGS, infer_config

from numerics import assert_close_relative, cosine

open_clip = pytest.importorskip("open_clip")

# Full size for ViT-B/32 and RN50; fewer blocks elsewhere (every width, resolution and code
# path is kept) so that the suite stays fast on a 2-core CPU.
REDUCED = {
    "RN50": {},
    "RN101": dict(vision_layers=(1, 1, 2, 1), transformer_layers=2),
    "RN50x4": dict(vision_layers=(1, 1, 1, 1), transformer_layers=2),
    "RN50x16": dict(vision_layers=(1, 1, 1, 1), transformer_layers=2),
    "RN50x64": dict(vision_layers=(1, 1, 1, 1), transformer_layers=2),
    "ViT-B/32": {},
    "ViT-B/16": dict(vision_layers=2, transformer_layers=2),
    "ViT-L/14": dict(vision_layers=2, transformer_layers=2),
    "ViT-L/14@336px": dict(vision_layers=1, transformer_layers=1),
}

TEXTS = ["a photo of a cat", "", "diagram of the CLIP architecture, drawn by hand!",
         "ünïcödé 日本語 🙂 &amp; more"]


def randomized_state_dict(model, generator):
    """Every entry of the model's state dict drawn at random (BatchNorm statistics included,
    and the zero-initialized bn3 gains), so that no branch is a no-op in the comparison."""
    state = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            state[name] = tensor
        elif name.endswith("running_var"):
            state[name] = torch.rand(tensor.shape, generator=generator) + 0.5
        elif name.endswith("logit_scale"):
            state[name] = tensor.clone()
        elif tensor.dim() <= 1:  # gains, biases, BatchNorm means
            state[name] = 1.0 * (name.endswith("weight")) + 0.1 * torch.randn(
                tensor.shape, generator=generator)
        else:
            fan_in = tensor[0].numel() if tensor.dim() > 1 else tensor.numel()
            state[name] = torch.randn(tensor.shape, generator=generator) * fan_in ** -0.5
    return state


def open_clip_model(state_dict):
    # build_model_from_openai_state_dict rounds the weights to fp16; load them again in fp32.
    model = open_clip.model.build_model_from_openai_state_dict(dict(state_dict), quick_gelu=True)
    model.float()
    model.load_state_dict(state_dict)
    return model.eval()


def make_inputs(config, batch=2):
    resolution = config["image_resolution"]
    images = torch.randn(batch, 3, resolution, resolution)
    texts = fastclip.tokenize(TEXTS[:batch] if batch <= len(TEXTS) else TEXTS * batch)[:batch]
    return images, texts


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_open_clip(name):
    config = {**CONFIGS[name], **REDUCED[name]}
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    state_dict = randomized_state_dict(fastclip.CLIP(**config), generator)

    model = fastclip.build_model(state_dict)
    assert infer_config(state_dict) == config
    peer = open_clip_model(state_dict)

    images, texts = make_inputs(config, batch=1 if name in ("RN50x16", "RN50x64") else 2)
    with torch.no_grad():
        peer_image_features = peer.encode_image(images)
        peer_text_features = peer.encode_text(texts)
        assert_close_relative(model.encode_image(images), peer_image_features, 1e-5,
                              f"{name} encode_image")
        assert_close_relative(model.encode_text(texts), peer_text_features, 1e-5,
                              f"{name} encode_text")
        logits_per_image, logits_per_text = model(images, texts)
    normalize = torch.nn.functional.normalize
    expected = peer.logit_scale.exp() * (
        normalize(peer_image_features, dim=-1) @ normalize(peer_text_features, dim=-1).t())
    # Logits are logit_scale times a cosine: their magnitude is logit_scale, whatever the
    # (near-orthogonal, for random weights) cosines are.
    assert_close_relative(logits_per_image, expected, 1e-5, f"{name} logits_per_image",
                          scale=peer.logit_scale.exp().item())
    assert torch.equal(logits_per_text, logits_per_image.t())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_configuration_builds_and_infers(name):
    """Every full-size configuration builds with random weights (meta device: no memory) and
    its architecture is recovered from the state dict alone."""
    with torch.device("meta"):
        model = fastclip.build_model_from_config(name)
    assert infer_config(model.state_dict()) == CONFIGS[name]


def test_state_dict_keys_match_open_clip():
    for name in ("RN50", "ViT-B/32"):
        with torch.device("meta"):
            ours = fastclip.build_model_from_config(name).state_dict()
        peer = open_clip.create_model(name.replace("/", "-"), pretrained=None,
                                      force_quick_gelu=True)
        peer_keys = set(peer.state_dict()) - {"attn_mask"}
        assert set(ours) == peer_keys


def test_gelu_variant_matches_open_clip():
    """quick_gelu=False builds nn.GELU MLPs, the variant of open_clip's LAION checkpoints."""
    config = {**CONFIGS["ViT-B/32"], "vision_layers": 2, "transformer_layers": 2}
    state_dict = randomized_state_dict(fastclip.CLIP(**config), torch.Generator().manual_seed(1))
    model = fastclip.build_model(state_dict, quick_gelu=False)
    peer = open_clip.model.build_model_from_openai_state_dict(dict(state_dict), quick_gelu=False)
    peer.float()
    peer.load_state_dict(state_dict)
    images, texts = make_inputs(config)
    with torch.no_grad():
        assert_close_relative(model.encode_image(images), peer.eval().encode_image(images), 1e-5)
        assert_close_relative(model.encode_text(texts), peer.encode_text(texts), 1e-5)
        quick = fastclip.build_model(state_dict, quick_gelu=True).encode_image(images)
    assert not torch.allclose(quick, model.encode_image(images), atol=1e-4)


def test_backends_agree_in_fp32():
    config = {**CONFIGS["ViT-B/32"], "vision_layers": 2, "transformer_layers": 2}
    model = fastclip.CLIP(**config).eval()
    images, texts = make_inputs(config)
    with torch.no_grad():
        expected = model.set_backend("reference").encode_text(texts)
        assert model.backend == "reference"
        actual = model.set_backend("torch").encode_text(texts)
        assert model.backend == "torch"
    assert_close_relative(actual, expected, 1e-5)


def test_unknown_backend_is_refused():
    model = fastclip.build_model_from_config("ViT-B/32", vision_layers=1, transformer_layers=1)
    with pytest.raises(ValueError, match="Unknown backend 'fast'"):
        model.set_backend("fast")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", ["ViT-B/32", "RN50"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(name, dtype, backend):
    """OpenAI's mixed half layout runs on the CPU and stays close to fp32."""
    config = {**CONFIGS[name], **REDUCED["RN101" if name == "RN50" else "ViT-B/16"]}
    state_dict = randomized_state_dict(fastclip.CLIP(**config), torch.Generator().manual_seed(2))
    reference = fastclip.build_model(state_dict)
    half = fastclip.convert_weights(fastclip.build_model(state_dict), dtype).set_backend(backend)
    assert half.dtype == dtype
    assert half.ln_final.weight.dtype == torch.float32  # norms stay in fp32
    images, texts = make_inputs(config)
    with torch.no_grad():
        image_features = half.encode_image(images)
        text_features = half.encode_text(texts)
        assert image_features.dtype == dtype and text_features.dtype == dtype
        assert cosine(image_features, reference.encode_image(images)).min() > 0.999
        assert cosine(text_features, reference.encode_text(texts)).min() > 0.999


def test_text_longer_than_context_is_refused():
    model = fastclip.build_model_from_config("ViT-B/32", vision_layers=1, transformer_layers=1,
                                             context_length=16)
    with pytest.raises(ValueError, match="context length 16"):
        model.encode_text(fastclip.tokenize("a cat"))
    assert model.encode_text(fastclip.tokenize("a cat", context_length=16)).shape == (1, 512)


def test_head_count_override():
    """A state dict does not record head counts: OpenAI's 64-wide rule is the default, and
    checkpoints with other head widths say theirs."""
    config = {**CONFIGS["ViT-B/32"], "vision_layers": 1, "transformer_layers": 1}
    state_dict = fastclip.CLIP(**config).state_dict()
    assert fastclip.build_model(state_dict).visual.transformer.resblocks[0].attn.n_head == 12
    model = fastclip.build_model(state_dict, vision_heads=8, transformer_heads=4)
    assert model.visual.transformer.resblocks[0].attn.n_head == 8
    assert model.transformer.resblocks[0].attn.n_head == 4
