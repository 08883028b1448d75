"""The worker side of a job: inputs read, decoded and preprocessed into batches, in
DataLoader worker processes.

The workers take the job's units in turn: pieces of ``batch_size`` inputs of a listed chunk,
or a whole tar shard. Every batch carries its chunk and its piece number there, and the last
one of a chunk says so, so the writer puts a chunk's rows back in input order and knows when
the chunk is complete, whichever workers made its pieces.

Every way an input can be bad raises ``InputError`` (``fastclip.images``), recorded as that
input's failure; a tar shard cut short keeps the complete samples before the damage
(``shards``).
"""

import itertools
from collections import deque
from functools import partial

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    InputError,
    PixelBuffer,
    decode_image,
    decode_jpeg_pixels,
    start_reads,
)
from ..tokenizer import tokenize
from ..transform import resized_size
from . import device_decode, storage
from .job import DEFAULT_CAPTION_KEY, DEFAULT_IMAGE_KEYS
from .shards import (  # noqa: F401  (iter_webdataset and sample_image: importable from here)
    caption_extension,
    iter_webdataset,
    json_fields,
    sample_caption,
    sample_image,
)
from .tables import TableRows

# Inputs of a listed chunk whose files are being read while an earlier one is decoded: the
# timed reads run on the worker's read thread (images.start_reads), begun READ_AHEAD // 2
# inputs at a time (one wake-up of that thread) whenever no more than that many are left,
# so that an input's read is done when its turn comes and the decoding thread waits neither
# for the read nor for the read thread to wake.
READ_AHEAD = 8


def check_resized_size(preprocess, width, height, max_pixels):
    new_width, new_height = resized_size(width, height, preprocess.n_px)
    if new_width * new_height > max_pixels:
        raise InputError(f"aspect ratio too extreme: {width}x{height} would be resized to "
                         f"{new_width}x{new_height} = {new_width * new_height} pixels, more "
                         f"than the limit of {max_pixels}")


def preprocess_bounded(preprocess, image, max_pixels, out=None):
    """``preprocess(image)`` (into ``out`` when given), refused when the resize alone would
    exceed ``max_pixels``: an extreme aspect ratio (1 x 400,000 pixels) passes the limit as it
    is, but not once its shorter side is resized to the model's size; a MemoryError is this
    input's failure."""
    width, height = image.size
    check_resized_size(preprocess, width, height, max_pixels)
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
                 caption_key=DEFAULT_CAPTION_KEY, device_decode=False, read_timeout=None,
                 storage_options=None, enable_metadata=False, table_columns=None):
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
        self.storage_options = storage_options
        self.enable_metadata = enable_metadata
        self.table_columns = table_columns or {}
        self._buffer, self._filled = None, 0  # the batch tensor being filled (_batches)
        self._tables = None  # this worker's TableRows
        self._chunk_items = None  # (index, inputs) of the last listed chunk read
        self._pixels = None  # this worker's PixelBuffer

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
                size = chunk.size
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
                    chunk, self._listed_samples(self._items_of(chunk)[start:stop]),
                    first_piece=piece, last=stop == chunk.size)

    def _items_of(self, chunk):
        """The inputs of a listed chunk, read from their sources once per worker (its
        pieces are this worker's next units)."""
        if self._chunk_items is None or self._chunk_items[0] != chunk.index:
            self._chunk_items = (chunk.index, chunk.items)
        return self._chunk_items[1]

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

    def _read_path(self, path):
        """The bytes of a local file or of a URL's object, within the read timeout."""
        return self._start_reads([path])[0].result()

    def _start_reads(self, paths):
        """The reads of ``paths``, begun now together (``images.PendingRead``)."""
        remote = partial(storage.read_remote, options=self.storage_options)
        return start_reads([(path, remote if path is not None and storage.is_url(path) else None)
                            for path in paths], self.max_bytes, self.read_timeout)

    def _table_row(self, item, names):
        if self._tables is None:
            self._tables = TableRows(self.storage_options)
        try:
            return self._tables.row(item.table, item.row, names)
        except Exception as error:  # pyarrow's and the store's errors: this input's failure
            raise InputError(f"row {item.row} of {item.table} unreadable: "
                             f"{type(error).__name__}: {error}") from None

    def _row_names(self, item):
        """The columns of ``item``'s table row that the job reads: the image cell and the
        --enable-metadata columns, read together (one read of the row)."""
        names = [item.image_cell] if item.image_cell else []
        if self.enable_metadata:
            names += [n for n in self.table_columns.get(item.table, ()) if n not in names]
        return names

    def _cell_image(self, item, row=None):
        """The image bytes of a table cell: binary, or a ``{bytes, path}`` struct."""
        row = row if row is not None else self._table_row(item, self._row_names(item))
        value = row[item.image_cell]
        if isinstance(value, dict):
            if value.get("bytes") is None and value.get("path"):
                return self._read_path(storage.join(item.table, value["path"]))
            value = value.get("bytes")
        if value is None:
            raise InputError("no image (an empty cell in the table)")
        if len(value) > self.max_bytes:
            raise InputError(f"image cell of {len(value)} bytes is larger than the "
                             f"{self.max_bytes}-byte limit")
        return value

    def _begin_reads(self, items):
        """The reads of the files of ``items`` that the job needs, begun now together:
        ``(item, {extension: read}, image read or None)`` for each. The sidecars beside a
        folder's image are the caption's and, for --enable-metadata, the ``.json``; the
        image is read here unless it is in a table's cell (whose row is read when the
        item's turn comes)."""
        plans, paths = [], []
        for item in items:
            sidecars, image = [], False
            if item.error is None:
                wanted = set()
                if self.embed_texts and item.text is None:
                    wanted.add(caption_extension(self.caption_key))
                if self.enable_metadata:
                    wanted.add("json")
                sidecars = [(extension, path) for extension, path in item.sidecars or ()
                            if extension in wanted]
                image = self.embed_images and not item.image_cell
            plans.append((item, [extension for extension, _ in sidecars], image))
            paths.extend(path for _, path in sidecars)
            if image:
                paths.append(item.image_path)
        reads = iter(self._start_reads(paths))
        return [(item, {extension: next(reads) for extension in extensions},
                 next(reads) if image else None) for item, extensions, image in plans]

    def _listed_samples(self, items):
        """The samples of ``items`` in order, with reads begun ahead (``READ_AHEAD``)."""
        items, pending = iter(items), deque()
        try:
            while True:
                if len(pending) <= READ_AHEAD // 2:
                    pending.extend(self._begin_reads(
                        itertools.islice(items, READ_AHEAD - len(pending))))
                if not pending:
                    return
                yield self._listed_sample(*pending.popleft())
        finally:  # closed early: the reads not yet begun never are
            for _, sidecar_reads, image_read in pending:
                for read in [*sidecar_reads.values(), image_read]:
                    if read is not None:
                        read.discard()

    def _listed_sample(self, item, sidecar_reads, image_read):
        if item.error is not None:
            return ({"key": item.key, "image_path": item.image_path, "caption": item.text},
                    None, item.error)
        text, extra, row = item.text, {}, None
        try:
            fields = {}
            for extension, read in sidecar_reads.items():
                try:
                    fields[extension] = read.result()
                except InputError as error:
                    fields[extension] = error
            if text is None and self.embed_texts:
                error = fields.get(caption_extension(self.caption_key))
                text = error if isinstance(error, InputError) else \
                    sample_caption(fields, self.caption_key)
            names = self._row_names(item) if item.table else []
            row = self._table_row(item, names) if names else None
            if self.enable_metadata:
                extra = json_fields(fields)
                extra.update({name: value for name, value in (row or {}).items()
                              if name != item.image_cell})
        except InputError as error:
            text = error
        if item.image_cell:
            read = partial(self._cell_image, item, row)
        else:
            read = image_read.result if image_read is not None else \
                partial(self._read_path, item.image_path)
        sample = self._sample(item.key, item.image_path, text, read, extra)
        if image_read is not None:
            image_read.discard()  # not asked for where the sample failed first
        return sample

    def _samples(self, chunk):
        """``(row, image tensor, failure reason)`` for each sample of a tar shard."""
        try:
            wanted = {*self.image_keys, caption_extension(self.caption_key)}
            if self.enable_metadata:
                wanted.add("json")
            seen = set()
            for key, fields in iter_webdataset(chunk.tar_path, self.max_bytes, wanted,
                                               self.storage_options):
                if key in seen:
                    yield ({"key": f"{chunk.tar_path}:{key}"}, None,
                           "duplicate key: an earlier sample of this shard has the same key")
                    continue
                seen.add(key)
                # image_path: the sample's key, as clip-retrieval writes it for shards.
                yield self._sample(f"{chunk.tar_path}:{key}", key,
                                   sample_caption(fields, self.caption_key),
                                   partial(sample_image, fields, self.image_keys),
                                   json_fields(fields) if self.enable_metadata else None)
        except InputError as error:
            yield {"key": chunk.tar_path}, None, str(error)

    def _sample(self, key, image_path, text, read_bytes, extra=None):
        error = text if isinstance(text, InputError) else None
        text = None if error is not None else text
        row = {**(extra or {}), "key": key, "image_path": image_path, "caption": text}
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
                    image = self._jpeg_into(data, slot) if slot is not None else None
                    if image is None:
                        image = preprocess_bounded(
                            self.preprocess, decode_image(data, self.max_pixels),
                            self.max_pixels, slot)
                    self._filled += slot is not None
        except InputError as error:
            return row, None, str(error)
        return row, image, None

    def _jpeg_into(self, data, slot):
        """A plain JPEG decoded straight to pixels and preprocessed into ``slot`` by the
        compiled op (the same tensor as PIL's decode and the op give); None where that path
        does not apply (``images.decode_jpeg_pixels``)."""
        if getattr(self.preprocess, "path", None) != "compiled op":
            return None
        if self._pixels is None:
            self._pixels = PixelBuffer()
        pixels = decode_jpeg_pixels(data, self.max_pixels, self._pixels)
        if pixels is None:
            return None
        check_resized_size(self.preprocess, pixels.shape[1], pixels.shape[0], self.max_pixels)
        try:
            return self.preprocess.into_pixels(pixels, slot)
        except MemoryError:
            raise InputError(f"out of memory preprocessing a {pixels.shape[1]}x"
                             f"{pixels.shape[0]} image") from None

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
