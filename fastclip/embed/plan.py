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
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from . import tables
from .sources import (  # noqa: F401  (the names of the plan's inputs, importable from here)
    Item,
    expand_braces,
    expand_source,
    image_items,
    read_column,
    text_items,
)


@dataclass(frozen=True)
class Chunk:
    """The inputs of one output shard: ``items`` of file and table sources, or one tar
    shard (``tar_path``) whose samples are read while embedding."""
    index: int
    items: tuple = ()
    tar_path: str = None

    @property
    def known_size(self):
        """The number of inputs, or None for a tar shard (known only once read)."""
        return None if self.tar_path else len(self.items)


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
    items, tars = [], []
    for source in images:
        source_items, source_tars = image_items(
            source, image_column, text_column if embed_captions else None, storage_options)
        items.extend(source_items)
        tars.extend(source_tars)
    if texts:
        text_list = [item for source in texts
                     for item in text_items(source, text_column, storage_options)]
        if images:
            items = _pair(items, tars, text_list)
        else:
            items = text_list
    if limit is not None:
        if tars:
            raise ValueError("--limit applies to folder, list and table inputs; for tar "
                             "shards, select fewer shards with a brace range instead.")
        items = items[:limit]

    items = _mark_duplicates(items)
    chunks = [Chunk(index=i, items=tuple(items[start:start + shard_size]))
              for i, start in enumerate(range(0, len(items), shard_size))]
    chunks += [Chunk(index=len(chunks) + i, tar_path=path) for i, path in enumerate(tars)]
    embed_texts = bool(texts) or embed_captions
    columns = ("key", "image_path", "caption") if images else ("key", "caption")
    plan = Plan(chunks=chunks, embed_images=bool(images), embed_texts=embed_texts,
                metadata_columns=columns)
    if enable_metadata:
        plan.table_columns, plan.metadata_types = _table_metadata(
            items, columns + (image_column, text_column), storage_options)
    plan.fingerprint = fingerprint(plan)
    return plan


def _mark_duplicates(items):
    """Items that repeat an earlier one (the same key and the same text) become failures: a
    path listed twice is embedded once, and the repeat is reported rather than silently
    given a second row. One image paired with two captions is two inputs."""
    first = {}
    marked = []
    for position, item in enumerate(items):
        identity = (item.key, item.text)
        if identity in first and item.error is None:
            item = dataclasses.replace(item, error=(
                f"duplicate key: the same input as input {first[identity] + 1} of the job"))
        first.setdefault(identity, position)
        marked.append(item)
    return marked


def _pair(image_list, tars, text_list):
    if tars:
        raise ValueError("Tar shards cannot be paired with a separate --texts source; embed "
                         "the captions inside the shards with --embed-captions.")
    if len(image_list) != len(text_list):
        raise ValueError(f"--images gives {len(image_list)} images and --texts gives "
                         f"{len(text_list)} texts; to embed them as aligned pairs the counts "
                         "must match. Run two jobs to embed them separately.")
    return [dataclasses.replace(image, text=text.text, error=image.error or text.error)
            for image, text in zip(image_list, text_list)]


def _table_metadata(items, taken, storage_options):
    """``({table: its other columns}, {column: its type})`` of the tables among ``items``:
    the columns ``--enable-metadata`` carries into the metadata, with their types."""
    by_table, types = {}, {}
    for path in dict.fromkeys(item.table for item in items if item.table):
        schema = tables.Table(path, storage_options).schema
        names = tuple(name for name in schema.names if name not in taken)
        by_table[path] = names
        for name in names:
            types.setdefault(name, schema.field(name).type)
    return by_table, types


def fingerprint(plan):
    """A digest of everything that decides the output's rows, so ``--resume`` can refuse to
    complete a job with different inputs."""
    digest = hashlib.sha256()
    digest.update(json.dumps([plan.embed_images, plan.embed_texts]).encode())
    for chunk in plan.chunks:
        digest.update(json.dumps([chunk.index, chunk.tar_path,
                                  [[i.key, i.image_path, i.text] + ([i.image_cell] if
                                                                    i.image_cell else [])
                                   for i in chunk.items]]).encode())
    return digest.hexdigest()


def rank_chunks(chunks, rank, world_size):
    """This rank's chunks: every ``world_size``-th, so ranks are disjoint, together cover
    all chunks once (no padding duplicates) and get similar amounts of work."""
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size}).")
    return [chunk for chunk in chunks if chunk.index % world_size == rank]
