"""Reading inputs safely: file bytes, WebDataset samples and image decoding.

Every way an input can be bad (missing, empty, not an image, truncated, corrupt, a
decompression bomb, a tar shard cut short) raises :class:`InputError` with a reason that
goes to ``failures.jsonl``. Nothing here may crash a job or hang on one input: images are
size-checked from their header before any pixel is decoded, and files are size-checked
before they are read.
"""

import io
import os
import tarfile
import warnings

from PIL import Image

# PIL's own default bomb limit (about 89 million pixels, 0.25 GiB of RGB at 24 bits).
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DEFAULT_CAPTION_KEY = "txt"


class InputError(ValueError):
    """One input could not be used; ``str(error)`` is the reason recorded for it."""


def read_file(path, max_bytes=DEFAULT_MAX_BYTES):
    """The bytes of the file at ``path``."""
    if path is None:
        raise InputError("no image path (an empty cell in the table)")
    try:
        if not os.path.isfile(path) and os.path.exists(path):
            # A folder, a FIFO or a device named like an image: reading it could block.
            raise InputError("not a regular file")
        size = os.path.getsize(path)
        if size > max_bytes:
            raise InputError(f"file of {size} bytes is larger than the {max_bytes}-byte limit")
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise InputError(f"unreadable: {type(error).__name__}: {error}") from error


def decode_image(data, max_pixels=DEFAULT_MAX_PIXELS):
    """A fully decoded PIL image from encoded bytes.

    The pixel count is checked from the header, before decoding, so a decompression bomb
    costs nothing; PIL's own bomb warning is raised as an error too. ``load()`` decodes every
    pixel here, so a truncated file fails now rather than later in preprocessing.
    """
    if not data:
        raise InputError("empty file")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # PIL refuses images past its own limit inside Image.open: raise it to the one asked
        # for (the header check below enforces max_pixels).
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(f"decompression bomb: {width}x{height} = {width * height} "
                                 f"pixels is more than the limit of {max_pixels}")
            image.load()
    except InputError:
        raise
    except Image.UnidentifiedImageError:
        raise InputError("not an image (PIL cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(f"decompression bomb: {error}") from None
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, ...
        raise InputError(f"corrupt or truncated image: {type(error).__name__}: {error}") \
            from None
    return image


def _split_key(member_name):
    """WebDataset's convention: ``dir/sample.ext`` -> (``dir/sample``, ``ext``), where the
    extension is everything after the first dot of the file name."""
    folder, _, name = member_name.rpartition("/")
    stem, dot, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def iter_webdataset(path, max_bytes=DEFAULT_MAX_BYTES):
    """Yield ``(key, {extension: bytes})`` for the samples of a WebDataset tar shard, in
    order. A shard that ends early or is corrupt raises :class:`InputError` after the
    complete samples before the damage; the damaged sample is never yielded."""
    key, fields = None, {}
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = _split_key(member.name)
                if member_key != key:
                    if key is not None:
                        yield key, fields
                    key, fields = member_key, {}
                if member.size > max_bytes:
                    fields[extension] = InputError(
                        f"tar member {member.name} of {member.size} bytes is larger than the "
                        f"{max_bytes}-byte limit")
                    continue
                fields[extension] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise InputError(f"tar shard cut short or corrupt at sample {key!r} (it and any "
                         f"later samples are not embedded): {type(error).__name__}: {error}"
                         ) from None
    if key is not None:
        yield key, fields


def sample_image(fields, image_keys=DEFAULT_IMAGE_KEYS):
    """The image bytes of a WebDataset sample: the first of ``image_keys`` it has."""
    for extension in image_keys:
        if extension in fields:
            value = fields[extension]
            if isinstance(value, InputError):
                raise value
            return value
    raise InputError(f"no image in the sample (looked for {', '.join(image_keys)}; it has "
                     f"{', '.join(sorted(fields)) or 'nothing'})")


def sample_caption(fields, caption_key=DEFAULT_CAPTION_KEY):
    """The caption of a WebDataset sample, or None when it has none."""
    value = fields.get(caption_key)
    if value is None or isinstance(value, InputError):
        return None
    return value.decode("utf-8", errors="replace").strip()
