"""The ``--model`` argument of the command line: a model name, a checkpoint path, or a
random model for smoke tests and benchmarks."""

import torch

from ..loading import load
from ..model import build_model_from_config, convert_weights
from ..transform import Preprocess

# A ViT small enough to embed hundreds of images a second on a laptop CPU; its embeddings
# mean nothing, it exists to try the pipeline without downloading weights.
TINY_CONFIG = dict(vision_layers=2, vision_width=128, image_resolution=64, vision_patch_size=16,
                   transformer_layers=2, transformer_width=128, embed_dim=64)
RANDOM_PREFIX = "random:"


def load_model(spec, device="cpu", backend="auto", dtype=None):
    """``(model, preprocess)`` for ``spec``: a name from ``fastclip.available_models()``, a
    checkpoint path, ``random:tiny``, or ``random:<architecture>`` (e.g. ``random:ViT-B/32``:
    full-size, random weights). Random models are seeded, so every process that builds one
    gets the same weights."""
    if not spec.startswith(RANDOM_PREFIX):
        return load(spec, device=device, dtype=dtype, backend=backend)
    architecture = spec[len(RANDOM_PREFIX):]
    overrides = TINY_CONFIG if architecture == "tiny" else {}
    if architecture == "tiny":
        architecture = "ViT-B/32"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = build_model_from_config(architecture, **overrides)
    finally:
        torch.random.set_rng_state(generator_state)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if dtype != torch.float32:
        convert_weights(model, dtype)
    model.to(device).eval().set_backend(backend)
    return model, Preprocess(model.visual.input_resolution)
