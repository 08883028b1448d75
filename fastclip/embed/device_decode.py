"""``--gpu-decode``: JPEGs decoded on the model's device (nvjpeg through
``torchvision.io.decode_jpeg`` on CUDA) and resized, cropped and normalized there.

Workers only read the bytes and check the JPEG's header; the main process decodes the batch
on the device. Everything else takes the PIL path in the workers: other formats, CMYK JPEGs,
JPEGs over the pixel limit, and JPEGs that do not end with their end-of-image marker
(truncated files, which PIL then records as failures). A JPEG the device cannot decode is
decoded with PIL in the main process, or recorded as a failure.

The resize, crop and normalization run the compiled op's kernel for the device
(``fastclip.ops.preprocess``), Pillow's integer arithmetic, once it has given its CPU
kernel's bytes on probe images in this process: given the same decoded pixels, the same
tensor as the PIL path. Where the extension lacks that kernel, or it fails the check,
torch's antialiased bicubic resize runs instead, within about a grey level of PIL's.
nvjpeg's IDCT may differ from libjpeg's by a grey level, so the GPU path is not bit-identical
to the PIL path; ``tests/test_embed_device_decode.py`` measures the cosine between the two
paths' embeddings.
On the CPU, torchvision decodes with libjpeg, the pixels PIL gives, so the same code runs and
is tested without a GPU (there the two paths agree exactly).
"""

import io
import warnings

import torch
import torch.nn.functional as F
from PIL import Image

from ..images import InputError, decode_image
from ..ops import preprocess as fused
from ..transform import fused_agrees_on, normalization_table, normalize, resized_size

JPEG_START = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"


def torchvision_decode_jpeg():
    """``torchvision.io.decode_jpeg`` and its RGB mode, or a clear error without it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its image codecs
            from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as error:
        raise RuntimeError("--gpu-decode needs torchvision (pip install torchvision); "
                           "without it, leave --gpu-decode out.") from error
    return decode_jpeg, ImageReadMode.RGB


def device_decodable(data, max_pixels):
    """``data`` as a 1-D uint8 tensor if the device decoder should take it, else None."""
    if not data.startswith(JPEG_START) or not data.rstrip(b"\x00").endswith(JPEG_END):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:  # the header only
                width, height = image.size
                mode = image.mode
    except Exception:  # the PIL path records why it is unreadable
        return None
    if width * height > max_pixels or mode not in ("RGB", "L"):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def resize_crop(image, n_px):
    """A decoded ``(3, H, W)`` uint8 image -> ``(3, n_px, n_px)`` fp32 pixel values in
    [0, 255]: the shorter side resized to ``n_px`` (bicubic, antialiased, rounded to whole
    grey levels as PIL's output is), then the central square (``transform``'s rounding)."""
    _, height, width = image.shape
    new_width, new_height = resized_size(width, height, n_px)
    pixels = image.float()
    if (new_height, new_width) != (height, width):
        pixels = F.interpolate(pixels[None], size=(new_height, new_width), mode="bicubic",
                               antialias=True, align_corners=False)[0]
        pixels = pixels.round_().clamp_(0, 255)
    top = int(round((new_height - n_px) / 2.0))
    left = int(round((new_width - n_px) / 2.0))
    return pixels[:, top:top + n_px, left:left + n_px]


def decode_on_device(encoded, device):
    """Decode a list of JPEG byte tensors on ``device``; returns ``{index: (3, H, W) uint8}``
    for those that decoded (a bad one fails a whole batched call, so then one at a time)."""
    decode_jpeg, rgb = torchvision_decode_jpeg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dict(enumerate(decode_jpeg(encoded, mode=rgb, device=device)))
        except RuntimeError:
            decoded = {}
            for i, data in enumerate(encoded):
                try:
                    decoded[i] = decode_jpeg(data, mode=rgb, device=device)
                except RuntimeError:
                    pass
            return decoded


def fused_resize_crop(image, preprocess, out):
    """A decoded ``(3, H, W)`` uint8 image on the device -> ``out``, by the compiled op's
    kernel for the device (checked against its CPU kernel once per process): Pillow's
    arithmetic, so the same decoded pixels give the tensor the PIL path gives."""
    _, height, width = image.shape
    new_width, new_height = resized_size(width, height, preprocess.n_px)
    table = normalization_table(preprocess.mean, preprocess.std, out.dtype, str(out.device),
                                torch.get_default_dtype())
    fused.resize_crop_normalize(image.permute(1, 2, 0), (new_height, new_width), table, out,
                                fused.vertical_first(width, height, new_width, new_height))
    return out


def device_images(jpegs, preprocess, device, max_pixels):
    """Preprocessed images on ``device`` for a batch's JPEGs, the positions that worked, and
    ``(position, reason)`` for those that neither the device nor PIL could decode. With the
    compiled op's kernel for the device (and the op matching the installed Pillow), the
    resize is Pillow's; else torch's antialiased bicubic (within a few grey levels)."""
    decoded = decode_on_device(jpegs, device)
    n_px = preprocess.n_px
    exact = preprocess.path == "compiled op" and fused_agrees_on(str(device))
    # Each image is written into its row of the batch (the op's kernel writes it there).
    batch = torch.empty(len(jpegs), 3, n_px, n_px, device=device)
    kept, failures = [], []
    for i, data in enumerate(jpegs):
        row = batch[len(kept)]
        if i in decoded:
            if exact:
                fused_resize_crop(decoded[i], preprocess, row)
            else:
                row.copy_(normalize(resize_crop(decoded[i], n_px), preprocess.mean,
                                    preprocess.std))
        else:
            try:
                image = decode_image(data.numpy().tobytes(), max_pixels)
            except InputError as error:
                failures.append((i, str(error)))
                continue
            row.copy_(preprocess(image))
        kept.append(i)
    return (batch[:len(kept)] if kept else None), kept, failures
