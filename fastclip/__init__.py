"""fastclip: a fast, faithful drop-in replacement for OpenAI's ``clip`` package."""

from .backends import get_backend
from .cuda_graphs import enable_cuda_graphs
from .loading import available_models, load, load_state_dict
from .model import CLIP, CONFIGS, build_model, build_model_from_config, convert_weights
from .tokenizer import SimpleTokenizer, get_tokenizer, tokenize
from .transform import Preprocess
from .zero_shot import IMAGENET_TEMPLATES, zero_shot_classifier

__version__ = "0.1.0"

__all__ = [
    "CLIP", "CONFIGS", "IMAGENET_TEMPLATES", "Preprocess", "SimpleTokenizer", "available_models", "build_model",
    "build_model_from_config", "convert_weights", "enable_cuda_graphs", "get_backend",
    "get_tokenizer", "info", "load", "load_state_dict", "tokenize",
    "zero_shot_classifier",
]


def info():
    """What this installation runs: versions, devices, the backend ``auto`` picks, and
    whether the compiled extension ``fastclip._C`` is loaded (else attention pooling runs
    its PyTorch fallback), and the dtypes whose CPU linear layers run on prepacked oneDNN
    weights (``fastclip.cpu_linear``; empty when oneDNN is absent or switched off), and
    whether the tokenizer merges with the compiled op (``native``) or numpy."""
    import torch

    from . import cpu_linear
    from .attention_pool import extension_info
    from .tokenizer import get_tokenizer
    from .backends import get_backend as resolve

    device = "cuda" if torch.cuda.is_available() else "cpu"
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
        "default_device": device,
        "auto_backend": resolve("auto", device).name,
        "extension": extension_info(),
        "cpu_prepacked_linear": cpu_linear.dtype_names(),
        "tokenizer_bpe": get_tokenizer().bpe_implementation,
    }
