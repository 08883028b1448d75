"""OpenAI's image preprocessing, without torchvision.

``Preprocess(n_px)(image)`` gives exactly the tensor of OpenAI's transform
``Compose([Resize(n_px, BICUBIC), CenterCrop(n_px), convert("RGB"), ToTensor(),
Normalize(MEAN, STD)])``. Two paths compute it: the compiled op of ``ops/preprocess.py``
(Pillow's integer arithmetic, only for the pixels the crop keeps) for L, LA, RGB and RGBA
images, and PIL's own calls in OpenAI's order (:meth:`Preprocess.reference`) for every other
mode, where the op is not built, or where it does not match the installed Pillow.
"""

import functools
import os
import threading

import numpy as np
import torch
from PIL import Image

from .ops import preprocess as fused

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


@functools.lru_cache(maxsize=64)
def normalization_table(mean=MEAN, std=STD, dtype=torch.float32, device="cpu", compute=None):
    """The (3, 256) normalized value of each byte value per channel in ``dtype``, for the
    compiled op: :func:`normalize`'s arithmetic in ``compute`` (by default the default dtype,
    which torchvision's ToTensor computes in), converted once to ``dtype``, as
    ``preprocess(image).to(dtype)`` converts."""
    compute = torch.get_default_dtype() if compute is None else compute
    pixels = torch.arange(256, dtype=compute).expand(3, 1, 256).contiguous()
    values = normalize(pixels, mean, std).reshape(3, 256)
    return values.to(dtype=dtype, device=device).contiguous()


def _probe_images():
    """Small images that take each of Pillow's resize paths: down- and upscaling, each pass
    order (of every rule ``fused.PASS_ORDERS`` knows), one axis only, premultiplied alpha,
    grey."""
    rng = np.random.default_rng(0)
    probes = []
    for mode, (width, height) in (("RGB", (61, 47)), ("RGB", (20, 90)), ("RGB", (9, 13)),
                                  ("RGBA", (40, 33)), ("RGBA", (17, 80)), ("L", (33, 28)),
                                  ("LA", (25, 31)), ("RGB", (24, 100)), ("RGB", (16, 40)),
                                  ("RGB", (17, 1800))):
        data = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        data[..., 3] = rng.integers(0, 4, (height, width)) * 85  # alpha 0, 85, 170 and 255
        probes.append(Image.fromarray(data, "RGBA").convert(mode))
    return probes


def _op_matches(expected_of, device="cpu"):
    """Whether the op gives ``expected_of(image, size)`` ((H, W, 3) uint8) on every probe."""
    identity = torch.arange(256, dtype=torch.float32).expand(3, 256).contiguous().to(device)
    for image in _probe_images():
        for size in (16, 24, 7):
            width, height = image.size
            new_width, new_height = resized_size(width, height, size)
            got = torch.empty(3, new_height, new_width, dtype=torch.float32, device=device)
            pixels, owner = fused.pixels(image)
            fused.resize_crop_normalize(pixels.to(device), (new_height, new_width), identity,
                                        got, fused.vertical_first(width, height, new_width,
                                                                  new_height))
            del owner
            if not np.array_equal(got.permute(1, 2, 0).cpu().numpy(),
                                  expected_of(image, size)):
                return False, f"a {image.mode} {width}x{height} image resized to {size}"
    return True, None


_CHECK_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def fused_agrees_with_pillow():
    """Whether the compiled op gives the installed Pillow's bytes on probe images, with one of
    the pass orders Pillow has had (the one that matches is kept): checked once per process,
    in a few milliseconds. Warns and returns False where none matches."""
    if not fused.available("cpu"):
        return False

    def pillow(image, size):
        return np.asarray(resize_shorter_side(image, size).convert("RGB"))

    with _CHECK_LOCK:  # the order is switched while it is tried: one thread at a time
        orders = [fused.pass_order()] + [name for name in fused.PASS_ORDERS
                                         if name != fused.pass_order()]
        for order in orders:
            fused.use_pass_order(order)
            matches, first_difference = _op_matches(pillow)
            if matches:
                return True
            if order == orders[0]:
                difference = first_difference
    import warnings
    warnings.warn(
        f"fastclip's compiled preprocessing does not match the installed Pillow "
        f"{Image.__version__} ({difference}); preprocessing runs PIL's calls instead, which is "
        "slower. Please report it with your Pillow version.", RuntimeWarning, stacklevel=2)
    return False


@functools.lru_cache(maxsize=None)
def fused_agrees_on(device):
    """Whether the op's kernel for ``device`` gives the CPU op's bytes on the probe images
    (checked once per process and device); warns and returns False where it does not."""
    if not (fused_agrees_with_pillow() and fused.available(torch.device(device).type)):
        return False

    def on_cpu(image, size):
        width, height = image.size
        new_width, new_height = resized_size(width, height, size)
        identity = torch.arange(256, dtype=torch.float32).expand(3, 256).contiguous()
        out = torch.empty(3, new_height, new_width)
        pixels, _ = fused.pixels(image)
        fused.resize_crop_normalize(pixels, (new_height, new_width), identity, out,
                                    fused.vertical_first(width, height, new_width, new_height))
        return out.permute(1, 2, 0).numpy()

    matches, difference = _op_matches(on_cpu, device)
    if not matches:
        import warnings
        warnings.warn(f"fastclip's preprocessing kernel for {device} differs from its CPU "
                      f"kernel ({difference}); it is not used. Please report it.",
                      RuntimeWarning, stacklevel=2)
    return matches


class Preprocess:
    """OpenAI's CLIP preprocessing for a PIL image of any mode and size.

    ``fused``: use the compiled op where it applies (the default, None: where it is built and
    matches the installed Pillow, unless the environment sets ``FASTCLIP_PREPROCESS=pil``),
    or never (False).
    """

    def __init__(self, n_px, mean=MEAN, std=STD, fused=None):
        self.n_px = n_px
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.fused = fused

    @property
    def path(self):
        """``"compiled op"`` or ``"PIL"``: what preprocesses the images the op takes."""
        wanted = (self.fused if self.fused is not None
                  else os.environ.get("FASTCLIP_PREPROCESS", "").lower() != "pil")
        usable = wanted and fused_agrees_with_pillow()
        return "compiled op" if usable else "PIL"

    def __call__(self, image):
        out = torch.empty(3, self.n_px, self.n_px, dtype=torch.get_default_dtype())
        return self.into(image, out)

    def into(self, image, out):
        """Preprocess ``image`` into ``out``, a (3, n_px, n_px) float tensor (a row of a
        batch, say), converting to ``out``'s dtype at the end as ``tensor.to`` would;
        returns ``out``."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess expects a PIL image, got {type(image).__name__}; "
                            "open files with PIL.Image.open first.")
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3, self.n_px, self.n_px):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"preprocess: out must be a (3, {self.n_px}, {self.n_px}) tensor; "
                             f"got {shape}.")
        width, height = image.size
        if image.mode in fused.MODES and self._op_applies(width, height, out):
            pixels, owner = fused.pixels(image)
            self._op_into(pixels, width, height, out)
            del owner  # the image's memory, which pixels may view, was kept alive until here
            return out
        return out.copy_(self.reference(image))

    def into_pixels(self, pixels, out):
        """Preprocess decoded RGB pixels (an ``(H, W, 3)`` uint8 array, the pixels of the
        PIL image ``into`` would take) into ``out`` through the compiled op; returns
        ``out``, or None where the op does not apply (then give ``into`` a PIL image)."""
        height, width = pixels.shape[:2]
        if not (pixels.ndim == 3 and pixels.shape[2] == 3
                and self._op_applies(width, height, out)):
            return None
        if not isinstance(pixels, torch.Tensor):
            pixels = torch.from_numpy(pixels)
        return self._op_into(pixels, width, height, out)

    def _op_applies(self, width, height, out):
        new_width, new_height = resized_size(width, height, self.n_px)
        return (out.device.type == "cpu" and out.dtype in fused.DTYPES
                and self.path == "compiled op"
                and max(width, height, new_width, new_height) <= fused.MAX_SIDE)

    def _op_into(self, pixels, width, height, out):
        new_width, new_height = resized_size(width, height, self.n_px)
        return fused.resize_crop_normalize(
            pixels, (new_height, new_width),
            normalization_table(self.mean, self.std, out.dtype,
                                compute=torch.get_default_dtype()), out,
            fused.vertical_first(width, height, new_width, new_height))

    def reference(self, image):
        """PIL's calls in OpenAI's order: the path for every mode, and the op's reference."""
        image = center_crop(resize_shorter_side(image, self.n_px), self.n_px)
        return to_normalized_tensor(image.convert("RGB"), self.mean, self.std)

    def __repr__(self):
        return (f"Preprocess(n_px={self.n_px}: resize shorter side (bicubic), center crop, "
                f"RGB, normalize mean={self.mean} std={self.std})")
