"""Small CLIP models that tests build for themselves (random weights, seconds on a CPU)."""

from fastclip.model import build_model_from_config


def small_clip():
    """A two-block ViT CLIP with 64-pixel images, widths 128 and a 1,000-token vocabulary."""
    return build_model_from_config(
        "ViT-B/32", embed_dim=64, image_resolution=64, vision_layers=2, vision_width=128,
        transformer_layers=2, transformer_width=128, transformer_heads=2, vocab_size=1000,
    ).eval()
