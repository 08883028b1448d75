"""The inputs of one source as segments that can be read again from any place: a list file
(by byte offset), one folder of a tree (by its sorted listing), a table (by row), or items
held in memory. The plan walks every segment once and keeps, for each shard, only where
its inputs begin in which segments and how many there are; the workers read a shard's
inputs again from there. So a list or a folder of ten million entries is planned and
embedded without ever holding every path at once.

A segment's ``iterate()`` yields ``(place, item)``; ``read(place, count)`` gives the
``count`` items from ``place`` on, as ``iterate`` gave them.
"""

import os
import posixpath

from ..images import IMAGE_EXTENSIONS
from . import storage, tables
from .sources import SIDECAR_EXTENSIONS, Item


class StoredSegment:
    """Items held in memory (a remote folder's listing, paired images and texts)."""

    def __init__(self, items):
        self.items = list(items)

    def iterate(self):
        return enumerate(self.items)

    def read(self, place, count):
        return self.items[place:place + count]


class ListSegment:
    """A ``.txt`` file: image paths or URLs (blank lines skipped), or texts (one per line,
    keyed by line number)."""

    def __init__(self, path, texts=False, storage_options=None):
        self.path, self.texts, self.storage_options = path, texts, storage_options
        self.signature = None  # taken as planning reads it
        remote = self._remote = storage.is_url(path)
        folder = posixpath.dirname(path) if remote else os.path.dirname(storage.local_path(path))
        separator = "/" if remote else os.sep
        # What os.path.join(folder, relative) puts before a relative path, once.
        self._prefix = folder + separator if folder and not folder.endswith(separator) \
            else folder

    def _resolve(self, line):
        """A listed path against the list's folder (``storage.join``, for each line)."""
        line = line.strip()
        if line.startswith("/") or ("://" in line and storage.is_plain_url(line)):
            return line
        path = self._prefix + line
        return storage.literal_path(path) if ":" in path and not self._remote else path

    def _item(self, raw, number):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path} is not UTF-8 text (line {number}: {error}); "
                             "convert it, e.g. with iconv, or give the texts in a .parquet "
                             "file.") from None
        line = line[:-1] if line.endswith("\n") else line
        line = line[:-1] if line.endswith("\r") else line
        if self.texts:
            return Item(key=f"{self.path}:{number}", text=line)
        if not line.strip():
            return None
        path = self._resolve(line)
        return Item(key=path, image_path=path)

    def _lines(self, offset=0, number=0):
        # An http(s) server may not answer range requests: the list is streamed from its
        # start, and read up to the offset.
        web = storage.is_url(self.path) and storage.protocol_of(self.path) in ("http", "https")
        with storage.open_input(self.path, self.storage_options,
                                **({"block_size": 0} if web else {})) as f:
            if web:
                skipped = 0
                while skipped < offset:
                    block = f.read(min(1 << 20, offset - skipped))
                    if not block:
                        break
                    skipped += len(block)
            else:
                f.seek(offset)
            for raw in (_streamed_lines(f) if web else f):
                number += 1
                yield offset, number, raw
                offset += len(raw)

    def iterate(self):
        self.signature = storage.signature(self.path, self.storage_options)
        for offset, number, raw in self._lines():
            item = self._item(raw, number)
            if item is not None:
                yield (offset, number - 1), item

    def read(self, place, count):
        _unchanged(self, "list")
        items = []
        for _, number, raw in self._lines(*place):
            item = self._item(raw, number)
            if item is not None:
                items.append(item)
                if len(items) == count:
                    break
        return items


def _streamed_lines(f, block_size=1 << 20):
    """The lines of a stream that cannot seek (which ``readline`` of fsspec's files
    needs), each with its ``\n``."""
    pending = b""
    while block := f.read(block_size):
        pending += block
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            yield pending[start:end + 1]
            start = end + 1
        pending = pending[start:]
    if pending:
        yield pending


def _unchanged(segment, kind):
    """Refuse to read a list or a table again if it is not the file that was planned."""
    if segment.signature is not None and \
            storage.signature(segment.path, segment.storage_options) != segment.signature:
        raise ValueError(f"the {kind} {segment.path} changed since the job was planned; "
                         "plan the job again (a new output folder)")


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


def _folder_images(folder, files, join):
    sidecars = _sidecars(folder, files, join)
    return [Item(key=join(folder, name), image_path=join(folder, name), sidecars=sidecars[name])
            for name in sorted(files) if name.lower().endswith(IMAGE_EXTENSIONS)]


class FolderSegment:
    """The image files of one folder of a tree (not its subfolders), in sorted order. The
    plan lists it once; a worker lists it again to read its part."""

    def __init__(self, folder, files=None):
        self.folder = folder
        self._files = files  # the listing of the walk, dropped once iterated

    def iterate(self):
        files, self._files = self._files, None
        return enumerate(_folder_images(self.folder, files or self._listing(), os.path.join))

    def _listing(self):
        with os.scandir(self.folder) as entries:  # os.walk's files: what is not a folder
            return [entry.name for entry in entries if not entry.is_dir()]

    def read(self, place, count):
        try:
            items = _folder_images(self.folder, self._listing(), os.path.join)
        except OSError as error:
            items = []
            reason = f"folder not listed: {type(error).__name__}: {error.strerror or error}"
        else:
            reason = "the folder changed since the job was planned; plan it again"
        items = items[place:place + count]
        missing = count - len(items)
        return items + [Item(key=f"{self.folder}#{place + len(items) + i}",
                             image_path=self.folder, error=reason) for i in range(missing)]


def folder_segments(folder):
    """The segments of the image files under ``folder`` (recursive, sorted, like
    ``os.walk`` with sorted folders); a folder that cannot be listed is a failed item."""
    failed = []

    def unreadable(error):
        path = error.filename or folder
        failed.append(Item(key=path, image_path=path, error=(
            f"folder not listed: {type(error).__name__}: {error.strerror or error}")))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        if failed:
            yield StoredSegment(failed)
            failed = []
        dirs.sort()
        yield FolderSegment(root, files)
    if failed:
        yield StoredSegment(failed)


def remote_folder_items(url, storage_options):
    """The items of the image objects under the remote folder ``url``, with their
    sidecars, in sorted order (a store's listing comes whole)."""
    listed = storage.remote_files(url, IMAGE_EXTENSIONS + SIDECAR_EXTENSIONS, storage_options)
    by_folder = {}
    for path in listed:
        folder, _, name = path.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    sidecars = {folder: _sidecars(folder, names, posixpath.join)
                for folder, names in by_folder.items()}
    items = []
    for path in listed:  # the store's sorted order, as a local folder's paths sort
        folder, _, name = path.rpartition("/")
        if name.lower().endswith(IMAGE_EXTENSIONS):
            items.append(Item(key=path, image_path=path, sidecars=sidecars[folder][name]))
    return items


class TableSegment:
    """The rows of a table: an image path per row (a string column) or the cell itself
    (bytes or a ``{bytes, path}`` struct, read by the workers), and the caption."""

    def __init__(self, path, image_column=None, caption_column=None, storage_options=None,
                 text_column=None):
        self.path, self.storage_options = path, storage_options
        self.image_column, self.caption_column = image_column, caption_column
        self.text_column = text_column  # a --texts table: the texts alone
        self.signature = None if os.path.isdir(path) or storage.is_url(path) and \
            storage.remote_isdir(path, storage_options) else \
            storage.signature(path, storage_options)
        try:
            table = tables.open_table(path, storage_options)  # the one iterate reads
            self.cells = (tables.image_cells(table.schema, image_column, path)
                          if image_column else None)
            self.count = table.num_rows
            self.columns = self._columns()
            table.check_columns(self.columns)
        except tables.TableError:
            raise
        except tables.read_errors() as error:
            raise _unreadable_table(path, error) from error

    def _columns(self):
        if self.text_column:
            return [self.text_column]
        image = {"path": [self.image_column], "bytes": [],
                 "struct": [f"{self.image_column}.path"]}[self.cells]
        return image + ([self.caption_column] if self.caption_column else [])

    def _items(self, rows, first):
        count = len(rows) if rows is not None else 0
        values = {name: tables.as_text(rows.column(name).to_pylist()) for name in self.columns}
        items = []
        for i in range(count):
            row, key = first + i, f"{self.path}:{first + i}"
            if self.text_column:
                items.append(Item(key=key, text=values[self.text_column][i]))
                continue
            caption = values[self.caption_column][i] if self.caption_column else None
            if self.cells == "path":
                image = values[self.image_column][i]
                items.append(Item(key=key, image_path=None if image is None else
                                  storage.join(self.path, image), text=caption,
                                  table=self.path, row=row))
            else:  # the image is the cell; image_path is its recorded name
                name = values.get(f"{self.image_column}.path", [None] * count)[i]
                items.append(Item(key=key, image_path=name or key, text=caption,
                                  table=self.path, row=row, image_cell=self.image_column))
        return items

    def _rows(self, start, stop):
        import pyarrow as pa
        if not self.columns:
            return pa.table({"row": pa.array(range(start, stop))})
        try:
            return tables.open_table(self.path, self.storage_options).rows(
                start, stop, self.columns)
        except tables.read_errors() as error:
            raise _unreadable_table(self.path, error) from error

    def iterate(self, span=1 << 16):
        for start in range(0, self.count, span):
            stop = min(start + span, self.count)
            yield from enumerate(self._items(self._rows(start, stop), start), start)

    def read(self, place, count):
        _unchanged(self, "table")
        return self._items(self._rows(place, min(place + count, self.count)), place)


def _unreadable_table(path, error):
    return ValueError(f"Cannot read the table {path} ({type(error).__name__}: {error}); "
                      "give a valid .parquet or .arrow file, or a UTF-8 .csv file with a "
                      "header row.")
