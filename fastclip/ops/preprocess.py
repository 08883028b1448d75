"""OpenAI's preprocessing in one compiled op: ``torch.ops.fastclip.resize_crop_normalize``.

OpenAI's transform resizes the shorter side with PIL's bicubic filter, takes the central
square, converts to RGB and normalizes. The op (``csrc/resize.cpp``, ``csrc/resize_cuda.cu``)
does all of it from an image's 8-bit pixels into a caller's tensor, with Pillow's own integer
arithmetic, so the result is the same tensor, bit for bit, for the modes it takes (L, LA, RGB
and RGBA; Pillow resizes LA and RGBA with premultiplied alpha, and so does the op). It
computes only the pixels the crop keeps, one pass per axis, with the normalization a lookup
in a table of the 256 byte values (``transform`` builds it with its own arithmetic), and
reads a PIL image's pixels where PIL keeps them, without a copy.

Pillow's pass order changed in Pillow 13 (a height shrunk by more than twice the width's
shrink is resized vertically first): :func:`vertical_first` follows the installed Pillow, and
``transform`` checks the op against the installed Pillow once per process before using it.
"""

import warnings

import numpy as np
import torch
from PIL import Image

from . import extension

OP_NAME = "fastclip::resize_crop_normalize"
# PIL modes the op takes, with their channel count as the op reads them.
MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
PILLOW_VERSION = tuple(int(part) for part in Image.__version__.split(".")[:2]
                       if part.isdigit())
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # of out
MAX_SIDE = 1 << 24  # the op's limit on every side, input and resized


def available(device_type="cpu"):
    """Whether the compiled op has a kernel for ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and extension.has_kernel(OP_NAME, key)


def _pillow13_order(width, height, resized_width, resized_height):
    shrink = height - resized_height
    return shrink > 0 and shrink > 2 * (width - resized_width)


def _tall_order(width, height, resized_width, resized_height):
    return height > 100 * width and resized_height < height


# The orders of Pillow's two resize passes that Pillow releases have had, by whether an image
# is resized vertically first: always horizontally first (before 13); vertically first when
# the height shrinks by more than twice as many pixels as the width (13, in C); vertically
# first for images over 100 times as tall as wide (a rule of Pillow's Python code).
PASS_ORDERS = {
    "horizontal first": lambda *sizes: False,
    "pillow 13": _pillow13_order,
    "tall images vertically first": _tall_order,
}
_order = {"name": "pillow 13" if PILLOW_VERSION >= (13, 0) else "horizontal first"}


def use_pass_order(name):
    """Resize with the pass order ``name`` of ``PASS_ORDERS`` (the one the installed Pillow
    follows, as ``transform`` detects it)."""
    _order["name"] = name


def pass_order():
    return _order["name"]


def vertical_first(width, height, resized_width, resized_height):
    """Whether the installed Pillow resizes this image vertically first."""
    return PASS_ORDERS[_order["name"]](width, height, resized_width, resized_height)


def _arrow_pixels(image):
    """The image's pixels where PIL keeps them (one block, 4 bytes a pixel for LA, RGB and
    RGBA, 1 for L) as a uint8 tensor over that memory, or None where PIL cannot export them
    so (an image held in several blocks)."""
    import pyarrow as pa
    try:
        array = pa.array(image)
    except (ValueError, TypeError, pa.ArrowException):
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read only: the op never writes it
        flat = torch.from_numpy(np.frombuffer(array.buffers()[-1], dtype=np.uint8))
    width, height = image.size
    if image.mode == "L":
        return flat[:height * width].view(height, width, 1), array
    rows = flat[:height * width * 4].view(height, width, 4)
    if image.mode == "LA":  # L, L, L, A: the first and the last byte
        return rows.as_strided((height, width, 2), (width * 4, 4, 3)), array
    return (rows[..., :3] if image.mode == "RGB" else rows), array


def pixels(image):
    """``(pixels, owner)``: an (H, W, C) uint8 tensor of a PIL image in ``MODES``, read where
    PIL keeps it when it can be (keep ``owner`` alive while the tensor is used), else a copy."""
    if image.mode not in MODES:
        raise ValueError(f"the op takes PIL modes {', '.join(MODES)}; got {image.mode}")
    image.load()
    # Images over memory PIL does not own (a memory-mapped file, Image.frombuffer) may have
    # another row order or stride, and PIL's export does not handle them: those are copied.
    mapped = getattr(image, "readonly", 0) or getattr(image, "map", None) is not None
    tensor, owner = (None, None) if mapped else _arrow_pixels(image)
    if tensor is not None:
        return tensor, owner
    array = np.array(image, dtype=np.uint8)  # a copy, writable
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)), None


def center_crop_offset(resized, size):
    """(top or left) of the central ``size`` of a side of ``resized`` pixels, torchvision's
    CenterCrop rounding; negative where the side is padded (zeros, centred)."""
    if resized < size:
        return -((size - resized) // 2)
    return int(round((resized - size) / 2.0))


def resize_crop_normalize(image_pixels, resized, table, out, vertical=False):
    """OpenAI's preprocessing of ``image_pixels`` ((H, W, C) uint8, or (N, H, W, C)) into
    ``out`` ((3, S, S), or (N, 3, S, S)): resized to ``resized`` = (height, width) with
    Pillow's bicubic filter (vertically first where ``vertical``), the central crop, RGB, and
    each byte through ``table`` ((3, 256) in ``out``'s dtype) into ``out``."""
    size_h, size_w = out.shape[-2:]
    offset = [center_crop_offset(resized[0], size_h), center_crop_offset(resized[1], size_w)]
    torch.ops.fastclip.resize_crop_normalize(image_pixels, list(resized), offset, table, out,
                                             vertical)
    return out


def _register_fake():
    @torch.library.register_fake(OP_NAME)
    def _(image, resized, offset, table, out, vertical_first=False):
        return None


if extension.LOADED and available("cpu"):
    _register_fake()
