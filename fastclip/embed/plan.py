"""Where the inputs of ``fastclip embed`` come from, and how they are cut into shards.

An image source is a folder (recursive), a ``.txt`` list of image paths, WebDataset ``.tar``
shards (paths, globs or brace patterns such as ``shards/{00000..00099}.tar``), or a
``.parquet``/``.csv`` table with an image-path column. A text source is a ``.txt`` file (one
text per line) or a ``.parquet``/``.csv`` column.

Every job is planned as a list of :class:`Chunk`: ``shard_size`` consecutive inputs of the
file and table sources, then one chunk per tar shard. A chunk becomes one output shard with
the chunk's index as its number. The plan depends only on the inputs and ``shard_size``,
never on the number of processes, so ranks take disjoint chunks, shard names never collide,
and a resumed run (with any number of ranks) redoes exactly the chunks that are missing.
"""

import csv
import dataclasses
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from ..images import IMAGE_EXTENSIONS

TABLE_EXTENSIONS = (".parquet", ".csv")


@dataclass(frozen=True)
class Item:
    """One input of a file or table source: its unique key, and its image path, text or
    both (a pair from the same row, or from an image list and a text list zipped)."""
    key: str
    image_path: str = None
    text: str = None
    error: str = None  # why this input is a failure before it is read (a listing's gap)


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

    @property
    def name_width(self):
        """Digits of the zero-padded shard numbers, as clip-retrieval pads them
        (``int(log10(count)) + 1``: ten shards are ``00`` to ``09``), so names sort in order
        and match its own output."""
        return len(str(max(len(self.chunks), 1)))


# ---------------------------------------------------------------------------------------
# Paths, globs and brace patterns

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern):
    """All strings a brace pattern stands for: ``{00000..00099}`` (a zero-padded integer
    range, inclusive) and ``{a,b,c}`` (alternatives), as in WebDataset and the shell."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        first, last = range_match.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def expand_source(source):
    """The sorted paths one command-line source names (brace patterns, then globs).
    A path that exists is always itself, whatever characters it holds (a folder named
    ``photos[1]`` or ``{a,b}``). A pattern that matches nothing is an error, so a typo never
    silently embeds nothing."""
    source = str(source)
    if os.path.exists(source):
        return [source]
    paths = []
    for pattern in expand_braces(source):
        if os.path.exists(pattern):
            paths.append(pattern)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(_escape_existing_folders(pattern), recursive=True))
            if not matches:
                raise FileNotFoundError(f"The input pattern {pattern!r} matches no file; "
                                        "check the path.")
            paths.extend(matches)
        else:
            raise FileNotFoundError(f"The input {pattern!r} does not exist; check the path.")
    return paths


def _escape_existing_folders(pattern):
    """``pattern`` with its leading folders that exist taken literally: in
    ``photos[1]/*.jpg`` the folder ``photos[1]`` is that folder, not a character class."""
    parts = pattern.split(os.sep)
    existing = 0
    while existing < len(parts) - 1 and os.path.isdir(os.sep.join(parts[:existing + 1]) or os.sep):
        existing += 1
    if existing == 0:
        return pattern
    return os.sep.join([glob.escape(os.sep.join(parts[:existing]))] + parts[existing:])


def folder_items(folder):
    """The items of the image files under ``folder`` (recursive), by extension, in sorted
    order. Other files (captions, json sidecars) are not inputs; a file with an image
    extension that is not an image is an input, and becomes a recorded failure, and so does
    a folder that cannot be listed (the folder itself included)."""
    found = []

    def unreadable(error):
        path = error.filename or folder
        found.append(Item(key=path, image_path=path, error=(
            f"folder not listed: {type(error).__name__}: {error.strerror or error}")))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs.sort()
        found.extend(Item(key=path, image_path=path)
                     for path in (os.path.join(root, name) for name in sorted(files)
                                  if name.lower().endswith(IMAGE_EXTENSIONS)))
    return found


def _relative_to(base_file, path):
    """Paths inside a list or table are relative to the folder that holds it."""
    path = path.strip()
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(base_file), path)


# ---------------------------------------------------------------------------------------
# Tables and text files

def read_column(path, column):
    """The values of ``column`` in a ``.parquet`` or ``.csv`` file, as Python strings."""
    import pyarrow as pa
    try:
        return _read_column(path, column)
    except (pa.ArrowException, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"Cannot read the table {path} ({type(error).__name__}: {error}); "
                         "give a valid .parquet file, or a UTF-8 .csv file with a header "
                         "row.") from error


def _read_column(path, column):
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        names = pq.read_schema(path).names
        if column not in names:
            raise ValueError(f"{path} has no column {column!r}; its columns are {names}. "
                             "Choose one with --image-column / --text-column.")
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    else:
        # utf-8-sig: a CSV saved with a byte-order mark (as spreadsheets do) reads the same.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{path} has no column {column!r}; its columns are "
                                 f"{reader.fieldnames}. Choose one with --image-column / "
                                 "--text-column.")
            values = [row[column] for row in reader]
    return [None if value is None else str(value) for value in values]


def read_lines(path):
    """The lines of a UTF-8 text file, without their line endings."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); convert it, e.g. with "
                         "iconv, or give the texts in a .parquet file.") from error


def image_items(source, image_column, caption_column):
    """``(items, tar_paths)`` of one ``--images`` source."""
    items, tars = [], []
    for path in expand_source(source):
        if os.path.isdir(path):
            items.extend(folder_items(path))
        elif path.endswith(".tar"):
            tars.append(path)
        elif path.endswith(".txt"):
            listed = [_relative_to(path, line) for line in read_lines(path) if line.strip()]
            items.extend(Item(key=p, image_path=p) for p in listed)
        elif path.endswith(TABLE_EXTENSIONS):
            images = read_column(path, image_column)
            captions = (read_column(path, caption_column) if caption_column
                        else [None] * len(images))
            items.extend(Item(key=f"{path}:{row}",
                              image_path=None if image is None else _relative_to(path, image),
                              text=caption)
                         for row, (image, caption) in enumerate(zip(images, captions)))
        else:
            items.append(Item(key=path, image_path=path))
    return items, tars


def text_items(source, text_column):
    """The items of one ``--texts`` source: one per line, or one per table row."""
    items = []
    for path in expand_source(source):
        if path.endswith(TABLE_EXTENSIONS):
            items.extend(Item(key=f"{path}:{row}", text=text)
                         for row, text in enumerate(read_column(path, text_column)))
        elif path.endswith(".txt"):
            items.extend(Item(key=f"{path}:{line}", text=text)
                         for line, text in enumerate(read_lines(path), start=1))
        else:
            raise ValueError(f"Text source {path!r} is not a .txt, .parquet or .csv file; "
                             "give one text per line in a .txt file, or a table column.")
    return items


# ---------------------------------------------------------------------------------------
# The plan

def plan_job(images=(), texts=(), shard_size=100_000, image_column="image_path",
             text_column="caption", embed_captions=False, limit=None):
    """Cut the inputs of one job into chunks (see the module docstring).

    With both ``images`` and ``texts``, the i-th image is paired with the i-th text (same
    count required) and both are embedded into aligned rows. ``embed_captions`` embeds the
    captions that image sources carry (a tar's caption key, a table's ``text_column``).
    """
    if not images and not texts:
        raise ValueError("Nothing to embed: give --images and/or --texts.")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}.")
    items, tars = [], []
    for source in images:
        source_items, source_tars = image_items(
            source, image_column, text_column if embed_captions else None)
        items.extend(source_items)
        tars.extend(source_tars)
    if texts:
        text_list = [item for source in texts for item in text_items(source, text_column)]
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
    return [Item(key=image.key, image_path=image.image_path, text=text.text,
                 error=image.error or text.error)
            for image, text in zip(image_list, text_list)]


def fingerprint(plan):
    """A digest of everything that decides the output's rows, so ``--resume`` can refuse to
    complete a job with different inputs."""
    digest = hashlib.sha256()
    digest.update(json.dumps([plan.embed_images, plan.embed_texts]).encode())
    for chunk in plan.chunks:
        digest.update(json.dumps([chunk.index, chunk.tar_path,
                                  [[i.key, i.image_path, i.text] for i in chunk.items]]
                                 ).encode())
    return digest.hexdigest()


def rank_chunks(chunks, rank, world_size):
    """This rank's chunks: every ``world_size``-th, so ranks are disjoint, together cover
    all chunks once (no padding duplicates) and get similar amounts of work."""
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size}).")
    return [chunk for chunk in chunks if chunk.index % world_size == rank]
