"""The inputs one command-line source names: folders, lists, tar shards and tables,
local or remote, listed into :class:`Item` (see ``plan`` for how they become shards)."""

import glob
import os
from dataclasses import dataclass

from . import storage, tables

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SIDECAR_EXTENSIONS = (".txt", ".json")


@dataclass(frozen=True)
class Item:
    """One input of a file or table source: its unique key, and its image path, text or
    both (a pair from the same row, or from an image list and a text list zipped)."""
    key: str
    image_path: str = None
    text: str = None
    error: str = None  # why this input is a failure before it is read (a listing's gap)
    table: str = None  # the table and row the input comes from
    row: int = None
    image_cell: str = None  # the column whose cell is the image (bytes or a struct)
    sidecars: tuple = ()  # (extension, path) of the .txt/.json beside a folder's image


# ---------------------------------------------------------------------------------------
# Paths, globs and brace patterns

def expand_braces(pattern):
    """All strings a brace pattern stands for: ``{00000..00099}`` (a zero-padded integer
    range, inclusive) and ``{a,b,c}`` (alternatives), as in WebDataset and the shell
    (braceexpand's rules)."""
    from braceexpand import braceexpand
    return list(braceexpand(pattern, escape=False))


def expand_source(source, storage_options=None):
    """The sorted paths one command-line source names (brace patterns, then globs).
    A path that exists is always itself, whatever characters it holds (a folder named
    ``photos[1]`` or ``{a,b}``). A pattern that matches nothing is an error, so a typo never
    silently embeds nothing. URLs are expanded in their store; ``pipe:COMMAND`` is brace-
    expanded into one command per shard, as WebDataset expands it."""
    source = str(source)
    if storage.is_pipe(source):
        return expand_braces(source)
    if storage.is_url(source):
        if storage.remote_exists(source, storage_options):
            return [source]
        return [path for pattern in expand_braces(source)
                for path in storage.expand_remote(pattern, storage_options)]
    return [storage.literal_path(path) for path in _expand_local(storage.local_path(source))]


def _expand_local(source):
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


def is_folder(path, storage_options=None):
    if storage.is_url(path):
        return storage.remote_isdir(path, storage_options)
    return os.path.isdir(path)


def _is_dataset_folder(path, storage_options):
    return is_folder(path, storage_options) and \
        tables.dataset_folder_files(path, storage_options) is not None


def image_paths(source, storage_options=None):
    """``(kind, path)`` of what one ``--images`` source names, in order: ``"tar"`` for a tar
    shard, ``"listed"`` for a folder, a list, a table or an image file."""
    return [("tar" if storage.is_pipe(path) or path.lower().endswith(TAR_EXTENSIONS)
             else "listed", path) for path in expand_source(source, storage_options)]


def image_segments(path, image_column, caption_column, storage_options=None):
    """The segments (``segments``) of one listed image path, made as they are reached (a
    folder tree is walked as the plan reads it)."""
    from . import segments
    if is_folder(path, storage_options):
        if tables.dataset_folder_files(path, storage_options) is not None:
            yield segments.TableSegment(path, image_column, caption_column, storage_options)
        elif storage.is_url(path):
            yield segments.StoredSegment(segments.remote_folder_items(path, storage_options))
        else:
            yield from segments.folder_segments(path)
    elif path.endswith(".txt"):
        yield segments.ListSegment(path, storage_options=storage_options)
    elif tables.is_table(path):
        yield segments.TableSegment(path, image_column, caption_column, storage_options)
    else:
        yield segments.StoredSegment([Item(key=path, image_path=path)])


def text_segments(source, text_column, storage_options=None):
    """The segments of one ``--texts`` source: one item per line, or per table row."""
    from . import segments
    for path in expand_source(source, storage_options):
        if tables.is_table(path) or _is_dataset_folder(path, storage_options):
            yield segments.TableSegment(path, text_column=text_column,
                                        storage_options=storage_options)
        elif path.endswith(".txt"):
            yield segments.ListSegment(path, texts=True, storage_options=storage_options)
        else:
            raise ValueError(f"Text source {path!r} is not a .txt, .parquet, .arrow or .csv "
                             "file; give one text per line in a .txt file, or a table column.")


def segment_items(segment):
    return [item for _, item in segment.iterate()]


def read_column(path, column, storage_options=None):
    """The values of ``column`` of a table (parquet, Arrow, CSV, a ``datasets`` folder), as
    Python strings."""
    from .segments import TableSegment
    return [item.text for item in segment_items(
        TableSegment(path, text_column=column, storage_options=storage_options))]
