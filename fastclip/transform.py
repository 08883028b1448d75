"""OpenAI's image preprocessing, without torchvision.

``Preprocess(n_px)(image)`` gives exactly the tensor of OpenAI's transform
``Compose([Resize(n_px, BICUBIC), CenterCrop(n_px), convert("RGB"), ToTensor(),
Normalize(MEAN, STD)])``: the same PIL calls in the same order and the same fp32 arithmetic.
"""

import numpy as np
import torch
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(width, height, size):
    """``(width, height)`` once the shorter side is ``size`` and the aspect ratio kept
    (torchvision's ``Resize(size)`` sizing rule)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_shorter_side(image, size):
    """Resize so that the shorter side is ``size``, keeping the aspect ratio, with PIL's
    bicubic filter."""
    width, height = image.size
    new_size = resized_size(width, height, size)
    if new_size == (width, height):
        return image
    return image.resize(new_size, Image.BICUBIC)


def center_crop(image, size):
    """The central ``size`` x ``size`` square (torchvision's rounding; zero padding where the
    image is smaller)."""
    width, height = image.size
    if width < size or height < size:
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        padded.paste(image, ((max(width, size) - width) // 2, (max(height, size) - height) // 2))
        image, (width, height) = padded, padded.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(pixels, mean=MEAN, std=STD):
    """Floating-point pixel values in [0, 255], channels third from last ``(..., 3, H, W)``
    -> OpenAI's normalized input, in place: ``(pixels / 255 - mean) / std``, the arithmetic of
    torchvision's ToTensor then Normalize. Every preprocessing path of fastclip ends here."""
    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return pixels.div_(255).sub_(mean).div_(std)


def to_normalized_tensor(image, mean=MEAN, std=STD):
    """An RGB PIL image -> a normalized, contiguous (3, H, W) tensor of the default dtype."""
    array = np.asarray(image, dtype=np.uint8)
    dtype = torch.get_default_dtype()  # as torchvision's ToTensor
    return normalize(torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().to(dtype),
                     mean, std)


class Preprocess:
    """OpenAI's CLIP preprocessing for a PIL image of any mode and size."""

    def __init__(self, n_px, mean=MEAN, std=STD):
        self.n_px = n_px
        self.mean = mean
        self.std = std

    def __call__(self, image):
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess expects a PIL image, got {type(image).__name__}; "
                            "open files with PIL.Image.open first.")
        image = center_crop(resize_shorter_side(image, self.n_px), self.n_px)
        return to_normalized_tensor(image.convert("RGB"), self.mean, self.std)

    def __repr__(self):
        return (f"Preprocess(n_px={self.n_px}: resize shorter side (bicubic), center crop, "
                f"RGB, normalize mean={self.mean} std={self.std})")
