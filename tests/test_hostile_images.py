"""Images fastclip did not make: no external program starts, no rare parser runs, and each
bad one, however it is bad, ends as that input's recorded failure."""

import os
import textwrap

import pytest

from fastclip.embed import embed

from embed_helpers import run_python

POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\n"


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A ``gs`` first on PATH that records that it ran."""
    folder = tmp_path / "bin"
    folder.mkdir()
    marker = tmp_path / "gs-ran"
    gs = folder / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return marker


def test_postscript_would_start_ghostscript_in_plain_pil(tmp_path, fake_ghostscript):
    (tmp_path / "photo.jpg").write_bytes(POSTSCRIPT)
    run_python(tmp_path, textwrap.dedent(f"""
        from PIL import Image
        try:
            Image.open({str(tmp_path / "photo.jpg")!r}).load()
        except Exception:
            pass
    """))
    assert fake_ghostscript.exists()  # the attack is real: PIL ran the gs it found


def test_postscript_named_jpg_is_a_failure_and_starts_no_program(tmp_path, fake_ghostscript):
    from embed_helpers import image_bytes, read_failures

    images = tmp_path / "images"
    images.mkdir()
    (images / "photo.jpg").write_bytes(POSTSCRIPT)
    (images / "good.jpg").write_bytes(image_bytes(0))
    summary = embed(str(tmp_path / "out"), images=[str(images)], model="random:tiny",
                    num_workers=0, progress=False)
    assert summary["rows"] == 1 and summary["failures"] == 1
    reason = read_failures(tmp_path / "out")[str(images / "photo.jpg")]
    assert "looks like PostScript" in reason and "allowed: JPEG" in reason
    assert not fake_ghostscript.exists()


@pytest.mark.parametrize("data, named", [(b"%PDF-1.7\n...", "PDF"), (b"8BPS\x00\x01", "PSD"),
                                         (b"\x00\x00\x00\x1cftypheic\x00\x00", "HEIC")])
def test_refused_formats_name_what_they_look_like(data, named):
    from fastclip.images import InputError, decode_image
    with pytest.raises(InputError, match=named):
        decode_image(data)


@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_allowed_format_decodes(format):
    from fastclip.images import decode_image

    from embed_helpers import image_bytes
    assert decode_image(image_bytes(0, size=(30, 20), format=format)).size == (30, 20)


def test_an_extreme_aspect_ratio_is_a_failure_and_the_job_completes(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from embed_helpers import image_bytes, read_failures

    images = tmp_path / "images"
    images.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 400_000), np.uint8), "L").save(buffer, "PNG")
    assert len(buffer.getvalue()) < 4000  # a tiny file, well under the pixel limit as it is
    (images / "strip.png").write_bytes(buffer.getvalue())
    (images / "good.jpg").write_bytes(image_bytes(0))
    for workers in (0, 1):
        out = tmp_path / f"out{workers}"
        summary = embed(str(out), images=[str(images)], model="random:tiny",
                        num_workers=workers, progress=False)
        assert summary["rows"] == 1 and summary["manifest"] is not None
        assert "aspect ratio too extreme: 400000x1" in read_failures(out)[str(images / "strip.png")]


def test_a_read_that_never_returns_is_a_failure_and_the_job_moves_on(tmp_path, monkeypatch):
    import threading

    from fastclip import images as images_module

    from embed_helpers import read_failures, write_images
    paths = write_images(tmp_path / "images", 3, nested=False)
    stalled = threading.Event()
    real_read = images_module._read_file

    def read(path, max_bytes):
        if path == paths[1]:
            stalled.wait()  # a stalled mount: this read blocks until the test ends
        return real_read(path, max_bytes)

    monkeypatch.setattr(images_module, "_read_file", read)
    try:
        summary = embed(str(tmp_path / "out"), images=[str(tmp_path / "images")],
                        model="random:tiny", num_workers=0, progress=False, read_timeout=0.5)
    finally:
        stalled.set()
    assert summary["rows"] == 2 and summary["manifest"] is not None
    assert "did not finish within 0.5 s" in read_failures(tmp_path / "out")[paths[1]]


def test_many_stalled_reads_fail_the_rest_at_once(monkeypatch, tmp_path):
    import threading
    import time

    from fastclip import images as images_module
    stalled = threading.Event()
    monkeypatch.setattr(images_module, "_read_file", lambda path, max_bytes: stalled.wait())
    try:
        for _ in range(images_module.MAX_STALLED_READS):
            with pytest.raises(images_module.InputError, match="did not finish within"):
                images_module.read_file("x.jpg", timeout=0.05)
        start = time.perf_counter()
        with pytest.raises(images_module.InputError, match="still stalled"):
            images_module.read_file("y.jpg", timeout=5)
        assert time.perf_counter() - start < 1
    finally:
        stalled.set()
    deadline = time.monotonic() + 5
    while images_module._STALLED["count"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert images_module._STALLED["count"] == 0  # the reads that came back are counted off


def wait_for_no_stalled_reads(images_module):
    import time
    deadline = time.monotonic() + 5
    while images_module._STALLED["count"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return images_module._STALLED["count"] == 0


def test_reads_queued_behind_a_stalled_one_are_read_by_a_fresh_worker(monkeypatch, tmp_path):
    """Reads begun ahead (the embed reader's read-ahead) share one worker: when the first
    stalls, it is the only failure, and the reads queued behind it are moved to a new worker
    and read."""
    import threading

    from fastclip import images as images_module
    stalled, real_read = threading.Event(), images_module._read_file
    paths = []
    for name in ("stall", "b", "c", "d"):
        paths.append(tmp_path / f"{name}.bin")
        paths[-1].write_bytes(name.encode() * 10)

    def read(path, max_bytes):
        if path.endswith("stall.bin"):
            stalled.wait()
        return real_read(path, max_bytes)

    monkeypatch.setattr(images_module, "_read_file", read)
    try:
        first, *rest = [images_module.start_read(str(p), timeout=0.2) for p in paths]
        with pytest.raises(images_module.InputError, match="did not finish within 0.2 s"):
            first.result()
        assert images_module._STALLED["count"] == 1
        assert [r.result() for r in rest] == [b"b" * 10, b"c" * 10, b"d" * 10]

        # A read whose turn comes while one begun before it (whose bytes no one asked for
        # yet) blocks the worker: the blocking one is counted as stalled, and this one moves
        # to a fresh worker and is read.
        blocked = images_module.start_read(str(paths[0]), timeout=0.2)
        behind = images_module.start_read(str(paths[1]), timeout=0.2)
        assert behind.result() == b"b" * 10
        assert images_module._STALLED["count"] == 2
        with pytest.raises(images_module.InputError, match="did not finish within 0.2 s"):
            blocked.result()  # at once: it was given up on already
        assert images_module._STALLED["count"] == 2
        assert images_module.read_file(str(paths[2]), timeout=5) == b"c" * 10
    finally:
        stalled.set()
    assert wait_for_no_stalled_reads(images_module)


def test_a_discarded_read_is_not_begun_and_one_that_blocks_is_counted(monkeypatch, tmp_path):
    import threading

    from fastclip import images as images_module
    started, stalled = threading.Event(), threading.Event()
    calls, real_read = [], images_module._read_file

    def read(path, max_bytes):
        calls.append(os.path.basename(path))
        if path.endswith("stall.bin"):
            started.set()
            stalled.wait()
        return real_read(path, max_bytes)

    for name in ("stall", "b", "c"):
        (tmp_path / f"{name}.bin").write_bytes(name.encode())
    monkeypatch.setattr(images_module, "_read_file", read)
    try:
        gate = threading.Event()
        first = images_module.start_reads([(str(tmp_path / "gate"), lambda p, m: gate.wait())],
                                          timeout=5)[0]
        skipped, blocking, wanted = images_module.start_reads(
            [(str(tmp_path / name), None) for name in ("b.bin", "stall.bin", "c.bin")],
            timeout=0.2)
        skipped.discard()  # queued behind the gate: it never runs
        gate.set()
        assert first.result() is True
        assert started.wait(5)
        blocking.discard()  # running: it cannot be called back
        assert wanted.result() == b"c"  # after 0.2 s behind the blocking read, on a new worker
        assert calls == ["stall.bin", "c.bin"]
        assert images_module._STALLED["count"] == 1
    finally:
        stalled.set()
    assert wait_for_no_stalled_reads(images_module)


def test_a_read_begun_late_gets_its_whole_timeout(monkeypatch, tmp_path):
    """A read queued behind a slow one that no caller asked for: it is given up on only
    once it has itself run for the timeout, not when its caller has waited that long."""
    import threading
    import time

    from fastclip import images as images_module
    delays, started = {"slow.bin": 0.25, "next.bin": 0.1}, threading.Event()

    def read(path, max_bytes):
        started.set()
        time.sleep(delays[os.path.basename(path)])
        return os.path.basename(path).encode()

    monkeypatch.setattr(images_module, "_read_file", read)
    start = time.perf_counter()
    slow, following = images_module.start_reads(
        [(str(tmp_path / "slow.bin"), None), (str(tmp_path / "next.bin"), None)], timeout=0.3)
    assert started.wait(5)
    slow.discard()  # running already: it goes on
    assert following.result() == b"next.bin"  # begun at 0.25 s, done at 0.35 s
    assert 0.3 < time.perf_counter() - start < 2
    assert images_module._STALLED["count"] == 0


@pytest.mark.parametrize("caption_first", [False, True])
def test_a_stalled_read_fails_only_its_own_input_with_reads_ahead(tmp_path, monkeypatch,
                                                                caption_first):
    """The embed reader with its reads begun ahead: a stalled image fails its input alone,
    also where it stalls unasked-for (its input failed first, for want of a caption), and the
    inputs read after it keep their rows, their reads moved to a fresh worker ahead of reads
    begun later (each read takes 80 ms, so reads queued behind later ones would time out)."""
    import threading
    import time

    from fastclip import images as images_module
    from fastclip.embed import reader as reader_module
    from fastclip.embed.plan import plan_job

    from embed_helpers import image_bytes
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.jpg").write_bytes(image_bytes(i))
        if i != 0 or not caption_first:
            (folder / f"{i:02d}.txt").write_text(f"caption {i}")
    stalled, real_read = threading.Event(), images_module._read_file

    def read(path, max_bytes):
        if path.endswith("00.jpg"):
            stalled.wait()
        time.sleep(0.08)
        return real_read(path, max_bytes)

    monkeypatch.setattr(images_module, "_read_file", read)
    import fastclip
    plan = plan_job(images=[str(folder)])
    try:
        batches = list(reader_module.EmbedDataset(plan.chunks, fastclip.Preprocess(32), 32,
                                                  True, True, read_timeout=0.5))
    finally:
        stalled.set()
    rows = [row["image_path"] for batch in batches for row in batch["rows"]]
    failures = {os.path.basename(f["key"]): f["reason"] for batch in batches
                for f in batch["failures"]}
    assert rows == [str(folder / f"{i:02d}.jpg") for i in range(1, 12)]
    assert list(failures) == ["00.jpg"]
    assert ("no text" if caption_first else "did not finish within 0.5 s") in failures["00.jpg"]
    assert wait_for_no_stalled_reads(images_module)


def test_reads_begun_ahead_stop_waiting_once_too_many_have_stalled(tmp_path, monkeypatch):
    """Every read stalls: MAX_STALLED_READS of them wait out their timeout, the rest (begun
    ahead or not) fail at once."""
    import threading
    import time

    from fastclip import images as images_module
    from fastclip.embed import reader as reader_module
    from fastclip.embed.plan import plan_job

    from embed_helpers import image_bytes
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(30):
        (folder / f"{i:02d}.jpg").write_bytes(image_bytes(i))
    stalled = threading.Event()
    monkeypatch.setattr(images_module, "_read_file", lambda p, m: stalled.wait())
    import fastclip
    plan = plan_job(images=[str(folder)])
    start = time.perf_counter()
    try:
        batches = list(reader_module.EmbedDataset(plan.chunks, fastclip.Preprocess(32), 64,
                                                  True, False, read_timeout=0.1))
    finally:
        stalled.set()
    elapsed = time.perf_counter() - start
    reasons = [f["reason"] for batch in batches for f in batch["failures"]]
    assert len(reasons) == 30
    limit = images_module.MAX_STALLED_READS
    assert sum("did not finish within 0.1 s" in r for r in reasons) == limit
    assert sum("still stalled, so the storage is not answering" in r for r in reasons) == \
        30 - limit
    assert elapsed < (limit + 3) * 0.1 + 1
    assert wait_for_no_stalled_reads(images_module)


def test_an_untimed_read_happens_when_its_result_is_asked_for(monkeypatch, tmp_path):
    from fastclip import images as images_module
    calls = []
    monkeypatch.setattr(images_module, "_read_file", lambda p, m: calls.append(p) or b"x")
    read = images_module.start_read(str(tmp_path / "a.jpg"))
    assert calls == []
    assert read.result() == b"x" and calls == [str(tmp_path / "a.jpg")]
    with pytest.raises(images_module.InputError, match="no image path"):
        images_module.start_read(None, timeout=5).result()


def test_the_reader_begins_reads_ahead_of_the_image_it_decodes(tmp_path, monkeypatch):
    """Within a listed chunk, the reads of inputs (images and caption sidecars) are begun
    ahead of their decoding, READ_AHEAD // 2 inputs at a time whenever no more than that
    many are left, and each input's rows are as without read-ahead."""
    from fastclip.embed import reader as reader_module
    from fastclip.embed.plan import plan_job

    from embed_helpers import write_images
    paths = write_images(tmp_path / "images", 9, nested=False)
    for path in paths:
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            f.write("caption of " + os.path.basename(path))
    events = []
    real_start, real_decode = reader_module.start_reads, reader_module.decode_image

    def start(requests, *args):
        events.extend(("read", os.path.basename(path)) for path, _ in requests)
        return real_start(requests, *args)

    def decode(data, *args):
        events.append(("decode", None))
        return real_decode(data, *args)

    monkeypatch.setattr(reader_module, "start_reads", start)
    monkeypatch.setattr(reader_module, "decode_image", decode)
    monkeypatch.setattr(reader_module, "decode_jpeg_pixels", lambda *args: None)
    import fastclip
    plan = plan_job(images=[str(tmp_path / "images")])
    dataset = reader_module.EmbedDataset(plan.chunks, fastclip.Preprocess(32), 16, True, True,
                                         read_timeout=5)
    batches = list(dataset)
    rows = [row for batch in batches for row in batch["rows"]]
    assert [row["image_path"] for row in rows] == paths
    assert [row["caption"] for row in rows] == [
        "caption of " + os.path.basename(path) for path in paths]
    reads_before = [sum(kind == "read" for kind, _ in events[:i])
                    for i, (kind, _) in enumerate(events) if kind == "decode"]
    # Two reads (image and caption) per input: 8 inputs begun, then 4 more after 4 decodes.
    assert reader_module.READ_AHEAD == 8
    assert reads_before == [2 * 8] * 4 + [2 * 9] * 5


def test_a_file_larger_than_it_claims_is_bounded(tmp_path):
    from fastclip.images import InputError, read_file
    with pytest.raises(InputError, match="more than the 10-byte limit"):
        read_file("/proc/self/maps", max_bytes=10)  # reports size 0


def test_files_are_read_whole_whatever_size_they_report(tmp_path):
    """A file read in full when its reported size is wrong (procfs reports 0), and the limit
    exact at its edge."""
    from fastclip.images import InputError, read_file
    with open("/proc/self/mountinfo", "rb") as f:
        expected = f.read()
    assert len(expected) > 0 and read_file("/proc/self/mountinfo") == expected
    path = tmp_path / "ten.bin"
    path.write_bytes(bytes(range(10)))
    assert read_file(str(path), max_bytes=10) == bytes(range(10))
    with pytest.raises(InputError, match="larger than the 9-byte limit"):
        read_file(str(path), max_bytes=9)


def reads_in_a_forked_child(path, expected):
    """Whether a child forked from this process reads ``expected`` from ``path`` with a
    timeout (as a DataLoader worker would)."""
    import os

    from fastclip import images as images_module
    pid = os.fork()
    if pid == 0:
        try:
            ok = images_module.read_file(str(path), timeout=5) == expected
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_timed_reads_use_one_thread_again_across_stalls_and_forks(tmp_path, monkeypatch):
    """A timed read runs on a thread kept for the calling thread: many reads start no more
    threads, a read after a stalled one gets a fresh worker, and a forked child (a
    DataLoader worker) starts its own rather than waiting on its parent's."""
    import threading

    from fastclip import images as images_module
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    readers = []  # the threads that ran the reads, kept so that none is told apart by id alone
    real_read = images_module._read_file

    def read(p, m):
        readers.append(threading.current_thread())
        return real_read(p, m)

    monkeypatch.setattr(images_module, "_read_file", read)
    for _ in range(50):
        assert images_module.read_file(str(path), timeout=5) == b"x" * 100
    assert len({id(thread) for thread in readers}) == 1
    assert readers[0] is not threading.current_thread()

    # the child: the parent's worker thread does not exist there
    assert reads_in_a_forked_child(path, b"x" * 100)

    stalled = threading.Event()
    monkeypatch.setattr(images_module, "_read_file", lambda p, m: stalled.wait() and b"")
    try:
        with pytest.raises(images_module.InputError, match="did not finish within"):
            images_module.read_file(str(path), timeout=0.05)
        monkeypatch.setattr(images_module, "_read_file", real_read)
        assert images_module.read_file(str(path), timeout=5) == b"x" * 100
    finally:
        stalled.set()


def test_a_file_swapped_for_a_fifo_after_its_check_does_not_block(tmp_path, monkeypatch):
    import os

    from fastclip import images as images_module
    path = tmp_path / "swap.jpg"
    path.write_bytes(b"\xff\xd8\xff" + bytes(100))
    real_stat = os.stat

    def stat_then_swap(name, *args, **kwargs):
        result = real_stat(name, *args, **kwargs)
        if str(name) == str(path) and not os.path.exists(str(path) + ".done"):
            os.remove(path)
            os.mkfifo(path)
            open(str(path) + ".done", "w").close()
        return result

    monkeypatch.setattr(images_module.os, "stat", stat_then_swap)
    with pytest.raises(images_module.InputError, match="not a regular file"):
        images_module.read_file(str(path), timeout=5)


def test_a_file_longer_than_it_claims_is_refused_before_its_pieces_are_joined():
    import io

    from fastclip import images as images_module
    with pytest.raises(images_module.InputError, match="more than the 50-byte limit"):
        images_module._read_bounded(io.BytesIO(b"x" * 100), 0, 50)
    assert images_module._read_bounded(io.BytesIO(b"x" * 50), 0, 50) == b"x" * 50


def test_idle_read_workers_end_and_forked_children_forget_stalled_reads(monkeypatch, tmp_path):

    from fastclip import images as images_module
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 10)
    monkeypatch.setattr(images_module._ReadWorker, "IDLE_SECONDS", 0.05)
    images_module._ReadWorker._local.worker = None
    assert images_module.read_file(str(path), timeout=5) == b"x" * 10
    worker = images_module._ReadWorker._local.worker
    worker.thread.join(5)
    assert not worker.thread.is_alive(), "an idle worker should end"
    assert images_module.read_file(str(path), timeout=5) == b"x" * 10  # a new one

    monkeypatch.setitem(images_module._STALLED, "count", images_module.MAX_STALLED_READS)
    assert reads_in_a_forked_child(path, b"x" * 10)  # the parent's stalled reads are not there
