"""Where a job's inputs and outputs live.

Local paths go through the ``os`` module, with its guarantees (atomic renames, no pattern
made of a path that exists). A URL (``s3://``, ``gs://``, ``az://``, ``hf://``,
``http(s)://``, ``memory://``, any fsspec protocol or chain) goes through fsspec, with the
credentials and endpoints of the ecosystem: environment variables such as
``AWS_ENDPOINT_URL``, fsspec's configuration, and the job's ``storage_options``: one dict
for every protocol, or ``{"s3": {...}, "gs": {...}}`` by protocol. ``pipe:COMMAND`` is a tar
source read from a command's standard output, as WebDataset has it; only a source the user
names is ever one, never a path read from a list or a table.
"""

import io
import os
import posixpath
import re
import signal
import subprocess
import threading

from ..images import InputError

PIPE = "pipe:"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)")


class StorageError(ValueError):
    """A location that cannot be used: unknown scheme, missing package, unreachable store.
    The message names the location and what to do."""


def is_url(path):
    """Whether ``path`` is read through fsspec (``file://`` is a local path)."""
    return bool(_URL.match(path)) and not path.startswith("file://")


def is_pipe(path):
    return path.startswith(PIPE)


def local_path(path):
    return path[len("file://"):] if path.startswith("file://") else path


def protocol_of(url):
    return url.split("::")[-1].split("://")[0].lower() if "://" in url else url.split("::")[0]


def _options_for(url, options):
    """The storage options of ``url``'s protocol: by protocol when the dict is keyed so."""
    if not options:
        return {}
    import fsspec
    keyed = {key for key in options if key in fsspec.available_protocols()}
    if keyed and keyed == set(options):
        return dict(options.get(protocol_of(url), {}))
    return dict(options)


def filesystem(url, options=None):
    """``(fs, path)`` of a URL, or a :class:`StorageError` that says what is missing."""
    import fsspec
    protocol = protocol_of(url)
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise StorageError(
            f"{url}: unknown storage scheme {protocol}://; give a local path or a URL of one "
            f"of fsspec's protocols (s3, gs, az, hf, http, https, ...).") from None
    except ImportError as error:
        raise StorageError(f"{url}: reading {protocol}:// needs a package that is not "
                           f"installed ({error}); pip install it.") from None
    try:
        return fsspec.core.url_to_fs(url, **_options_for(url, options))
    except ImportError as error:  # a chained protocol's package
        raise StorageError(f"{url}: a package this URL needs is not installed ({error}); "
                           "pip install it.") from None
    except (TypeError, ValueError) as error:
        raise StorageError(f"{url}: the storage options do not suit this store "
                           f"({type(error).__name__}: {error}); check --storage-options.") \
            from None


def unreachable(url, error):
    """The StorageError of a store that did not answer or refused the request."""
    return StorageError(f"Cannot reach {url}: {type(error).__name__}: {error}. Check the "
                        "URL, the credentials and the endpoint (AWS_ENDPOINT_URL, "
                        "--storage-options).")


def is_plain_url(path):
    """A URL of one store (``scheme://...``), not a chain (``simplecache::s3://...``, which
    may copy a whole object to a local cache): the only URLs read from lists and tables."""
    return "::" not in path and is_url(path)


def join(base, relative):
    """``relative`` (a path in a list or a table) against the folder of ``base``; a plain
    URL or an absolute path stays itself. Anything else is a path in that folder (a
    ``pipe:`` or a chained URL written in a list is a file name there, never run)."""
    relative = relative.strip()
    if is_plain_url(relative) or os.path.isabs(relative):
        return relative
    if is_url(base):
        return posixpath.join(posixpath.dirname(base), relative)
    return literal_path(os.path.join(os.path.dirname(local_path(base)), relative))


def literal_path(path):
    """A local path that would read as a pipe or a URL (a file named ``pipe:x.tar``, a list
    line ``simplecache::https://...``) made plainly a path: only what the user typed is
    ever a command or a URL."""
    if is_pipe(path) or is_url(path):
        return os.path.join(os.curdir, path)
    return path


def signature(path, options=None):
    """What says that a list or a table is still the file it was when planned: its size
    and modification time (an object's ETag where the store has one)."""
    if not is_url(path):
        info = os.stat(local_path(path))
        return info.st_size, info.st_mtime_ns
    fs, remote = filesystem(path, options)
    info = fs.info(remote)
    return info.get("size"), str(info.get("ETag") or info.get("LastModified") or
                                 info.get("mtime") or "")


def _ask(url, options, question):
    """``question(fs, path)`` of the store of ``url``; its client's errors are
    :func:`unreachable`'s."""
    fs, path = filesystem(url, options)
    try:
        return question(fs, path)
    except Exception as error:
        raise unreachable(url, error) from None


def remote_exists(url, options=None):
    return _ask(url, options, lambda fs, path: fs.exists(path))


def read_remote(url, max_bytes, options=None):
    """The bytes of the object at ``url``, at most ``max_bytes`` (see ``images.read_file``)."""
    try:
        fs, path = filesystem(url, options)
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except StorageError as error:
        raise InputError(str(error)) from None
    except Exception as error:  # missing, permissions, timeouts, the client's own errors
        raise InputError(f"unreadable: {type(error).__name__}: {error}") from None
    if len(data) > max_bytes:
        raise InputError(f"object holds more than the {max_bytes}-byte limit")
    return data


class _PipeStream(io.RawIOBase):
    """The standard output of ``pipe:COMMAND``; closing it ends the command (its whole
    process group), and a command that failed is an error when its output ends. Its
    standard error is drained as it comes (a full pipe would stall the command), keeping
    the last 2,000 bytes for the message."""

    def __init__(self, command):
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True)
        self.errors = b""
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()

    def _drain(self):
        for chunk in iter(lambda: self.process.stderr.read1(65536), b""):
            self.errors = (self.errors + chunk)[-2000:]

    def readable(self):
        return True

    def readinto(self, buffer):
        count = self.process.stdout.readinto(buffer)
        if count == 0:
            status = self.process.wait()
            self.drain.join(timeout=5)
            if status != 0:
                detail = self.errors.decode(errors="replace").strip()
                raise OSError(f"the command {self.command!r} exited with status {status}"
                              + (f": {detail}" if detail else ""))
        return count

    def close(self):
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.process.stdout.close()
        self.drain.join(timeout=5)
        self.process.stderr.close()
        super().close()


def open_stream(source, options=None):
    """``(file, size)``: a binary stream of a tar source read front to back, and its size in
    bytes when the store knows it (None for a pipe). A remote shard is read in blocks as
    it is consumed, never downloaded whole first."""
    if is_pipe(source):
        return io.BufferedReader(_PipeStream(source[len(PIPE):]), 1 << 20), None
    if not is_url(source):
        path = local_path(source)
        return open(path, "rb"), os.path.getsize(path)
    fs, path = filesystem(source, options)
    size = fs.size(path)
    return io.BufferedReader(fs.open(path, "rb", block_size=8 << 20), 1 << 20), size


def expand_remote(pattern, options=None):
    """The sorted URLs a remote source names: itself when it exists, else the glob's
    matches. Brace patterns are expanded before (``plan.expand_source``)."""
    fs, path = filesystem(pattern, options)
    try:
        if fs.exists(path):
            return [pattern]
        import glob
        # An http(s) URL is one object: a ? or a * in it is part of its name or its query.
        if glob.has_magic(path) and protocol_of(pattern) not in ("http", "https"):
            matches = sorted(fs.glob(path))
            if matches:
                return [_unstrip(fs, pattern, match) for match in matches]
            raise FileNotFoundError(f"The input pattern {pattern!r} matches no object; "
                                    "check the URL.")
    except FileNotFoundError:
        raise
    except Exception as error:
        raise unreachable(pattern, error) from None
    raise FileNotFoundError(f"The input {pattern!r} does not exist; check the URL.")


def _unstrip(fs, pattern, path):
    """The URL of ``path`` in the filesystem of ``pattern``, with the pattern's chain."""
    url = fs.unstrip_protocol(path)
    if "::" in pattern:
        url = "::".join(pattern.split("::")[:-1] + [url])
    return url


def remote_isdir(url, options=None):
    return _ask(url, options, lambda fs, path: fs.isdir(path))


def remote_files(url, extensions, options=None):
    """The sorted URLs of the files under the remote folder ``url`` with one of
    ``extensions`` (recursive)."""
    fs, path = filesystem(url, options)
    try:
        found = fs.find(path)
    except Exception as error:
        raise unreachable(url, error) from None
    return [_unstrip(fs, url, name) for name in sorted(found)
            if name.lower().endswith(extensions)]


def open_input(path, options=None, mode="rb", **open_options):
    """A file object of a list or a table, local or remote (``open_options`` go to the
    store's ``open``)."""
    if not is_url(path):
        return open(local_path(path), mode)
    fs, remote = filesystem(path, options)
    return fs.open(remote, mode, **open_options)


# ---------------------------------------------------------------------------------------
# The output folder's files

class LocalFolder:
    """Files of an output folder on a local file system: written under a temporary name
    and renamed into place (``files.atomic_write``)."""
    remote = False

    def __init__(self, root):
        self.root = local_path(root)

    @staticmethod
    def join(*parts):
        return os.path.join(*parts)

    @staticmethod
    def write(path, write):
        from ..files import atomic_write
        atomic_write(path, write)

    @staticmethod
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    @staticmethod
    def exists(path):
        return os.path.exists(path)

    @staticmethod
    def listdir(folder):
        return os.listdir(folder) if os.path.isdir(folder) else []

    @staticmethod
    def makedirs(folder):
        os.makedirs(folder, exist_ok=True)

    @staticmethod
    def remove(path):
        if os.path.lexists(path):
            os.remove(path)


class RemoteFolder:
    """Files of an output folder in an object store (or any fsspec file system). Each file
    is one upload of its whole content, which an object store makes visible at once or not
    at all; there is no rename, so nothing is ever half written under a final name."""
    remote = True

    def __init__(self, root, options=None):
        self.root = root.rstrip("/")
        self.fs, self.base = filesystem(self.root, options)
        self.base = self.base.rstrip("/")

    @staticmethod
    def join(*parts):
        return posixpath.join(*parts)

    def _path(self, url):
        if url == self.root or url.startswith(self.root + "/"):
            return self.base + url[len(self.root):]
        raise ValueError(f"{url} is outside the output folder {self.root}")

    def write(self, url, write):
        buffer = io.BytesIO()
        write(buffer)
        self.fs.pipe_file(self._path(url), buffer.getvalue())

    def read(self, url):
        return self.fs.cat_file(self._path(url))

    def exists(self, url):
        return self.fs.exists(self._path(url))

    def isfile(self, url):
        return self.fs.isfile(self._path(url))

    def listdir(self, url):
        path = self._path(url)
        self.fs.invalidate_cache(path)  # another process may have written since
        try:
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def makedirs(self, url):
        self.fs.makedirs(self._path(url), exist_ok=True)

    def remove(self, url):
        path = self._path(url)
        if self.fs.exists(path):
            self.fs.rm_file(path)


def output_files(root, options=None):
    """The file access of the output folder ``root``: local, or through fsspec."""
    return RemoteFolder(root, options) if is_url(root) else LocalFolder(root)
