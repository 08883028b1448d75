"""Reading images safely: file bytes and decoding.

Every way an image can be bad (missing, empty, not an image, truncated, corrupt, a
decompression bomb) raises :class:`InputError` with a reason that a job records
(``failures.jsonl``) or a command prints. Nothing here may crash a job or hang on one input:
images are size-checked from their header before any pixel is decoded, and files are
size-checked before they are read.
"""

import collections
import io
import os
import stat
import threading
import time
import warnings

# The plugins of ALLOWED_FORMATS are imported, so that PIL registers them (and only them).
from PIL import (  # noqa: F401
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

# PIL's own default bomb limit (about 89 million pixels, 0.25 GiB of RGB at 24 bits).
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MAX_BYTES = 256 << 20
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The only formats PIL may parse: the ones photos and datasets come in. PIL's other plugins
# are never reached (some start external programs, as EPS starts Ghostscript, and the rarer
# parsers are the least tested). PIL's JPEG opener also reads MPO, the multi-picture JPEG of
# many cameras.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# What a refused file most likely is, by its first bytes, to say so in its failure.
_SIGNATURES = (
    (b"%!PS", "PostScript"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop PSD"), (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x00\x0cjP", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
    (b"gimp xcf", "GIMP XCF"), (b"<svg", "SVG"), (b"<?xml", "XML"),
    (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "gzip data"), (b"DDS ", "DDS"),
    (b"qoif", "QOI"), (b"\x59\xa6\x6a\x95", "Sun raster"),
)


class InputError(ValueError):
    """One input could not be used; ``str(error)`` is the reason recorded for it."""


def read_image(path, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES):
    """The decoded PIL image of the file at ``path``."""
    return decode_image(read_file(path, max_bytes), max_pixels)


# Reads that timed out and still block their thread. Past this many, later reads fail at once
# instead of each waiting out its timeout and leaving one more thread blocked.
MAX_STALLED_READS = 8


_STALLED = {"count": 0}
_STALLED_LOCK = threading.Lock()


def read_file(path, max_bytes=DEFAULT_MAX_BYTES, timeout=None, read=None):
    """The bytes of the file at ``path``. With ``timeout`` (seconds), a read that has not
    finished by then (a stalled network or FUSE mount) is this input's failure; the read is
    left to finish or block on a thread of its own, and the caller moves on. ``read(path,
    max_bytes)`` reads other storage than local files (an object store's)."""
    return start_read(path, max_bytes, timeout, read).result()


def start_read(path, max_bytes=DEFAULT_MAX_BYTES, timeout=None, read=None):
    """:func:`read_file`'s read, begun now (with ``timeout``, on the calling thread's read
    worker) and ended by the returned :class:`PendingRead`'s ``result()``, so that a caller
    can read its next inputs while it works on this one. Without a timeout the read happens
    in ``result()``, on the caller's thread."""
    return start_reads([(path, read)], max_bytes, timeout)[0]


def start_reads(requests, max_bytes=DEFAULT_MAX_BYTES, timeout=None):
    """:func:`start_read` for each ``(path, read)`` of ``requests``, handed to the read
    worker together (one wake-up of its thread), to run in this order."""
    reads = [PendingRead(path, max_bytes, timeout, read or _read_file)
             for path, read in requests]
    queued = [read for read in reads if read._outcome is None and timeout is not None]
    if queued:
        _ReadWorker.submit(queued)
    return reads


class PendingRead:
    """One read of :func:`start_reads`. ``result()`` gives its bytes or raises its
    :class:`InputError`. A read is given up on once it has run for ``timeout`` seconds (a
    read begun early has had that head start): it is stalled, its worker is left to it, and
    the reads queued behind it go, in order, to a fresh worker. A read still queued after its
    caller has waited ``timeout`` waits behind another that blocks its worker: that one is
    stalled once it has run for ``timeout``, and this read moves to a fresh worker and is
    waited for once more. ``discard()`` says that the bytes will not be asked for."""

    __slots__ = ("path", "max_bytes", "timeout", "_read_bytes", "_outcome", "_state", "_worker",
                 "_done", "_started")

    def __init__(self, path, max_bytes, timeout, read_bytes):
        self.path, self.max_bytes, self.timeout = path, max_bytes, timeout
        self._read_bytes = read_bytes
        self._outcome = None  # (True, bytes) or (False, exception), once known
        # "queued", then "running" and "done"; "stalled" from when it is given up on while
        # it runs until it returns; "cancelled" if it will never run.
        self._state = "queued"
        self._worker = None
        if path is None:
            self._outcome = (False, InputError("no image path (an empty cell in the table)"))
        elif timeout is not None:
            if _STALLED["count"] >= MAX_STALLED_READS:
                self._outcome = (False, _storage_not_answering())
            else:
                # Held until the read is done (a lock is cheaper to make than an Event);
                # start_reads hands the read to a worker.
                self._done = threading.Lock()
                self._done.acquire()

    def result(self):
        if self._outcome is None:
            if self.timeout is None:
                self._outcome = self._attempt()
            else:
                self._wait()
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    def discard(self):
        """The caller will not ask for the bytes: a read not yet begun never runs."""
        with _STALLED_LOCK:
            if self._state == "queued":
                self._state = "cancelled"
                if self._outcome is None:
                    self._outcome = (False, InputError("not read: discarded"))

    def _wait(self):
        timeout = max(self.timeout, 0)
        for attempt in range(2):
            with _STALLED_LOCK:
                if self._state == "queued" and _STALLED["count"] >= MAX_STALLED_READS:
                    self._cancel(_storage_not_answering())  # no more waits behind stalls
                    return
            deadline = time.monotonic() + timeout
            while True:
                if self._done.acquire(timeout=max(deadline - time.monotonic(), 0)):
                    self._done.release()
                with _STALLED_LOCK:
                    worker, blocker = self._worker, None
                    if self._outcome is None and self._state == "running":
                        blocker = self
                    elif self._outcome is None and self._state == "queued":
                        # Behind a read that blocks the worker (begun ahead, or given up on
                        # by no caller yet): that read is the stalled one.
                        blocker = worker.current
                    # A read is given up on once it has run for the whole timeout.
                    if blocker is not None and blocker._state == "running" and \
                            time.monotonic() < blocker._started + timeout:
                        deadline = blocker._started + timeout
                        continue
                    if blocker is not None and blocker._state == "running":
                        blocker._stall()
                    if self._outcome is None and attempt == 1:
                        self._cancel(InputError(
                            f"the read did not begin within {self.timeout:g} s: earlier "
                            "reads of this process are stalled"))
                    break
            if self._outcome is not None and self._state != "stalled" and \
                    self._state != "cancelled":
                return  # done in time
            worker.abandon()  # blocked: its queued reads go to a fresh worker
            if self._outcome is not None:
                return

    def _stall(self):  # under _STALLED_LOCK: a running read given up on
        self._state = "stalled"
        _STALLED["count"] += 1
        self._outcome = (False, InputError(
            f"the read did not finish within {self.timeout:g} s (a stalled mount?)"))

    def _cancel(self, error):  # under _STALLED_LOCK: a queued read that will never run
        self._state = "cancelled"
        self._outcome = (False, error)

    def _attempt(self):
        try:
            return True, self._read_bytes(self.path, self.max_bytes)
        except BaseException as error:  # handed to the caller's thread by result()
            return False, error

    def run_on(self, worker):
        """Run the read on ``worker``'s thread, unless it has moved or been cancelled."""
        with _STALLED_LOCK:
            if self._state != "queued" or self._worker is not worker:
                return
            self._state = "running"
            self._started = time.monotonic()
            worker.current = self
        outcome = self._attempt()
        with _STALLED_LOCK:
            worker.current = None
            if self._state == "stalled":
                _STALLED["count"] -= 1  # it came back: no longer blocking a thread
            else:
                self._outcome = outcome
            self._state = "done"
        self._done.release()


def _storage_not_answering():
    return InputError(f"not read: {_STALLED['count']} earlier reads of this process are "
                      "still stalled, so the storage is not answering")


class _ReadWorker:
    """The thread that runs one calling thread's timed reads in the order they were begun,
    used again from read to read rather than started for each. A worker blocked by a stalled
    read is abandoned: it ends once that read returns, and the reads still queued on it move
    to the caller's next worker. An idle one ends after a few seconds (its caller then gets a
    new one). A process forked from the caller starts its own."""

    _local = threading.local()
    IDLE_SECONDS = 5

    def __init__(self):
        self._wake = threading.Condition(threading.Lock())  # guards _pending and retired
        self._pending = collections.deque()
        self.retired = False
        self.current = None  # the read running now (under _STALLED_LOCK)
        self._pid = os.getpid()
        self.thread = threading.Thread(target=self._loop, name="fastclip-read", daemon=True)
        self.thread.start()

    @classmethod
    def submit(cls, reads):
        """Queue ``reads`` (:class:`PendingRead`) on this thread's worker, bound to it
        first."""
        while True:
            worker = getattr(cls._local, "worker", None)
            if worker is None or worker._pid != os.getpid():  # a forked child has no thread
                worker = cls._local.worker = cls()
            with worker._wake:
                if not worker.retired:
                    with _STALLED_LOCK:
                        for read in reads:
                            read._worker = worker
                    worker._pending.extend(reads)
                    worker._wake.notify()
                    return
            cls._local.worker = None  # it ended while idle

    def abandon(self):
        """Leave this worker to the read that blocks it; the reads queued on it go, in
        order, to a fresh worker of the calling thread (or fail at once, past
        MAX_STALLED_READS)."""
        if getattr(self._local, "worker", None) is self:
            self._local.worker = None
        with self._wake:
            if self.retired:
                return
            self.retired = True
            queued = list(self._pending)
            self._pending.clear()
            self._wake.notify()  # an idle thread ends now
        with _STALLED_LOCK:
            moving = [read for read in queued if read._state == "queued"]
            if _STALLED["count"] >= MAX_STALLED_READS:
                for read in moving:
                    read._cancel(_storage_not_answering())
                moving = []
        if moving:
            _ReadWorker.submit(moving)

    def _loop(self):
        while True:
            with self._wake:
                while not self._pending and not self.retired:
                    if not self._wake.wait(self.IDLE_SECONDS) and not self._pending:
                        self.retired = True
                if self.retired:
                    return
                read = self._pending.popleft()
            read.run_on(self)
            del read  # its bytes are the caller's now: not kept alive while idle


def _forget_stalled_reads():
    # A forked child has none of its parent's reading threads, stalled or not.
    global _STALLED_LOCK
    _STALLED_LOCK = threading.Lock()
    _STALLED["count"] = 0


os.register_at_fork(after_in_child=_forget_stalled_reads)


def _read_file(path, max_bytes):
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            # A folder, a FIFO or a device named like an image: opening or reading it could
            # block (or, for some devices, act), so it is not opened.
            raise InputError("not a regular file")
        # Opened without blocking and checked again on the open file, so that a FIFO put in
        # its place after the check cannot block the read (O_NONBLOCK changes nothing for
        # files).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb", buffering=0) as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InputError("not a regular file")
            size = info.st_size
            if size > max_bytes:
                raise InputError(f"file of {size} bytes is larger than the {max_bytes}-byte "
                                 "limit")
            return _read_bounded(f, size, max_bytes)
    except OSError as error:
        raise InputError(f"unreadable: {type(error).__name__}: {error}") from error


def _read_bounded(f, size, max_bytes):
    """A file's bytes, at most ``max_bytes`` (more is this input's failure, found before the
    pieces are joined). The size a file system reports may lie (procfs, FUSE, a file still
    growing), so reading goes on to the end; asking for its size first spares allocating the
    limit for every file, as ``read(max_bytes + 1)`` does."""
    chunks, total, want = [], 0, min(size, max_bytes) + 1
    while True:
        chunk = f.read(min(want, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise InputError(f"file holds more than the {max_bytes}-byte limit")
        # Past the size it claimed: small reads until the end shows, then larger pieces.
        want = 64 << 10 if len(chunks) == 1 else max(want, 1 << 20)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def sniff_format(data):
    """A name for the format of ``data`` from its first bytes, or None."""
    head = data[:32]
    if head[4:8] == b"ftyp":
        return f"ISO media ({head[8:12].decode('latin-1').strip()}, e.g. HEIC or AVIF)"
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    return None


def decode_image(data, max_pixels=DEFAULT_MAX_PIXELS):
    """A fully decoded PIL image from encoded bytes, in one of ``ALLOWED_FORMATS``.

    The pixel count is checked from the header, before decoding, so a decompression bomb
    costs nothing; PIL's own bomb warning is raised as an error too. ``load()`` decodes every
    pixel here, so a truncated file fails now rather than later in preprocessing.
    """
    if not data:
        raise InputError("empty file")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # PIL refuses images past its own limit inside Image.open: raise it to the one asked
        # for (the header check below enforces max_pixels).
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(f"decompression bomb: {width}x{height} = {width * height} "
                                 f"pixels is more than the limit of {max_pixels}")
            image.load()
    except InputError:
        raise
    except Image.UnidentifiedImageError:
        found = sniff_format(data)
        raise InputError(
            (f"not an allowed image format (it looks like {found})" if found else
             "not an image in an allowed format") + f"; allowed: {', '.join(ALLOWED_FORMATS)}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(f"decompression bomb: {error}") from None
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, ...
        raise InputError(f"corrupt or truncated image: {type(error).__name__}: {error}") \
            from None
    return image


# ---------------------------------------------------------------------------------------
# JPEGs decoded straight to pixels

# The JPEG colour spaces whose decode to RGB is the same arithmetic in libjpeg-turbo
# (simplejpeg) as in PIL followed by OpenAI's convert("RGB"): YCbCr and grayscale. CMYK and
# YCCK take PIL's path (its own CMYK conversion).
_PLAIN_JPEG = ("YCbCr", "Gray")


def decode_jpeg_pixels(data, max_pixels=DEFAULT_MAX_PIXELS, buffer=None):
    """The ``(H, W, 3)`` uint8 RGB pixels of a plain JPEG, decoded by libjpeg-turbo through
    simplejpeg (no PIL image is made): the same pixels as ``decode_image(data)``
    converted to RGB. None where that is not certain: not a JPEG, another colour space, a
    stream with any damage (simplejpeg's strict mode refuses what libjpeg would only warn
    of), an image over ``max_pixels``, simplejpeg not installed, or not giving Pillow's
    pixels on this machine (:func:`jpeg_agrees_with_pillow`). Then ``decode_image`` decides,
    and reports what is wrong.

    ``buffer`` (a :class:`PixelBuffer`) holds the pixels of images up to its size: memory
    used again is not faulted in again, and the pixels are valid until the buffer's next
    use."""
    if not data.startswith(b"\xff\xd8\xff") or not jpeg_agrees_with_pillow():
        return None
    try:
        # PIL's own parse of the markers must accept the file as it would (it refuses some
        # headers libjpeg only traces), with the same size, as RGB or grayscale.
        header = Image.open(io.BytesIO(data), formats=("JPEG",))
        if header.format != "JPEG" or header.mode not in ("RGB", "L"):
            return None
        import simplejpeg
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in _PLAIN_JPEG or (width, height) != header.size or \
                width * height > max_pixels:
            return None
        out = buffer.get(height * width * 3) if buffer is not None else None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False,
                                      fastupsample=False, strict=True, buffer=out)
    except Exception:  # PIL's and simplejpeg's refusals alike (a KeyError for 4:4:1)
        return None


class PixelBuffer:
    """Memory for decoded pixels, used again from one image to the next (one per thread);
    images over ``limit`` bytes get memory of their own."""

    def __init__(self, limit=48 << 20):
        self.limit = limit
        self.memory = None

    def get(self, size):
        if size > self.limit:
            return None
        if self.memory is None or len(self.memory) < size:
            import numpy as np
            self.memory = np.empty(max(size, 1 << 20), np.uint8)
        return self.memory


_JPEG_CHECK = {}
_JPEG_CHECK_LOCK = threading.Lock()


def jpeg_agrees_with_pillow():
    """Whether simplejpeg is installed and decodes probe JPEGs (4:4:4, 4:2:2 and 4:2:0
    subsampling, progressive, restart markers, grayscale; odd sizes) to exactly the
    pixels of the installed PIL: checked once per process."""
    if "agrees" in _JPEG_CHECK:  # every image asks: no lock once it is known
        return _JPEG_CHECK["agrees"]
    with _JPEG_CHECK_LOCK:
        if "agrees" not in _JPEG_CHECK:
            _JPEG_CHECK["agrees"] = _check_jpeg_decoder()
        return _JPEG_CHECK["agrees"]


def _check_jpeg_decoder():
    try:
        import numpy as np
        import simplejpeg
    except ImportError:
        return False
    rng = np.random.default_rng(0)
    for width, height, mode, options in (
            (67, 45, "RGB", dict(subsampling=0)), (96, 33, "RGB", dict(subsampling=1)),
            (129, 71, "RGB", dict(subsampling=2, progressive=True)),
            (50, 50, "RGB", dict(subsampling=2, restart_marker_blocks=1)),
            (41, 23, "L", {})):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)],
                        -1) + rng.normal(0, 30, (height, width, 3))
        pixels = np.clip(base, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        buffer = io.BytesIO()
        try:
            image.save(buffer, "JPEG", quality=85, **options)
        except (OSError, TypeError, ValueError):  # an option this Pillow lacks
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
        data = buffer.getvalue()
        expected = np.asarray(decode_image(data).convert("RGB"))
        try:
            got = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False,
                                         fastupsample=False, strict=True)
        except ValueError:
            return False
        if got.shape != expected.shape or not np.array_equal(got, expected):
            return False
    return True
