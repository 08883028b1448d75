"""Where the inputs of ``fastclip embed`` come from, and how they are cut into shards.

An image source is a folder (recursive), a ``.txt`` list of image paths or URLs, WebDataset
``.tar`` shards (paths, globs or brace patterns such as ``shards/{00000..00099}.tar``, or
``pipe:COMMAND``), or a table (``tables``) whose image column holds paths, URLs or the
images' bytes. A text source is a ``.txt`` file (one text per line) or a table column. Each
may be local or a URL of an object store (``storage``).

Every job is planned as a list of :class:`Chunk`: ``shard_size`` consecutive inputs of the
file and table sources, then one chunk per tar shard. A chunk becomes one output shard with
the chunk's index as its number. The plan depends only on the inputs and ``shard_size``,
never on the number of processes, so ranks take disjoint chunks, shard names never collide,
and a resumed run (with any number of ranks) redoes exactly the chunks that are missing.

Planning streams the inputs (``segments``): a chunk keeps only where its inputs begin and
how many there are, and the fingerprint and the check for repeated inputs are computed on
the way, so the plan of ten million paths holds 8 bytes per input (a hash of each, for
the repeats), not the paths. Images paired with a separate --texts source are the
exception: they are listed in memory.
"""

import dataclasses
import hashlib
import json
from array import array
from dataclasses import dataclass, field

import numpy as np

from . import tables
from .segments import StoredSegment
from .sources import (  # noqa: F401  (the names of the plan's inputs, importable from here)
    Item,
    expand_braces,
    expand_source,
    image_paths,
    image_segments,
    read_column,
    segment_items,
    text_segments,
)


@dataclass(frozen=True)
class Span:
    """``count`` consecutive inputs of a segment, from ``place`` on."""
    segment: object
    place: object
    count: int


@dataclass(frozen=True)
class Chunk:
    """The inputs of one output shard: ``size`` inputs of file and table sources, read
    from their ``spans`` (or held as ``stored``), or one tar shard (``tar_path``) whose
    samples are read while embedding. ``repeats`` maps the place in the chunk of an input
    that repeats an earlier one to the job-wide position of the first."""
    index: int
    spans: tuple = ()
    size: int = 0
    tar_path: str = None
    repeats: tuple = ()  # ((place in the chunk, first position), ...)

    @property
    def known_size(self):
        """The number of inputs, or None for a tar shard (known only once read)."""
        return None if self.tar_path else self.size

    @property
    def items(self):
        """The chunk's inputs, read again from their segments. Inputs that cannot be read
        again (a list that changed, a store that stopped answering) are failures, never
        lost: the chunk has its ``size`` inputs."""
        items = []
        for span in self.spans:
            try:
                read = span.segment.read(span.place, span.count)
                reason = "the source holds fewer inputs than when the job was planned"
            except Exception as error:  # this span's inputs fail; the job goes on
                read, reason = [], f"not read again: {type(error).__name__}: {error}"[:500]
            items.extend(read[:span.count])
            first = len(items)
            items.extend([Item(key=f"shard {self.index} input {first + i}", error=reason)
                          for i in range(span.count - len(read))])
        for place, first in self.repeats:
            if place < len(items) and items[place].error is None:
                items[place] = dataclasses.replace(items[place], error=(
                    f"duplicate key: the same input as input {first + 1} of the job"))
        return tuple(items)


@dataclass
class Plan:
    """What one job embeds: its chunks, which embeddings, and a fingerprint of all of it."""
    chunks: list
    embed_images: bool
    embed_texts: bool
    metadata_columns: tuple
    fingerprint: str = field(default="")
    table_columns: dict = field(default_factory=dict)  # --enable-metadata: {table: columns}
    metadata_types: dict = field(default_factory=dict)  # {column: pyarrow type}

    @property
    def name_width(self):
        """Digits of the zero-padded shard numbers, as clip-retrieval pads them
        (``int(log10(count)) + 1``: ten shards are ``00`` to ``09``), so names sort in order
        and match its own output."""
        return len(str(max(len(self.chunks), 1)))


# ---------------------------------------------------------------------------------------
# The plan

def plan_job(images=(), texts=(), shard_size=100_000, image_column="image_path",
             text_column="caption", embed_captions=False, limit=None, storage_options=None,
             enable_metadata=False):
    """Cut the inputs of one job into chunks (see the module docstring).

    With both ``images`` and ``texts``, the i-th image is paired with the i-th text (same
    count required) and both are embedded into aligned rows. ``embed_captions`` embeds the
    captions that image sources carry (a tar's caption key, a table's ``text_column``, the
    ``.txt`` beside a folder's image). ``enable_metadata`` carries a table's other columns
    (and a shard's or a sidecar's ``.json`` fields, read by the workers) into the metadata.
    """
    if not images and not texts:
        raise ValueError("Nothing to embed: give --images and/or --texts.")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}.")
    caption_column = text_column if embed_captions else None
    paths = [kind_path for source in images for kind_path in image_paths(source,
                                                                          storage_options)]
    tars = [path for kind, path in paths if kind == "tar"]
    if limit is not None and tars:
        raise ValueError("--limit applies to folder, list and table inputs; for tar "
                         "shards, select fewer shards with a brace range instead.")
    segments = (segment for kind, path in paths if kind == "listed"
                for segment in image_segments(path, image_column, caption_column,
                                              storage_options))
    paired = []  # the image segments, when they are paired with --texts
    if texts:
        text_list = (segment for source in texts
                     for segment in text_segments(source, text_column, storage_options))
        if images:
            paired = list(segments)
            segments = iter([_pair(paired, tars, list(text_list))])
        else:
            segments = text_list
    plan = Plan(chunks=[], embed_images=bool(images), embed_texts=bool(texts) or embed_captions,
                metadata_columns=("key", "image_path", "caption") if images else
                ("key", "caption"))
    digest = hashlib.sha256(json.dumps([plan.embed_images, plan.embed_texts]).encode())
    seen = []  # the segments, kept as the plan reads them (each without its inputs)
    plan.chunks, identities = _cut(_kept(segments, seen), shard_size, limit, digest)
    plan.chunks = _mark_repeats(plan.chunks, identities, seen, shard_size, limit)
    plan.chunks += [Chunk(index=len(plan.chunks) + i, tar_path=path)
                    for i, path in enumerate(tars)]
    for chunk in plan.chunks[len(plan.chunks) - len(tars):]:
        digest.update(_chunk_json(chunk.index, chunk.tar_path, ()))
    if enable_metadata:
        plan.table_columns, plan.metadata_types = _table_metadata(
            paired or seen, plan.metadata_columns + (image_column, text_column), storage_options)
    plan.fingerprint = digest.hexdigest()
    return plan


def _chunk_json(index, tar_path, items):
    return json.dumps([index, tar_path, [_item_fields(i) for i in items]]).encode()


def _item_fields(item):
    return [item.key, item.image_path, item.text] + ([item.image_cell] if item.image_cell
                                                     else [])


def _kept(segments, seen):
    for segment in segments:
        seen.append(segment)
        yield segment


def _stream(segments, limit):
    """``(segment, place, item)`` of every input, in order, up to ``limit``."""
    count, segments = 0, iter(segments)
    while limit is None or count < limit:  # no segment is made past the limit
        segment = next(segments, None)
        if segment is None:
            return
        for place, item in segment.iterate():
            count += 1
            yield segment, place, item
            if limit is not None and count >= limit:
                return  # before the next input is read


def _cut(segments, shard_size, limit, digest):
    """The chunks of the listed inputs, each ``shard_size`` of them as spans, the digest
    updated input by input (the bytes of ``_chunk_json``, without holding a chunk's
    inputs); and the 64-bit hash of each input's identity, in order."""
    chunks, identities = [], array("Q")
    spans, size = [], 0

    def close():
        chunks.append(Chunk(index=len(chunks), size=size, spans=tuple(
            Span(segment, place, count) for segment, place, count in spans)))
        digest.update(b"]]")
        spans.clear()

    for segment, place, item in _stream(segments, limit):
        if size == shard_size:
            close()
            size = 0
        if size == 0:
            digest.update(f"[{len(chunks)}, null, [".encode())
        if not spans or spans[-1][0] is not segment:
            spans.append([segment, place, 0])
        spans[-1][2] += 1
        digest.update((", " if size else "").encode() + json.dumps(_item_fields(item)).encode())
        size += 1
        identities.append(hash((item.key, item.text)) & 0xFFFFFFFFFFFFFFFF)
    if size:
        close()
    return chunks, identities


def _mark_repeats(chunks, identities, segments, shard_size, limit):
    """Inputs that repeat an earlier one (the same key and the same text) become failures:
    a path listed twice is embedded once, and the repeat is reported rather than silently
    given a second row. One image paired with two captions is two inputs. The hashes find
    the candidates; a second pass over those alone confirms them."""
    if len(identities) < 2:
        return chunks
    hashes = np.sort(np.frombuffer(identities, dtype=np.uint64))
    repeated = hashes[1:][hashes[1:] == hashes[:-1]]
    if not len(repeated):
        return chunks
    candidates = set(repeated.tolist())
    hashes = np.frombuffer(identities, dtype=np.uint64)
    first, repeats = {}, {}
    for position, (_, _, item) in enumerate(_stream(segments, limit)):
        if int(hashes[position]) not in candidates:
            continue
        identity = (item.key, item.text)
        if identity in first and item.error is None:
            repeats.setdefault(position // shard_size, []).append(
                (position % shard_size, first[identity]))
        first.setdefault(identity, position)
    return [dataclasses.replace(chunk, repeats=tuple(repeats.get(chunk.index, ())))
            for chunk in chunks]


def _pair(segments, tars, text_segments):
    """The images and texts zipped, held in memory (one segment)."""
    if tars:
        raise ValueError("Tar shards cannot be paired with a separate --texts source; embed "
                         "the captions inside the shards with --embed-captions.")
    image_list = [item for segment in segments for item in segment_items(segment)]
    text_list = [item for segment in text_segments for item in segment_items(segment)]
    if len(image_list) != len(text_list):
        raise ValueError(f"--images gives {len(image_list)} images and --texts gives "
                         f"{len(text_list)} texts; to embed them as aligned pairs the counts "
                         "must match. Run two jobs to embed them separately.")
    return StoredSegment(dataclasses.replace(image, text=text.text,
                                             error=image.error or text.error)
                         for image, text in zip(image_list, text_list))


def _table_metadata(segments, taken, storage_options):
    """``({table: its other columns}, {column: its type})`` of the table sources: the
    columns ``--enable-metadata`` carries into the metadata, with their types (columns of
    image bytes are images, not metadata)."""
    import pyarrow as pa
    by_table, types = {}, {}
    paths = [s.path for s in segments if getattr(s, "image_column", None) is not None]
    for path in dict.fromkeys(paths):
        schema = tables.open_table(path, storage_options).schema
        names = tuple(name for name in schema.names if name not in taken and not
                      (pa.types.is_binary(schema.field(name).type) or
                       pa.types.is_large_binary(schema.field(name).type)))
        by_table[path] = names
        for name in names:
            types.setdefault(name, schema.field(name).type)
    return by_table, types


def rank_chunks(chunks, rank, world_size):
    """This rank's chunks: every ``world_size``-th, so ranks are disjoint, together cover
    all chunks once (no padding duplicates) and get similar amounts of work."""
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size}).")
    return [chunk for chunk in chunks if chunk.index % world_size == rank]
