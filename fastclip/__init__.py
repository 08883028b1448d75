"""fastclip: a fast, faithful drop-in replacement for OpenAI's ``clip`` package."""

from .backends import get_backend
from .loading import available_models, load, load_state_dict
from .model import CLIP, CONFIGS, build_model, build_model_from_config, convert_weights
from .tokenizer import SimpleTokenizer, get_tokenizer, tokenize
from .transform import Preprocess

__version__ = "0.1.0"

__all__ = [
    "CLIP", "CONFIGS", "Preprocess", "SimpleTokenizer", "available_models", "build_model",
    "build_model_from_config", "convert_weights", "get_backend", "get_tokenizer", "load",
    "load_state_dict", "tokenize",
]
