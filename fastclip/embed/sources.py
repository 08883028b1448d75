"""The inputs one command-line source names: folders, lists, tar shards and tables,
local or remote, listed into :class:`Item` (see ``plan`` for how they become shards)."""

import glob
import os
import posixpath
from dataclasses import dataclass

from ..images import IMAGE_EXTENSIONS
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
    silently embeds nothing. URLs are expanded in their store; ``pipe:COMMAND`` is itself."""
    source = str(source)
    if storage.is_pipe(source):
        return [source]
    if storage.is_url(source):
        return [path for pattern in expand_braces(source)
                for path in storage.expand_remote(pattern, storage_options)]
    source = storage.local_path(source)
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


def _sidecars(folder, names, join):
    """``{image name: ((extension, path), ...)}``: the ``.txt`` and ``.json`` files beside
    each image with the same stem (img2dataset's layout: ``00000/000000001.jpg`` beside
    ``000000001.txt`` and ``000000001.json``)."""
    stems = {}
    for name in names:
        stem, extension = os.path.splitext(name)
        if extension.lower() in SIDECAR_EXTENSIONS:
            stems.setdefault(stem, []).append((extension[1:].lower(), join(folder, name)))
    return {name: tuple(stems.get(os.path.splitext(name)[0], ())) for name in names}


def folder_items(folder):
    """The items of the image files under ``folder`` (recursive), by extension, in sorted
    order. Other files (captions, json sidecars) are not inputs, but the ``.txt``/``.json``
    beside an image are its sidecars; a file with an image extension that is not an image
    is an input, and becomes a recorded failure, and so does a folder that cannot be listed
    (the folder itself included)."""
    found = []

    def unreadable(error):
        path = error.filename or folder
        found.append(Item(key=path, image_path=path, error=(
            f"folder not listed: {type(error).__name__}: {error.strerror or error}")))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs.sort()
        sidecars = _sidecars(root, files, os.path.join)
        found.extend(Item(key=os.path.join(root, name), image_path=os.path.join(root, name),
                          sidecars=sidecars[name])
                     for name in sorted(files) if name.lower().endswith(IMAGE_EXTENSIONS))
    return found


def remote_folder_items(url, storage_options):
    """The items of the image objects under the remote folder ``url``, with their
    sidecars, in sorted order."""
    listed = storage.remote_files(url, IMAGE_EXTENSIONS + SIDECAR_EXTENSIONS, storage_options)
    by_folder = {}
    for path in listed:
        folder, _, name = path.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    items = []
    for path in listed:
        folder, _, name = path.rpartition("/")
        if name.lower().endswith(IMAGE_EXTENSIONS):
            sidecars = _sidecars(folder, [name] + [n for n in by_folder[folder]
                                                   if n.lower().endswith(SIDECAR_EXTENSIONS)],
                                 posixpath.join)
            items.append(Item(key=path, image_path=path, sidecars=sidecars[name]))
    return items


# ---------------------------------------------------------------------------------------
# Tables and text files

def _table_errors():
    import pyarrow as pa
    return (pa.ArrowException, UnicodeDecodeError, OSError, tables.TableError)


def read_column(path, column, storage_options=None):
    """The values of ``column`` of a table (parquet, Arrow, CSV, a ``datasets`` folder), as
    Python strings."""
    try:
        table = tables.Table(path, storage_options)
        return tables.as_text(table.columns([column]).column(0).to_pylist())
    except tables.TableError:
        raise
    except _table_errors() as error:
        raise ValueError(f"Cannot read the table {path} ({type(error).__name__}: {error}); "
                         "give a valid .parquet or .arrow file, or a UTF-8 .csv file with a "
                         "header row.") from error


def read_lines(path, storage_options=None):
    """The lines of a UTF-8 text file, without their line endings."""
    try:
        with storage.open_input(path, storage_options) as f:
            return f.read().decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); convert it, e.g. with "
                         "iconv, or give the texts in a .parquet file.") from error


def table_items(path, image_column, caption_column, storage_options=None):
    """The items of a table's rows: an image path (a string column), or the cell itself
    (bytes or a ``{bytes, path}`` struct), read by the workers."""
    try:
        table = tables.Table(path, storage_options)
        cells = tables.image_cells(table.schema, image_column, path)
        wanted = {"path": [image_column], "bytes": [], "struct": [f"{image_column}.path"]}
        wanted = wanted[cells] + ([caption_column] if caption_column else [])
        read = table.columns(wanted) if wanted else None
        count = table.num_rows
    except tables.TableError:
        raise
    except _table_errors() as error:
        raise ValueError(f"Cannot read the table {path} ({type(error).__name__}: {error}); "
                         "give a valid .parquet or .arrow file, or a UTF-8 .csv file with a "
                         "header row.") from error
    images = tables.as_text(read.column(0).to_pylist()) if cells != "bytes" else [None] * count
    captions = (tables.as_text(read.column(len(wanted) - 1).to_pylist()) if caption_column
                else [None] * count)
    items = []
    for row, (image, caption) in enumerate(zip(images, captions)):
        key = f"{path}:{row}"
        if cells == "path":
            items.append(Item(key=key, image_path=None if image is None
                              else storage.join(path, image), text=caption, table=path, row=row))
        else:  # the image is the cell; image_path is its recorded name
            items.append(Item(key=key, image_path=image or key, text=caption, table=path,
                              row=row, image_cell=image_column))
    return items


def image_items(source, image_column, caption_column, storage_options=None):
    """``(items, tar_paths)`` of one ``--images`` source."""
    items, tars = [], []
    for path in expand_source(source, storage_options):
        remote = storage.is_url(path)
        if storage.is_pipe(path) or path.lower().endswith(TAR_EXTENSIONS):
            tars.append(path)
        elif is_folder(path, storage_options):
            if tables.dataset_folder_files(path, storage_options) is not None:
                items.extend(table_items(path, image_column, caption_column, storage_options))
            else:
                items.extend(remote_folder_items(path, storage_options) if remote
                             else folder_items(path))
        elif path.endswith(".txt"):
            listed = [storage.join(path, line) for line in read_lines(path, storage_options)
                      if line.strip()]
            items.extend(Item(key=p, image_path=p) for p in listed)
        elif tables.is_table(path):
            items.extend(table_items(path, image_column, caption_column, storage_options))
        else:
            items.append(Item(key=path, image_path=path))
    return items, tars


def is_folder(path, storage_options=None):
    if storage.is_url(path):
        return storage.remote_isdir(path, storage_options)
    return os.path.isdir(path)


def text_items(source, text_column, storage_options=None):
    """The items of one ``--texts`` source: one per line, or one per table row."""
    items = []
    for path in expand_source(source, storage_options):
        if tables.is_table(path) or (is_folder(path, storage_options) and
                                     tables.dataset_folder_files(path, storage_options)):
            items.extend(Item(key=f"{path}:{row}", text=text) for row, text in
                         enumerate(read_column(path, text_column, storage_options)))
        elif path.endswith(".txt"):
            items.extend(Item(key=f"{path}:{line}", text=text)
                         for line, text in enumerate(read_lines(path, storage_options), start=1))
        else:
            raise ValueError(f"Text source {path!r} is not a .txt, .parquet, .arrow or .csv "
                             "file; give one text per line in a .txt file, or a table column.")
    return items
