"""Paths and the output folder: user paths are taken literally, nothing outside the output
folder is touched, gaps in a listing are reported, and errors about the output arrive early
and in one line."""

import os

import pytest

from fastclip.embed import embed


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
        monkeypatch.setattr(OutputFolder, "write_json", killed)
        commit(self, index, *args)

    def killed(self, path, value):
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


def test_one_image_paired_with_two_captions_is_two_inputs(tmp_path):
    from embed_helpers import write_images
    paths = write_images(tmp_path / "images", 1, nested=False)
    images, texts = tmp_path / "images.txt", tmp_path / "texts.txt"
    images.write_text(f"{paths[0]}\n{paths[0]}\n")
    texts.write_text("a photo\nanother caption of it\n")
    summary = embed(str(tmp_path / "out"), images=[str(images)], texts=[str(texts)],
                    model="random:tiny", num_workers=0, progress=False)
    assert summary["rows"] == 2 and summary["failures"] == 0


def test_a_failed_write_names_the_file_it_was_writing(tmp_path):
    import errno

    from fastclip.files import atomic_write, describe_os_error

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "img_emb_0.npy", full)
    assert describe_os_error(caught.value) == \
        f"{tmp_path / 'img_emb_0.npy'}: no space left on the device"


def test_a_pipe_named_in_a_list_or_a_table_runs_nothing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastclip.embed import embed

    from embed_helpers import read_failures, tiny_checkpoint
    marker = tmp_path / "ran"
    command = f"pipe:touch {marker}"
    (tmp_path / "list.txt").write_text(command + "\n")
    pq.write_table(pa.table({"image_path": [command]}), tmp_path / "t.parquet")
    summary = embed(str(tmp_path / "out"), images=[str(tmp_path / "list.txt"),
                                                   str(tmp_path / "t.parquet")],
                    model=tiny_checkpoint(), progress=False, num_workers=0)
    assert summary["failures"] == 2 and summary["rows"] == 0
    assert not marker.exists()
    assert all("unreadable" in reason for reason in read_failures(tmp_path / "out").values())
