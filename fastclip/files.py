"""Writing files so that no reader ever sees half of one."""

import errno
import os
import uuid

# Every temporary file fastclip writes has this in its name, so a killed run's leftovers can
# be told from complete files.
TEMPORARY_TAG = ".tmp-"


def atomic_write(path, write, durable=True):
    """Call ``write(file)`` on a new temporary file beside ``path``, then rename it onto
    ``path`` (atomic on POSIX file systems). If ``write`` raises, ``path`` is untouched and the
    temporary file is removed. ``durable`` flushes the file to disk before the rename, so a
    crash right after it cannot leave an empty file under the final name.

    The temporary name is unique to the call (concurrent writers never share one), and the
    file gets the permissions of any new file (the umask's), not a private mode."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}{TEMPORARY_TAG}{os.getpid()}-{uuid.uuid4().hex}")
    try:
        with open(temporary, "xb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if error.filename in (None, temporary):  # say which file could not be written
            raise OSError(error.errno, error.strerror or str(error), os.fspath(path)) from error
        raise
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


def is_temporary(name):
    """Whether the file name ``name`` is one of :func:`atomic_write`'s temporary files (or of
    the ``name.tmp-PID`` files that earlier versions wrote)."""
    return TEMPORARY_TAG in name


_CAUSES = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
    errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder", errno.ENOENT: "no such file or folder",
}


def describe_os_error(error, path=None):
    """One line that names the path and the cause of an OSError: "cannot write
    out/img_emb/img_emb_0.npy: no space left on the device"."""
    cause = _CAUSES.get(getattr(error, "errno", None)) or error.strerror or str(error)
    where = getattr(error, "filename", None) or path
    return f"{where}: {cause}" if where else cause
