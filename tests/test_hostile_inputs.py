"""Files fastclip did not make: no code in them runs, no external program starts, and each
bad one ends as a clear error or a recorded failure."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastclip
from fastclip.embed import embed
from fastclip.torchscript import ArchiveError, read_weights

from small_models import small_clip

ARCHIVE_WITH_CODE = textwrap.dedent('''
    import sys
    from typing import Tuple
    import torch
    from torch import Tensor

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w

        @torch.jit.export
        def __getstate__(self) -> Tuple[Tensor, bool]:
            return (self.w, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[Tensor, bool]) -> None:
            print("archive code ran")
            self.w = state[0]
            self.training = state[1]

    torch.jit.script(Module()).save(sys.argv[1])
''')


def run_python(tmp_path, source, *args):
    script = tmp_path / "script.py"  # TorchScript needs its source in a file
    script.write_text(source)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def archive_with_code(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    path = folder / "ViT-B-32.pt"
    made = run_python(folder, ARCHIVE_WITH_CODE, str(path))
    assert made.returncode == 0, made.stderr[-2000:]
    return path


def test_torchscript_archive_code_would_run_under_torch_jit_load(tmp_path, archive_with_code):
    """The crafted archive is a real attack: torch.jit.load runs its __setstate__."""
    loaded = run_python(tmp_path, f"import torch; torch.jit.load({str(archive_with_code)!r})")
    assert "archive code ran" in loaded.stdout


def test_fastclip_load_never_runs_an_archives_code(tmp_path, archive_with_code):
    loaded = run_python(tmp_path, textwrap.dedent(f"""
        import fastclip
        try:
            fastclip.load({str(archive_with_code)!r}, device="cpu")
        except ValueError as error:
            print("refused:", error)
    """))
    assert "archive code ran" not in loaded.stdout, loaded.stdout
    assert "refused:" in loaded.stdout and "custom state" in loaded.stdout, loaded.stdout
    with pytest.raises(ArchiveError, match="class __torch__.Module has a custom state"):
        read_weights(archive_with_code)


def test_traced_archive_weights_equal_torch_jit_loads(tmp_path):
    model = small_clip()
    archive = torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, 64, 64)})
    path = tmp_path / "traced.pt"
    archive.save(str(path))
    expected = torch.jit.load(str(path)).state_dict()
    weights = read_weights(path)
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key


def test_archive_asking_for_other_globals_is_refused(tmp_path):
    """A data.pkl that names a global other than tensors and its own modules (here os.system)
    is refused before anything is built."""
    import pickle
    import zipfile

    class Payload:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)

    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(Payload(), protocol=2))
        archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("archive/code/__torch__.py", "")
    with pytest.raises(ValueError, match="asks for posix.system"):
        fastclip.load(str(path), device="cpu")
    assert not (tmp_path / "pwned").exists()


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


@pytest.mark.parametrize("name", ["*", "emb?", "emb[1]"])
def test_output_folders_with_glob_characters_touch_nothing_outside(tmp_path, name):
    from embed_helpers import write_images

    images = tmp_path / "images"
    write_images(images, 3, nested=False)
    run = dict(images=[str(images)], model="random:tiny", num_workers=0, progress=False,
               shard_size=1)
    embed(str(tmp_path / "emb1"), **run)  # another job, whose folder the pattern would match
    bystander = tmp_path / "emb1" / "notes.tmp-1"  # named like a temporary file
    bystander.write_text("keep me")
    before = sorted(os.listdir(tmp_path / "emb1" / ".fastclip"))
    summary = embed(str(tmp_path / name), **run)
    assert summary["inputs"] == 3 and summary["manifest"] is not None
    assert bystander.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path / "emb1" / ".fastclip")) == before
    assert len(os.listdir(tmp_path / name / "img_emb")) == 3


def test_an_existing_input_path_is_itself_whatever_its_characters(tmp_path):
    from fastclip.embed.plan import expand_source

    from embed_helpers import write_images
    folder = tmp_path / "photos[1]"
    write_images(folder, 2, nested=False)
    assert expand_source(str(folder)) == [str(folder)]
    braces = tmp_path / "{a,b}"
    braces.mkdir()
    assert expand_source(str(braces)) == [str(braces)]
    assert len(expand_source(str(folder / "*.jpg"))) == 1  # a pattern inside it still globs
    summary = embed(str(tmp_path / "out"), images=[str(folder)], model="random:tiny",
                    num_workers=0, progress=False)
    assert summary["rows"] == 2


def test_resume_refuses_a_checkpoint_whose_weights_changed(tmp_path):
    from embed_helpers import write_images

    images = tmp_path / "images"
    write_images(images, 4, nested=False)
    checkpoint = tmp_path / "model.pt"
    torch.save(small_clip(seed=1).state_dict(), checkpoint)
    run = dict(images=[str(images)], model=str(checkpoint), num_workers=0, progress=False,
               shard_size=2)
    embed(str(tmp_path / "out"), **run)
    embed(str(tmp_path / "out"), resume=True, **run)  # the same weights: nothing to redo
    torch.save(small_clip(seed=2).state_dict(), checkpoint)  # same path, other weights
    with pytest.raises(ValueError, match="are not those the job .* began with"):
        embed(str(tmp_path / "out"), resume=True, **run)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoints_with_non_finite_weights_are_refused_by_name(tmp_path, bad):
    state = small_clip().state_dict()
    state["transformer.resblocks.1.mlp.c_fc.weight"][3, 5] = bad
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"transformer.resblocks.1.mlp.c_fc.weight holds 1 NaN"):
        fastclip.load(str(path), device="cpu")


def test_a_kill_before_the_done_marker_leaves_no_stale_shard_after_resume(tmp_path, monkeypatch):
    """Killed after chunk 0's embeddings and metadata are in place but before its marker;
    by the resume, chunk 0's inputs have all gone bad: its old files must go."""
    from fastclip.embed.output import OutputFolder

    from embed_helpers import read_failures, write_images

    images = tmp_path / "images"
    paths = write_images(images, 2, nested=False)
    run = dict(images=[str(images)], model="random:tiny", num_workers=0, progress=False,
               shard_size=10, dtype="fp32")
    commit = OutputFolder.commit_chunk

    def killed_before_the_marker(self, index, *args):
        monkeypatch.setattr("fastclip.embed.output.write_json", killed)
        commit(self, index, *args)

    def killed(path, value):
        raise SystemExit("killed")  # the process dies here, after the shard's other files

    monkeypatch.setattr(OutputFolder, "commit_chunk", killed_before_the_marker)
    with pytest.raises(RuntimeError, match="Writing to .* failed: killed"):
        embed(str(tmp_path / "out"), **run)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert (out / "img_emb" / "img_emb_0.npy").exists()
    assert not (out / ".fastclip" / "done_0.json").exists()
    for path in paths:
        with open(path, "wb") as f:
            f.write(b"no longer an image")
    summary = embed(str(out), resume=True, **run)
    assert summary["rows"] == 0 and summary["failures"] == 2
    assert not (out / "img_emb" / "img_emb_0.npy").exists()
    assert not (out / "metadata" / "metadata_0.parquet").exists()
    assert set(read_failures(out)) == set(paths)


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


def lying_tar(path, claimed, good_samples=1, compress=False):
    """A WebDataset shard: ``good_samples`` real samples, then a member whose header claims
    ``claimed`` bytes followed by only 10 KB."""
    import gzip
    import io
    import tarfile

    from embed_helpers import image_bytes

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for i in range(good_samples):
            data = image_bytes(i)
            info = tarfile.TarInfo(f"{i:03d}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        end = archive.offset  # where the end-of-archive blocks begin
    body = buffer.getvalue()[:end]
    liar = tarfile.TarInfo("999.jpg")
    liar.size = claimed
    data = body + liar.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 10_240
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("claimed", [100 << 30, 1 << 40, 1 << 60])
@pytest.mark.parametrize("compress", [False, True])
def test_a_tar_header_claiming_terabytes_ends_its_shard_at_once(tmp_path, claimed, compress):
    import time

    from embed_helpers import read_failures

    shard = lying_tar(tmp_path / "shard.tar", claimed, compress=compress)
    start = time.perf_counter()
    summary = embed(str(tmp_path / "out"), images=[str(shard)], model="random:tiny",
                    num_workers=0, progress=False)
    assert time.perf_counter() - start < 30
    assert summary["rows"] == 1 and summary["manifest"] is not None  # the sample before it
    reason = read_failures(tmp_path / "out")[str(shard)]
    assert f"claims {claimed} bytes" in reason


def test_one_sample_may_not_hold_more_than_the_byte_limit(tmp_path):
    import io
    import tarfile

    from fastclip.embed.reader import iter_webdataset
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w:gz") as archive:
        for extension in ("jpg", "png", "webp", "json"):
            info = tarfile.TarInfo(f"000.{extension}")
            info.size = 600
            archive.addfile(info, io.BytesIO(b"\0" * 600))
    [(key, fields)] = list(iter_webdataset(str(path), max_bytes=1000, wanted={"jpg", "png"}))
    assert fields["jpg"] == b"\0" * 600
    assert "past the 1000-byte limit" in str(fields["png"])
    assert fields["webp"] is None and fields["json"] is None  # listed, never read


def test_a_huge_long_name_ends_its_shard_with_a_short_record(tmp_path):
    import io
    import tarfile

    from embed_helpers import image_bytes, read_failures
    path = tmp_path / "names.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        # The sample before a damaged header may be incomplete, so it goes with it: 001.
        for name in ("000.jpg", "001.jpg", "x" * 200_000 + ".jpg"):
            data = image_bytes(0)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    summary = embed(str(tmp_path / "out"), images=[str(path)], model="random:tiny",
                    num_workers=0, progress=False)
    assert summary["rows"] == 1
    reason = read_failures(tmp_path / "out")[str(path)]
    assert "extended header of" in reason and len(reason) < 1000


def test_a_repeated_tar_key_is_a_failure_not_a_second_row(tmp_path):
    import io
    import tarfile

    from embed_helpers import image_bytes, read_failures
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as archive:
        for i, key in enumerate(["a", "b", "a"]):
            data = image_bytes(i)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    summary = embed(str(tmp_path / "out"), images=[str(path)], model="random:tiny",
                    num_workers=0, progress=False)
    assert summary["rows"] == 2 and summary["failures"] == 1
    assert "duplicate key" in read_failures(tmp_path / "out")[f"{path}:a"]


def test_unreadable_folders_are_failures_not_gaps(tmp_path, monkeypatch):
    from embed_helpers import read_failures, write_images

    images = tmp_path / "images"
    write_images(images, 4)  # in images/part0 and images/part1
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) == "part1":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # as root, chmod cannot make one unreadable
    summary = embed(str(tmp_path / "out"), images=[str(images)], model="random:tiny",
                    num_workers=0, progress=False)
    assert summary["rows"] == 2 and summary["failures"] == 1
    assert "folder not listed: PermissionError" in read_failures(tmp_path / "out")[
        str(images / "part1")]
    alone = embed(str(tmp_path / "out2"), images=[str(images / "part1")], model="random:tiny",
                  num_workers=0, progress=False)
    assert alone["failures"] == 1 and alone["rows"] == 0  # not an empty "complete" job


def test_a_path_listed_twice_is_embedded_once_and_the_repeat_reported(tmp_path):
    from embed_helpers import read_failures, write_images

    paths = write_images(tmp_path / "images", 2, nested=False)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([paths[0], paths[1], paths[0]]) + "\n")
    summary = embed(str(tmp_path / "out"), images=[str(listing)], model="random:tiny",
                    num_workers=0, progress=False)
    assert summary["rows"] == 2 and summary["failures"] == 1
    assert "duplicate key: the same input as input 1" in read_failures(tmp_path / "out")[paths[0]]


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    from fastclip.embed.plan import read_column
    path = tmp_path / "table.csv"
    path.write_bytes("caption,image_path\na cat,cat.jpg\n".encode("utf-8-sig"))
    assert read_column(str(path), "caption") == ["a cat"]


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


def test_an_output_path_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    from fastclip import cli

    (tmp_path / "file").write_text("not a folder")
    images = tmp_path / "images"
    images.mkdir()
    status = cli.main(["embed", "--images", str(images), "-o", str(tmp_path / "file"),
                       "--model", str(tmp_path / "no-such-model.pt"), "--no-progress"])
    assert status == 2
    assert "is a file, not a folder" in capsys.readouterr().err  # not "model not found"
    status = cli.main(["embed", "--images", str(images), "-o", str(tmp_path / "file" / "out"),
                       "--model", str(tmp_path / "no-such-model.pt"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and "a part of the path is a file" in err and "Traceback" not in err


def test_a_read_only_output_folder_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    from fastclip import cli

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)  # as root, chmod would not do
    images = tmp_path / "images"
    images.mkdir()
    status = cli.main(["embed", "--images", str(images), "-o", str(tmp_path / "out"),
                       "--model", "random:tiny", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0
    assert "Cannot write to the output folder" in err and "read-only" in err


def test_a_full_disk_names_its_cause(tmp_path, monkeypatch, capsys):
    import errno

    from fastclip import cli
    from fastclip.embed import output

    from embed_helpers import write_images

    def full(f, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    write_images(tmp_path / "images", 2, nested=False)
    monkeypatch.setattr(output.np, "save", full)
    status = cli.main(["embed", "--images", str(tmp_path / "images"), "-o",
                       str(tmp_path / "out"), "--model", "random:tiny", "--no-progress",
                       "--num-workers", "0"])
    err = capsys.readouterr().err
    assert status == 2 and "no space left on the device" in err and "Traceback" not in err


def test_a_job_recorded_by_an_earlier_version_still_resumes(tmp_path):
    import json

    from embed_helpers import write_images

    images = tmp_path / "images"
    write_images(images, 4, nested=False)
    run = dict(images=[str(images)], model="random:tiny", num_workers=0, progress=False,
               shard_size=2)
    embed(str(tmp_path / "out"), **run)
    plan_path = tmp_path / "out" / ".fastclip" / "plan.json"
    plan = json.loads(plan_path.read_text())
    for newer in ("model_sha256", "max_bytes"):  # settings earlier versions did not record
        del plan["job"][newer]
    plan_path.write_text(json.dumps(plan))
    (tmp_path / "out" / ".fastclip" / "done_1.json").unlink()
    assert embed(str(tmp_path / "out"), resume=True, **run)["inputs"] == 2


def crafted_shard(path, headers):
    """A shard: two good samples, then the raw ``headers`` (and 10 KB), then a good sample.
    The sample just before damage may be incomplete, so only the first one is kept."""
    import tarfile

    from embed_helpers import image_bytes

    def member(name):
        data = image_bytes(0)
        info = tarfile.TarInfo(name)
        info.size = len(data)
        padding = b"\0" * (-len(data) % tarfile.BLOCKSIZE)
        return info.tobuf(format=tarfile.GNU_FORMAT) + data + padding

    path.write_bytes(member("000.jpg") + member("001.jpg") + headers + b"\0" * 10_240
                     + member("003.jpg")
                     + b"\0" * 1024)
    return path


def long_name_chain(count):
    import tarfile
    return b"".join(tarfile.TarInfo._create_gnu_long_header("x" * 100, tarfile.GNUTYPE_LONGNAME,
                                                            "utf-8", "strict")
                    for _ in range(count))


def unknown_type_member(claimed):
    import tarfile
    info = tarfile.TarInfo("002.jpg")
    info.type = b"Z"
    info.size = claimed
    return info.tobuf(format=tarfile.GNU_FORMAT)


def sparse_map_member():
    import tarfile
    info = tarfile.TarInfo("002.jpg")
    info.size = 10
    info.pax_headers = {"GNU.sparse.map": "x,y", "GNU.sparse.size": "10"}
    return info.tobuf(format=tarfile.PAX_FORMAT)


@pytest.mark.parametrize("headers", [
    pytest.param(lambda: unknown_type_member(1 << 60), id="unknown-type-claiming-an-exabyte"),
    pytest.param(lambda: long_name_chain(1500), id="1500-chained-long-names"),
    pytest.param(sparse_map_member, id="garbled-sparse-map"),
])
def test_crafted_tar_headers_end_the_shard_not_the_job(tmp_path, headers):
    import time

    from embed_helpers import read_failures

    shard = crafted_shard(tmp_path / "shard.tar", headers())
    start = time.perf_counter()
    summary = embed(str(tmp_path / "out"), images=[str(shard)], model="random:tiny",
                    num_workers=0, progress=False)
    assert time.perf_counter() - start < 30
    assert summary["manifest"] is not None and summary["rows"] >= 1
    assert str(shard) in read_failures(tmp_path / "out")


def test_a_member_repeated_inside_a_sample_fails_the_sample(tmp_path):
    import io
    import tarfile

    from embed_helpers import image_bytes, read_failures
    path = tmp_path / "repeat.tar"
    with tarfile.open(path, "w") as archive:
        for i in range(2):
            data = image_bytes(i)
            info = tarfile.TarInfo("000.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    summary = embed(str(tmp_path / "out"), images=[str(path)], model="random:tiny",
                    num_workers=0, progress=False)
    assert summary["rows"] == 0
    assert "two members named 000.jpg" in read_failures(tmp_path / "out")[f"{path}:000"]


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


def test_a_file_larger_than_it_claims_is_bounded(tmp_path):
    from fastclip.images import InputError, read_file
    with pytest.raises(InputError, match="more than the 10-byte limit"):
        read_file("/proc/self/maps", max_bytes=10)  # reports size 0


def test_one_image_paired_with_two_captions_is_two_inputs(tmp_path):
    from embed_helpers import write_images
    paths = write_images(tmp_path / "images", 1, nested=False)
    images, texts = tmp_path / "images.txt", tmp_path / "texts.txt"
    images.write_text(f"{paths[0]}\n{paths[0]}\n")
    texts.write_text("a photo\nanother caption of it\n")
    summary = embed(str(tmp_path / "out"), images=[str(images)], texts=[str(texts)],
                    model="random:tiny", num_workers=0, progress=False)
    assert summary["rows"] == 2 and summary["failures"] == 0


def archive_of_references(path, references, numel, compress=False):
    """A TorchScript-like archive whose module holds ``references`` tensors, each naming the
    same storage anew (no pickle memo), as a crafted archive can."""
    import collections
    import io
    import pickle
    import types
    import zipfile

    module = types.ModuleType("__torch__")
    module.M = type("M", (), {"__module__": "__torch__"})

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (Storage(), 0, (numel,), (1,), False,
                                                     collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    top = module.M()
    top.__dict__.update({f"w{i}": Tensor() for i in range(references)})
    buffer = io.BytesIO()
    saved = sys.modules.get("__torch__")
    sys.modules["__torch__"] = module
    try:
        Pickler(buffer, protocol=2).dump(top)
    finally:
        if saved is None:
            del sys.modules["__torch__"]
        else:
            sys.modules["__torch__"] = saved
    names = ", ".join(f'"w{i}"' for i in range(references))
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("archive/code/__torch__.py",
                         f"class M(Module):\n  __parameters__ = [{names}, ]\n  __buffers__ = []\n")
        archive.writestr("archive/data/0", b"\0" * (4 * numel))
    return path


def test_a_storage_named_many_times_is_read_once(tmp_path):
    path = archive_of_references(tmp_path / "refs.pt", references=200, numel=1 << 18)
    weights = read_weights(path)
    assert len(weights) == 200
    assert len({w.untyped_storage().data_ptr() for w in weights.values()}) == 1


def test_a_compressed_storage_that_expands_like_a_bomb_is_refused(tmp_path):
    path = archive_of_references(tmp_path / "bomb.pt", references=1, numel=32 << 20,
                                 compress=True)  # 128 MiB of zeros in about 130 KB
    with pytest.raises(ArchiveError, match="far more than weights ever compress"):
        read_weights(path)


def test_a_failed_write_names_the_file_it_was_writing(tmp_path):
    import errno

    from fastclip.files import atomic_write, describe_os_error

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "img_emb_0.npy", full)
    assert describe_os_error(caught.value) == \
        f"{tmp_path / 'img_emb_0.npy'}: no space left on the device"
