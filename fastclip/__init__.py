"""fastclip: a fast, faithful drop-in replacement for OpenAI's ``clip`` package."""

from .checkpoints import load_state_dict
from .loading import available_models, default_device, load
from .model import CLIP, CONFIGS, build_model, build_model_from_config, convert_weights
from .ops.cuda_graphs import enable_cuda_graphs
from .ops.dispatch import auto_decisions, get_backend, triton_fallbacks
from .tokenizer import SimpleTokenizer, get_tokenizer, tokenize
from .transform import Preprocess
from .version import __version__
from .zero_shot import IMAGENET_TEMPLATES, zero_shot_classifier

__all__ = [
    "CLIP", "CONFIGS", "IMAGENET_TEMPLATES", "Preprocess", "SimpleTokenizer", "__version__",
    "available_models", "build_model", "build_model_from_config", "convert_weights",
    "default_device", "enable_cuda_graphs", "get_backend", "get_tokenizer", "info", "load",
    "load_state_dict", "tokenize", "zero_shot_classifier",
]


def info():
    """What this installation runs: versions, the default device, the backend ``auto``
    picks there, whether the compiled extension ``fastclip._C`` is loaded (else attention
    pooling runs its PyTorch algebra), the dtypes whose CPU linear layers run on prepacked
    oneDNN weights (``fastclip.ops.cpu_linear``; empty when oneDNN is absent or switched off),
    whether the tokenizer merges with the compiled class (``native``) or in Python, and
    which calls of the triton backend ran the torch op because their kernel cannot compute
    them (``{"op: reason": calls}``), the measured ``auto`` backend's decisions (GPU), and
    what preprocesses images (the compiled op, with the instruction set its CPU kernels use,
    or PIL)."""
    import torch

    from .ops import cpu_linear
    from .ops.attention_pool import extension_info

    device = default_device()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "fastclip": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "default_device": str(device),
        "auto_backend": get_backend("auto", device).name,
        "extension": extension_info(),
        "cpu_prepacked_linear": cpu_linear.dtype_names(),
        "tokenizer_bpe": get_tokenizer().bpe_implementation,
        "triton_fallbacks": triton_fallbacks(),
        "auto_decisions": auto_decisions(),
        "preprocess": _preprocess_info(),
    }


def _preprocess_info():
    from .ops import preprocess
    from .transform import Preprocess
    path = Preprocess(224).path
    if path != "compiled op":
        return {"path": path, "pillow": preprocess.PILLOW_VERSION}
    import torch
    return {"path": path, "cpu_isa": torch.ops.fastclip.preprocess_isa(),
            "cuda": preprocess.available("cuda"), "pillow": preprocess.PILLOW_VERSION}
