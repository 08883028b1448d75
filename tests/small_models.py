"""The small CLIP models that tests build for themselves (random weights, seconds on a CPU):
one helper, with each test's variations as overrides of one configuration."""

import torch

from fastclip.model import CLIP

# A two-block ViT CLIP on 64-pixel images with OpenAI's 49,408-token vocabulary, so that
# fastclip.tokenize's ids fit (widths are multiples of 64: loading infers heads as width // 64).
SMALL = dict(embed_dim=64, image_resolution=64, vision_layers=2, vision_width=128,
             vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=128,
             transformer_heads=2, transformer_layers=2)


def small_clip(seed=0, **overrides):
    """A ``CLIP(**{**SMALL, **overrides})`` in eval mode, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return CLIP(**{**SMALL, **overrides}).eval()


def clip_inputs(device="cpu"):
    """Two 64-pixel images and two token sequences for the small models' 1,000-token
    vocabulary (``vocab_size=1000``); the end-of-text token (999) has the largest id."""
    images = torch.randn(2, 3, 64, 64)
    texts = torch.randint(1, 998, (2, 77))
    texts[0, 9], texts[1, 76] = 999, 999
    return images.to(device), texts.to(device)
