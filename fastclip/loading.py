"""``load`` and ``available_models``: OpenAI's ``clip.load`` API, with fastclip's model.

One loading path serves the library, the embed job, zero-shot classification, search, Ray
and training: a model name, a checkpoint path or ``random:<architecture>`` becomes a model
in eval mode, in one dtype, on one device, with one backend (:func:`place_model`).
"""

import os
import warnings

import torch

from .checkpoints import available_models, checkpoint_path, load_state_dict
from .model import build_model, build_model_from_config, convert_weights
from .ops.cuda_graphs import enable_cuda_graphs
from .transform import Preprocess

__all__ = ["RANDOM_PREFIX", "TINY_CONFIG", "available_models", "default_device", "load",
           "place_model", "random_model"]

RANDOM_PREFIX = "random:"
# ``random:tiny``: a ViT small enough to embed hundreds of images a second on a laptop CPU.
# Its embeddings mean nothing; it exists to try a job without downloading weights.
TINY_CONFIG = dict(vision_layers=2, vision_width=128, image_resolution=64, vision_patch_size=16,
                   transformer_layers=2, transformer_width=128, embed_dim=64)


def default_device():
    """Where a model goes when no device is given: this process's GPU when CUDA is available
    (``cuda:LOCAL_RANK`` under a launcher such as torchrun, else ``cuda:0``), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def default_dtype(device):
    """fp16 on CUDA and fp32 elsewhere, as OpenAI's ``clip.load``."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def random_model(architecture, dtype=None):
    """A model of random weights: ``"tiny"`` (:data:`TINY_CONFIG`) or one of the nine
    architectures (``"ViT-B/32"``: full size). Seeded, so every process that builds one gets
    the same weights, without moving the caller's random number generator."""
    overrides = TINY_CONFIG if architecture == "tiny" else {}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = build_model_from_config("ViT-B/32" if architecture == "tiny" else architecture,
                                        **overrides)
    finally:
        torch.random.set_rng_state(generator_state)
    if dtype is not None and dtype != torch.float32:
        convert_weights(model, dtype)
    return model


def place_model(model, device=None, backend="auto"):
    """Move ``model`` to ``device`` (:func:`default_device` when None), put it in eval mode
    and choose its backend for that device. Returns the model."""
    device = torch.device(device) if device is not None else default_device()
    return model.to(device).eval().set_backend(backend)


def load(name, device=None, jit=False, download_root=None, dtype=None, backend="auto",
         quick_gelu=True, cuda_graphs=False, vision_heads=None, transformer_heads=None):
    """Load a CLIP model: OpenAI's ``clip.load`` with fastclip's model.

    Parameters
    ----------
    name : a name from ``available_models()``, a path to a checkpoint (an OpenAI
        TorchScript archive, or a state dict, including ``{"state_dict": ...}`` checkpoints),
        or ``random:tiny`` / ``random:<architecture>`` (seeded random weights, for trying
        things out without a download).
    device : where to put the model; see :func:`default_device`.
    jit : accepted for compatibility with OpenAI's API; fastclip always returns its own model.
    download_root : where downloads are cached; ``~/.cache/clip`` by default.
    dtype : the weights' dtype; fp16 on CUDA and fp32 on the CPU by default, as OpenAI's.
        fp16 and bf16 use OpenAI's mixed layout (``convert_weights``): norms, embeddings and
        ``logit_scale`` stay in fp32.
    backend : ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"`` (see
        ``fastclip.ops.dispatch``).
    quick_gelu : ``False`` builds the nn.GELU variant (LAION's open_clip checkpoints).
    vision_heads, transformer_heads : head counts, for checkpoints whose heads are not 64
        wide (OpenAI's all are; LAION's ViT-H/14 has ``vision_heads=16``). A state dict
        does not record them.
    cuda_graphs : on CUDA, ``True`` (or a tuple of batch sizes) makes ``encode_image`` and
        ``encode_text`` replay CUDA graphs for small batches (see ``fastclip.ops.cuda_graphs``
        for the static-shape rules).

    Returns ``(model, preprocess)``: the model in eval mode, and a callable turning a PIL
    image into the model's input tensor.
    """
    if jit:
        warnings.warn("fastclip.load(jit=True): fastclip runs its own model, not the "
                      "TorchScript archive; returning that model.", stacklevel=2)
    name = os.fspath(name)  # a path may come as a pathlib.Path
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if name.startswith(RANDOM_PREFIX):
        model = random_model(name[len(RANDOM_PREFIX):], dtype)
    else:
        path = checkpoint_path(name, download_root)
        if path is None:
            raise RuntimeError(
                f"Model {name} not found; available models = {available_models()}, or pass "
                f"the path of a checkpoint file, or {RANDOM_PREFIX}tiny.")
        model = build_model(load_state_dict(path), quick_gelu=quick_gelu, dtype=dtype,
                            vision_heads=vision_heads, transformer_heads=transformer_heads)
    place_model(model, device, backend)
    if cuda_graphs:
        sizes = {} if cuda_graphs is True else {"batch_sizes": tuple(cuda_graphs)}
        enable_cuda_graphs(model, **sizes)
    return model, Preprocess(model.visual.input_resolution)
