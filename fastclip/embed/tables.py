"""Table inputs, through pyarrow: parquet, Arrow IPC (``.arrow``/``.feather``), CSV, and
the folders Hugging Face ``datasets`` writes with ``save_to_disk``; local or remote.

What an image cell holds is read from its column's type: a string column holds paths or
URLs (relative paths are relative to the table's folder); a binary column holds encoded
images; a struct with ``bytes`` and ``path`` fields (``datasets``' ``Image`` feature) holds
bytes, or, where they are null, a path. Planning reads only the small columns (paths,
captions); image bytes and metadata columns are read by the decoding workers, one row group
or record batch at a time (:class:`TableRows`).
"""

import json
import os
import posixpath

from . import storage

TABLE_EXTENSIONS = (".parquet", ".csv", ".arrow", ".feather")
_HF_STATE = "state.json"


class TableError(ValueError):
    pass


def is_table(path):
    return path.lower().endswith(TABLE_EXTENSIONS)


def _join(folder, name):
    return (posixpath.join if storage.is_url(folder) else os.path.join)(folder, name)


def dataset_folder_files(folder, options=None):
    """The arrow files of a ``datasets`` ``save_to_disk`` folder, or None when ``folder`` is
    not one. A ``DatasetDict`` folder is refused with the names of its splits."""
    def read(name):
        try:
            with storage.open_input(_join(folder, name), options) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise TableError(f"{folder}: cannot read its {name} ({error}).") from None

    state = read(_HF_STATE)
    if state is None:
        splits = read("dataset_dict.json")
        if splits is not None:
            names = splits.get("splits", [])
            raise TableError(f"{folder} is a Hugging Face DatasetDict; give one of its splits "
                             f"({', '.join(_join(folder, s) for s in names)}).")
        return None
    return [_join(folder, entry["filename"]) for entry in state.get("_data_files", [])]


def _arrow_table(path, options):
    """An Arrow IPC file or stream (``datasets`` writes streams), memory-mapped when local."""
    import pyarrow as pa
    if not storage.is_url(path):
        source = pa.memory_map(storage.local_path(path))
    else:
        with storage.open_input(path, options) as f:
            source = pa.BufferReader(f.read())
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def _csv_table(path, options):
    """A CSV file, every column as text (a CSV has no types; "1.50" stays "1.50")."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    parse = pacsv.ParseOptions(newlines_in_values=True)  # quoted captions over lines
    with storage.open_input(path, options) as f:
        header = pacsv.open_csv(f, parse_options=parse).schema.names
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in header})
    with storage.open_input(path, options) as f:
        return pacsv.read_csv(f, parse_options=parse, convert_options=convert)


def _missing_column(path, column, names):
    return TableError(f"{path} has no column {column!r}; its columns are {list(names)}. "
                      "Choose one with --image-column / --text-column.")


class Table:
    """One table input: its schema, its small columns for the plan, its rows for workers."""

    def __init__(self, path, options=None):
        self.path = path
        self.options = options
        self.files = dataset_folder_files(path, options) if not is_table(path) else None
        self._arrow = None
        self._parquet = None
        self._groups = None  # the row groups read last: ((groups, names), table)

    @property
    def kind(self):
        if self.files is not None:
            return "arrow"
        return {".csv": "csv", ".parquet": "parquet"}.get(
            os.path.splitext(self.path.lower())[1], "arrow")

    def _whole(self):
        if self._arrow is None:
            import pyarrow as pa
            if self.kind == "csv":
                self._arrow = _csv_table(self.path, self.options)
            elif self.files is not None:
                self._arrow = pa.concat_tables([_arrow_table(f, self.options)
                                                for f in self.files])
            else:
                self._arrow = _arrow_table(self.path, self.options)
        return self._arrow

    def _parquet_file(self):
        if self._parquet is None:
            import pyarrow.parquet as pq
            self._parquet = pq.ParquetFile(storage.open_input(self.path, self.options))
        return self._parquet

    @property
    def schema(self):
        if self.kind == "parquet":
            return self._parquet_file().schema_arrow
        return self._whole().schema

    @property
    def num_rows(self):
        if self.kind == "parquet":
            return self._parquet_file().metadata.num_rows
        return len(self._whole())

    def check_columns(self, names):
        """Every one of ``names`` is a column, or a struct's field (``column.field``)."""
        for name in names:
            if name not in self.schema.names and name.split(".")[0] not in self.schema.names:
                raise _missing_column(self.path, name, self.schema.names)

    def rows(self, start, stop, names):
        """Rows ``start`` to ``stop`` of the columns ``names``, as a pyarrow table (a
        parquet file's are read from the row groups that hold them, and a struct's field
        alone, without its siblings)."""
        self.check_columns(names)
        if self.kind == "parquet":
            table = self._parquet_rows(start, stop, names)
        else:
            table = self._whole().slice(start, stop - start)
        return _named(table, names)


    def _parquet_rows(self, start, stop, names):
        """Rows of a parquet file read from the row groups that hold them, the last ones
        read kept for the next rows (a worker reads a shard's rows in order)."""
        parquet, groups, first, offset = self._parquet_file(), [], None, 0
        for index in range(parquet.metadata.num_row_groups):
            size = parquet.metadata.row_group(index).num_rows
            if offset + size > start and offset < stop:
                groups.append(index)
                first = offset if first is None else first
            offset += size
        if not groups:
            return parquet.schema_arrow.empty_table()
        key = (tuple(groups), tuple(names))
        if self._groups is None or self._groups[0] != key:
            self._groups = (key, parquet.read_row_groups(groups, columns=list(names)))
        return self._groups[1].slice(start - first, stop - start)


def _named(table, names):
    """``table``'s columns ``names``; a dotted name that is not a column is a struct's
    field (read without the struct's other fields, nulls kept)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    arrays = {}
    for name in names:
        top, _, field = name.partition(".")
        if name in table.column_names or not field:
            column = table.column(name)
        else:
            column = table.column(top)
            column = pc.struct_field(column, field) if len(column) else pa.array(
                [], pa.string())
        arrays[name] = column
    return pa.table(arrays) if arrays else pa.table({"_": pa.array([None] * len(table))})


def read_errors():
    """The errors of reading a table that mean the table is bad, not fastclip."""
    import pyarrow as pa
    return (pa.ArrowException, UnicodeDecodeError, OSError)


_OPEN = {}


def open_table(path, options=None):
    """A :class:`Table`, the last one opened kept for the next call (workers read one
    table's shards one after another) while a local table's file is unchanged."""
    identity = (path, _local_signature(path))
    if _OPEN.get("identity") != identity:
        _OPEN.clear()
        _OPEN.update(identity=identity, table=Table(path, options))
    return _OPEN["table"]


def _local_signature(path):
    if storage.is_url(path):
        return None
    target = os.path.join(path, _HF_STATE) if os.path.isdir(path) else path
    try:
        info = os.stat(target)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


def image_cells(schema, column, path):
    """How the image column ``column`` stores images: ``"path"``, ``"bytes"`` or
    ``"struct"`` (bytes, else a path), from its type; anything else is refused."""
    import pyarrow as pa
    if column not in schema.names:
        raise _missing_column(path, column, schema.names)
    kind = schema.field(column).type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "path"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} >= \
            {"bytes", "path"}:
        return "struct"
    raise TableError(f"The column {column!r} of {path} holds {kind}, not images: give a "
                     "column of paths or URLs (string), of encoded images (binary), or of "
                     "{bytes, path} structs (Hugging Face's Image feature).")


def as_text(values):
    return [None if value is None else str(value) for value in values]


class TableRows:
    """A worker's reader of table rows: the last table opened, and the last run of rows
    read from it, kept for the next inputs (which are usually the rows after)."""

    def __init__(self, options=None, span=256):
        self.options = options
        self.span = span
        self._table = None
        self._rows = None  # (path, names, start, stop, rows as a pyarrow table)

    def row(self, path, index, names):
        """``{name: value}`` of row ``index`` of the table at ``path``."""
        cached = self._rows
        if cached is None or cached[:2] != (path, tuple(names)) or \
                not cached[2] <= index < cached[3]:
            if self._table is None or self._table.path != path:
                self._table = open_table(path, self.options)
            stop = min(index + self.span, self._table.num_rows)
            rows = self._table.rows(index, stop, names)
            cached = self._rows = (path, tuple(names), index, stop, rows)
        return {name: cached[4].column(name)[index - cached[2]].as_py() for name in names}
