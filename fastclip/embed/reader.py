"""The worker side of a job: inputs read, decoded and preprocessed into batches, in
DataLoader worker processes.

The workers take the job's units in turn: pieces of ``batch_size`` inputs of a listed chunk,
or a whole tar shard. Every batch carries its chunk and its piece number there, and the last
one of a chunk says so, so the writer puts a chunk's rows back in input order and knows when
the chunk is complete, whichever workers made its pieces.

Every way an input can be bad raises ``InputError`` (``fastclip.images``), recorded as that
input's failure; a tar shard cut short keeps the complete samples before the damage.
"""

import json
import os
import tarfile
from functools import partial

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, InputError, decode_image, read_file
from ..tokenizer import tokenize
from ..transform import resized_size
from . import device_decode
from .job import DEFAULT_CAPTION_KEY, DEFAULT_IMAGE_KEYS


def _split_key(member_name):
    """WebDataset's convention: ``dir/sample.ext`` -> (``dir/sample``, ``ext``), where the
    extension is everything after the first dot of the file name."""
    folder, _, name = member_name.rpartition("/")
    stem, dot, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


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


def iter_webdataset(path, max_bytes=DEFAULT_MAX_BYTES, wanted=None):
    """Yield ``(key, {extension: bytes})`` for the samples of a WebDataset tar shard, in
    order. Only the extensions in ``wanted`` (all when None) are read; the others are listed
    with the value None. A shard that ends early or is corrupt raises :class:`InputError`
    after the complete samples before the damage; the damaged sample is never yielded.

    What one shard may cost is bounded: a member is read only up to ``max_bytes``, and so is
    one sample in all; a member that claims more than an uncompressed shard holds (a lying
    header) ends the shard at once, and in a compressed shard, where the claim cannot be
    checked without decompressing it, any member over ``max_bytes`` does.
    """
    key, fields, sample_bytes = None, {}, 0
    at = None  # the sample being read, for the message of a damaged shard
    try:
        shard_size = os.path.getsize(path)
        with open(path, "rb") as f:
            compressed = f.read(6).startswith(_COMPRESSED)
        with tarfile.open(path, mode="r|*", tarinfo=_BoundedTarInfo) as archive:
            for member in archive:
                member_key, extension = _split_key(member.name)
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


def preprocess_bounded(preprocess, image, max_pixels, out=None):
    """``preprocess(image)`` (into ``out`` when given), refused when the resize alone would
    exceed ``max_pixels``: an extreme aspect ratio (1 x 400,000 pixels) passes the limit as it
    is, but not once its shorter side is resized to the model's size; a MemoryError is this
    input's failure."""
    width, height = image.size
    new_width, new_height = resized_size(width, height, preprocess.n_px)
    if new_width * new_height > max_pixels:
        raise InputError(f"aspect ratio too extreme: {width}x{height} would be resized to "
                         f"{new_width}x{new_height} = {new_width * new_height} pixels, more "
                         f"than the limit of {max_pixels}")
    try:
        return preprocess(image) if out is None else preprocess.into(image, out)
    except MemoryError:
        raise InputError(f"out of memory preprocessing a {width}x{height} image") from None


class EmbedDataset(IterableDataset):
    """Batches of preprocessed images and token ids, one chunk at a time, with the metadata
    rows of the inputs that worked and the failures of those that did not."""

    def __init__(self, chunks, preprocess, batch_size, embed_images, embed_texts,
                 context_length=77, max_pixels=DEFAULT_MAX_PIXELS,
                 max_bytes=DEFAULT_MAX_BYTES, image_keys=DEFAULT_IMAGE_KEYS,
                 caption_key=DEFAULT_CAPTION_KEY, device_decode=False, read_timeout=None):
        self.chunks = chunks
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.embed_images = embed_images
        self.embed_texts = embed_texts
        self.context_length = context_length
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.image_keys = tuple(image_keys)
        self.caption_key = caption_key
        self.device_decode = device_decode
        self.read_timeout = read_timeout
        self._buffer, self._filled = None, 0  # the batch tensor being filled (_batches)

    def units(self):
        """The work of the job as ``(chunk, start, stop)`` units, dealt to the workers in
        turn: a listed chunk is cut into pieces of ``batch_size`` inputs (one batch each), so
        that every worker helps even when the job has fewer chunks than workers; a tar shard
        is one unit (``start`` is None), read in a single pass."""
        units = []
        for chunk in self.chunks:
            if chunk.tar_path is not None:
                units.append((chunk, None, None))
            else:
                size = len(chunk.items)
                units.extend((chunk, start, min(start + self.batch_size, size))
                             for start in range(0, max(size, 1), self.batch_size))
        return units

    def __iter__(self):
        worker = get_worker_info()
        units = self.units()
        if worker is not None:
            units = units[worker.id::worker.num_workers]
        for chunk, start, stop in units:
            if start is None:
                yield from self._batches(chunk, self._samples(chunk))
            else:
                # A piece of a listed chunk: one batch, numbered by its place in the chunk.
                piece = start // self.batch_size
                yield from self._batches(
                    chunk, self._listed_samples(chunk.items[start:stop]), first_piece=piece,
                    last=stop == len(chunk.items))

    def _batches(self, chunk, samples, first_piece=0, last=True):
        """Batches of ``batch_size`` good rows from ``samples``; the final one says whether it
        ends the chunk (``last``). Each batch carries its ``piece`` number in the chunk.

        Images are preprocessed in place into the rows of a batch tensor (``_sample`` takes
        the next free row), which is sent as it is: no per-image tensor is stacked."""
        rows, images, failures, inputs = [], [], [], 0
        piece = first_piece
        self._new_buffer()
        for row, image, reason in samples:
            if len(rows) == self.batch_size:  # full, and more input follows
                full = self._buffer
                # Before the yield: once yielded, the batch's memory may be moved to shared
                # memory by the loader's feeder thread, and must not be read here again.
                image = self._carry_over(image)
                yield self._batch(chunk, piece, rows, images, failures, inputs, False, full)
                rows, images, failures, inputs = [], [], [], 0
                piece += 1
            inputs += 1
            if reason is None:
                rows.append(row)
                images.append(image)
            else:
                failures.append({"key": row["key"], "reason": reason, "shard": chunk.index})
        yield self._batch(chunk, piece, rows, images, failures, inputs, last, self._buffer)

    def _new_buffer(self):
        # One row more than a batch: the sample read when a batch is full lands there, and
        # moves to the next batch's first row.
        n_px = self.preprocess.n_px
        self._buffer = (torch.empty(self.batch_size + 1, 3, n_px, n_px)
                        if self.embed_images else None)
        self._filled = 0

    def _free_row(self):
        """The batch tensor's next free row, or None (samples read outside ``_batches``)."""
        if self._buffer is None or self._filled >= len(self._buffer):
            return None
        return self._buffer[self._filled]

    def _carry_over(self, image):
        previous, filled = self._buffer, self._filled
        self._new_buffer()
        if image is not None and image.dim() == 3:  # preprocessed: the last row filled
            self._buffer[0].copy_(previous[filled - 1])
            self._filled = 1
            return self._buffer[0]
        return image

    def _listed_samples(self, items):
        for item in items:
            if item.error is not None:
                yield ({"key": item.key, "image_path": item.image_path, "caption": item.text},
                       None, item.error)
                continue
            yield self._sample(item.key, item.image_path, item.text,
                               partial(read_file, item.image_path, self.max_bytes,
                                       self.read_timeout))

    def _samples(self, chunk):
        """``(row, image tensor, failure reason)`` for each sample of a tar shard."""
        try:
            wanted = {*self.image_keys, caption_extension(self.caption_key)}
            seen = set()
            for key, fields in iter_webdataset(chunk.tar_path, self.max_bytes, wanted):
                if key in seen:
                    yield ({"key": f"{chunk.tar_path}:{key}"}, None,
                           "duplicate key: an earlier sample of this shard has the same key")
                    continue
                seen.add(key)
                # image_path: the sample's key, as clip-retrieval writes it for shards.
                yield self._sample(f"{chunk.tar_path}:{key}", key,
                                   sample_caption(fields, self.caption_key),
                                   partial(sample_image, fields, self.image_keys))
        except InputError as error:
            yield {"key": chunk.tar_path}, None, str(error)

    def _sample(self, key, image_path, text, read_bytes):
        error = text if isinstance(text, InputError) else None
        text = None if error is not None else text
        row = {"key": key, "image_path": image_path, "caption": text}
        try:
            if self.embed_texts and error is not None:
                raise error
            if self.embed_texts and text is None:
                raise InputError("no text (an empty cell, or no caption in the sample)")
            image = None
            if self.embed_images:
                data = read_bytes()
                if self.device_decode:
                    # JPEG bytes, decoded later on the model's device (device_decode.py).
                    image = device_decode.device_decodable(data, self.max_pixels)
                if image is None:
                    slot = self._free_row()
                    image = preprocess_bounded(self.preprocess, decode_image(data, self.max_pixels),
                                               self.max_pixels, slot)
                    self._filled += slot is not None
        except InputError as error:
            return row, None, str(error)
        return row, image, None

    @staticmethod
    def _stacked(images, buffer):
        """The batch's images as one tensor: the buffer's first rows, where they were
        preprocessed into it in order (always, within ``_batches``), else stacked."""
        return buffer[:len(images)] if _rows_of(images, buffer) else torch.stack(images)

    def _batch(self, chunk, piece, rows, images, failures, inputs, last, buffer):
        jpegs = []
        if self.device_decode and self.embed_images:
            # Preprocessed images first, then the JPEG bytes for the device, rows in step.
            order = sorted(range(len(rows)), key=lambda i: images[i].dim() == 1)
            rows, images = [rows[i] for i in order], [images[i] for i in order]
            while images and images[-1].dim() == 1:
                jpegs.insert(0, images.pop())
        texts = [row["caption"] for row in rows]
        has_rows = len(rows) > 0
        return {
            "chunk": chunk.index, "piece": piece, "last": last, "inputs": inputs, "rows": rows,
            "failures": failures, "jpegs": jpegs or None,
            "images": self._stacked(images, buffer) if self.embed_images and images else None,
            # Texts longer than the context are cut (and end with end-of-text), as
            # clip-retrieval does, rather than failing the whole row.
            "tokens": (tokenize(texts, self.context_length, truncate=True)
                       if self.embed_texts and has_rows else None),
        }


def _rows_of(images, buffer):
    return buffer is not None and len(images) <= len(buffer) and all(
        image.data_ptr() == row.data_ptr() for image, row in zip(images, buffer))


def single_thread_worker(worker_id):
    # Workers decode with PIL and preprocess small tensors; torch's intra-op threads would
    # only compete with the model for cores.
    torch.set_num_threads(1)
