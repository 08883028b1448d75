"""WebDataset tar shards: their samples, read in one pass from a local file, a store's
stream or a command's output, with bounded cost; a sample's image, caption and ``.json``."""

import json
import tarfile

from ..images import DEFAULT_MAX_BYTES, InputError
from . import storage
from .job import DEFAULT_CAPTION_KEY, DEFAULT_IMAGE_KEYS
from .storage import StorageError


def _split_key(member_name, current=None, known=()):
    """WebDataset's convention: ``dir/sample.ext`` -> (``dir/sample``, ``ext``), where the
    extension is everything after the first dot of the file name; a member named after the
    sample being read (``current``) and a dot is that sample's. Keys may hold dots
    (``img.v1.012.jpg``): a file name that ends in one of the ``known`` extensions (the
    image and caption keys) loses that extension only, the longest that fits."""
    if current is not None and member_name.startswith(current + "."):
        rest = member_name[len(current) + 1:]
        if "/" not in rest:
            return current, rest.lower()
    folder, _, name = member_name.rpartition("/")
    prefix = f"{folder}/" if folder else ""
    lowered = name.lower()
    for extension in sorted(known, key=len, reverse=True):
        if lowered.endswith("." + extension) and len(name) > len(extension) + 1:
            return prefix + name[:-len(extension) - 1], extension
    stem, dot, extension = name.partition(".")
    return prefix + stem, extension.lower()


# A tar's extended headers (GNU long names, pax records) are read whole by tarfile: bounded.
MAX_HEADER_BYTES = 1 << 16
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member header, refusing extended headers over ``MAX_HEADER_BYTES`` (a
    600 MB "long name" would be read into memory, then into failure records)."""

    def _proc_gnulong(self, archive):
        self._check_header_size()
        return super()._proc_gnulong(archive)

    def _proc_pax(self, archive):
        self._check_header_size()
        return super()._proc_pax(archive)

    def _check_header_size(self):
        if self.size > MAX_HEADER_BYTES:
            raise tarfile.HeaderError(f"an extended header of {self.size} bytes (more than "
                                      f"{MAX_HEADER_BYTES})")


def iter_webdataset(path, max_bytes=DEFAULT_MAX_BYTES, wanted=None, storage_options=None):
    """Yield ``(key, {extension: bytes})`` for the samples of a WebDataset tar shard, in
    order; the shard is a local path, a URL (streamed from its store) or ``pipe:COMMAND``.
    Only the extensions in ``wanted`` (all when None) are read; the others are listed
    with the value None. A shard that ends early or is corrupt raises :class:`InputError`
    after the complete samples before the damage; the damaged sample is never yielded.

    What one shard may cost is bounded: a member is read only up to ``max_bytes``, and so is
    one sample in all; a member that claims more than an uncompressed shard holds (a lying
    header) ends the shard at once, and in a compressed shard, where the claim cannot be
    checked without decompressing it, any member over ``max_bytes`` does (and so in a
    stream of unknown size).
    """
    key, fields, sample_bytes = None, {}, 0
    at = None  # the sample being read, for the message of a damaged shard
    known = tuple(wanted or ())
    try:
        stream, shard_size = storage.open_stream(path, storage_options)
        with stream:
            compressed = shard_size is None or stream.peek(6)[:6].startswith(_COMPRESSED)
            archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_BoundedTarInfo)
            for member in archive:
                member_key, extension = _split_key(member.name, key, known)
                at = member_key
                if member_key != key and key is not None:
                    yield key, fields
                    key = None
                # What tarfile passes over for this member, whatever its type (a sparse or
                # unknown member too), is where its next header starts.
                claimed = archive.offset - member.offset_data
                if not compressed and archive.offset > shard_size:
                    raise tarfile.HeaderError(
                        f"member {member.name[:200]!r} claims {claimed} bytes, more than the "
                        f"{shard_size}-byte shard holds")
                if compressed and claimed > max_bytes + tarfile.BLOCKSIZE:
                    raise tarfile.HeaderError(
                        f"member {member.name[:200]!r} claims {claimed} bytes, more than the "
                        f"{max_bytes}-byte limit (in a compressed shard the claim cannot be "
                        "checked without decompressing it)")
                if not member.isfile():
                    continue
                if key is None:
                    key, fields, sample_bytes = member_key, {}, 0
                if extension in fields:
                    fields[extension] = InputError(
                        f"the sample has two members named {member.name[:200]}")
                elif wanted is not None and extension not in wanted:
                    fields[extension] = None
                elif member.size > max_bytes or sample_bytes + member.size > max_bytes:
                    fields[extension] = InputError(
                        f"tar member {member.name[:200]} of {member.size} bytes takes its "
                        f"sample past the {max_bytes}-byte limit")
                else:
                    fields[extension] = archive.extractfile(member).read()
                    sample_bytes += member.size
    except StorageError as error:
        raise InputError(str(error)) from None
    except (tarfile.TarError, OSError, EOFError, ValueError, OverflowError,
            RecursionError) as error:  # RecursionError: a long chain of extended headers
        raise InputError(f"tar shard cut short or corrupt at sample {str(at)[:200]!r} (it and "
                         f"any later samples are not embedded): {type(error).__name__}: "
                         f"{error}") from None
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


JSON_FIELD = "json:"  # --caption-key json:FIELD: the caption is a field of the sample's .json


def caption_extension(caption_key):
    """The member extension a caption key reads (``json`` for ``json:FIELD``)."""
    return "json" if caption_key.startswith(JSON_FIELD) else caption_key


def sample_caption(fields, caption_key=DEFAULT_CAPTION_KEY):
    """The caption of a WebDataset sample, None when it has none, or an :class:`InputError`
    saying why it cannot be read. ``json:FIELD`` takes the field of the sample's ``.json``
    (a dotted FIELD walks nested objects, where the whole name is not a key itself)."""
    value = fields.get(caption_extension(caption_key))
    if value is None or isinstance(value, InputError):
        return None
    text = value.decode("utf-8", errors="replace")
    if not caption_key.startswith(JSON_FIELD):
        return text.strip()
    field = caption_key[len(JSON_FIELD):]
    try:
        record = json.loads(text)
    except ValueError as error:
        return InputError(f"the sample's .json is not valid JSON ({error})")
    if isinstance(record, dict) and field in record:
        value = record[field]
    else:
        value = record
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return InputError(f"the field {field!r} of the sample's .json is not text "
                          f"(a JSON {type(value).__name__})")
    return str(value).strip()


def json_fields(fields):
    """The fields of a sample's (or a sidecar's) ``.json`` object, for --enable-metadata;
    none when it has no ``.json``, or one that is not a JSON object."""
    value = fields.get("json")
    if not isinstance(value, bytes):
        return {}
    try:
        record = json.loads(value.decode("utf-8", errors="replace"))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
