"""fastclip embed where the data lives: an S3 server on 127.0.0.1 (moto in server mode, read
and written with s3fs) holding tar shards, lists and tables, the output written there,
killed midway and resumed; a local HTTP server for https-style lists and shards; and the
clear errors of stores that cannot be used, given before any model loads."""

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastclip.embed import embed

from embed_helpers import (
    REPO,
    assert_rows_equal,
    image_bytes,
    read_failures,
    read_output,
    run_fastclip,
    tiny_checkpoint,
    write_tar_shard,
)
from servers import free_port, needed

needed("s3fs")
needed("moto")


def _samples(start, count):
    return [(f"{i:06d}", {"jpg": image_bytes(i, (40 + i % 7, 36 + i % 5)),
                          "txt": f"a photo of thing {i}".encode(),
                          "json": json.dumps({"url": f"http://x/{i}.jpg", "width": 40 + i % 7,
                                              "caption": f"thing {i}"}).encode()})
            for i in range(start, start + count)]


def _local_and_remote_shards(tmp_path, fs, bucket, counts):
    local = tmp_path / "shards"
    local.mkdir()
    start = 0
    for n, count in enumerate(counts):
        write_tar_shard(local / f"{n}.tar", _samples(start, count))
        fs.put(str(local / f"{n}.tar"), f"{bucket}/shards/{n}.tar")
        start += count
    return local


def _download(fs, url, to):
    fs.invalidate_cache()
    fs.get(url.removeprefix("s3://") + "/", str(to), recursive=True)
    return to


def _by_suffix(rows, separator=":"):
    """``{sample key: row}``: the key without its shard's location, to compare runs."""
    return {key.rpartition("/")[2]: row for key, row in rows.items()}


def test_tar_shards_list_and_table_on_s3_embed_into_s3_as_from_local_disk(s3, tmp_path):
    fs, bucket = s3
    local = _local_and_remote_shards(tmp_path, fs, bucket, [5, 4])
    # A list of images (relative paths, beside the list) and a parquet table of image bytes.
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"im{i}.png").write_bytes(image_bytes(100 + i, format="PNG"))
        fs.pipe(f"{bucket}/images/im{i}.png", image_bytes(100 + i, format="PNG"))
    (images / "list.txt").write_text("im0.png\nim1.png\nim2.png\n")
    fs.pipe(f"{bucket}/images/list.txt", b"im0.png\nim1.png\nim2.png\n")
    table = pa.table({"jpg": pa.array([image_bytes(200 + i) for i in range(4)], pa.binary()),
                      "caption": [f"row {i}" for i in range(4)]})
    pq.write_table(table, tmp_path / "table.parquet")
    fs.put(str(tmp_path / "table.parquet"), f"{bucket}/table.parquet")

    options = dict(model=tiny_checkpoint(), progress=False, num_workers=1, dtype="fp32",
                   shard_size=2, batch_size=3, image_column="jpg")
    summary = embed(f"s3://{bucket}/out", images=[
        f"s3://{bucket}/shards/{{0..1}}.tar", f"s3://{bucket}/images/list.txt",
        f"s3://{bucket}/table.parquet"], **options)
    assert summary["failures"] == 0 and summary["rows"] == 16, summary
    assert summary["manifest"]["counts"]["rows"] == 16
    embed(str(tmp_path / "whole"), images=[str(local / "{0..1}.tar"), str(images / "list.txt"),
                                           str(tmp_path / "table.parquet")], **options)

    out = _download(fs, f"s3://{bucket}/out", tmp_path / "downloaded")
    assert not any(name.startswith(".fastclip-write-check") for name in os.listdir(out))
    assert_rows_equal(_by_suffix(read_output(out)), _by_suffix(read_output(tmp_path / "whole")),
                      0.0)
    metadata = pq.read_table(out / "metadata").to_pydict()
    assert "000003" in metadata["image_path"]  # a tar sample's image_path is its key
    assert all(isinstance(path, str) for path in metadata["image_path"])
    assert not os.path.exists(os.path.join(REPO, "s3:"))


def test_embedding_reader_reads_the_output_from_s3(s3, tmp_path):
    from embedding_reader import EmbeddingReader
    fs, bucket = s3
    _local_and_remote_shards(tmp_path, fs, bucket, [3, 3])
    embed(f"s3://{bucket}/out", images=[f"s3://{bucket}/shards/*.tar"], model=tiny_checkpoint(),
          progress=False, num_workers=0, dtype="fp32", enable_metadata=True)
    reader = EmbeddingReader(f"s3://{bucket}/out/img_emb", file_format="parquet_npy",
                             metadata_folder=f"s3://{bucket}/out/metadata",
                             meta_columns=["image_path", "url", "width"])
    assert reader.count == 6
    embeddings, metadata = next(reader(batch_size=10, start=0, end=reader.count))
    assert embeddings.shape == (6, 64)
    assert sorted(metadata["url"]) == sorted(f"http://x/{i}.jpg" for i in range(6))
    assert metadata["width"].dtype.kind == "i"  # the .json's numbers stay numbers


def _wait_for(predicate, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_job_writing_to_s3_killed_midway_resumes_to_the_rows_of_one_run(s3, tmp_path):
    """The last source is a pipe that holds until the test lets it go: the job is killed
    with three shards' markers in the store and the fourth not begun."""
    fs, bucket = s3
    local = _local_and_remote_shards(tmp_path, fs, bucket, [3, 2, 3])
    write_tar_shard(tmp_path / "last.tar", _samples(50, 2))
    go = tmp_path / "go"
    held = (f"pipe:while [ ! -e {go} ]; do sleep 0.05; done; cat {tmp_path / 'last.tar'}")
    out = f"s3://{bucket}/out"
    args = ["embed", "--images", f"s3://{bucket}/shards/{{0..2}}.tar", held, "-o", out,
            "--model", tiny_checkpoint(), "--no-progress", "--num-workers", "0", "--dtype",
            "fp32"]
    process = subprocess.Popen([sys.executable, "-m", "fastclip", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def markers():
        fs.invalidate_cache()
        return fs.glob(f"{bucket}/out/.fastclip/done_*.json")

    _wait_for(lambda: len(markers()) == 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not fs.exists(f"{bucket}/out/manifest.json")
    go.touch()  # the killed job's pipe ends; the resumed one reads its shard at once

    result = run_fastclip(*args, "--resume")
    assert "10 items" not in result.stderr  # the resume redid only the missing shard
    assert "2 items, 0 failures" in result.stderr, result.stderr
    embed(str(tmp_path / "whole"), images=[str(local / "{0..2}.tar"), str(tmp_path / "last.tar")],
          model=tiny_checkpoint(), progress=False, num_workers=0, dtype="fp32")
    downloaded = _download(fs, out, tmp_path / "downloaded")
    assert_rows_equal(_by_suffix(read_output(downloaded)),
                      _by_suffix(read_output(tmp_path / "whole")), 0.0)
    manifest = json.loads((downloaded / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 10, "rows": 10, "images": 10, "texts": 0,
                                  "failures": 0, "shards": 4}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server of a folder: ``(folder, base URL)``."""
    folder = tmp_path / "site"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_lists_and_shards_over_http(http_root, tmp_path):
    needed("aiohttp")
    folder, base = http_root
    write_tar_shard(folder / "shard.tar", _samples(0, 4))
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(image_bytes(300 + i))
    (folder / "list.txt").write_text("0.jpg\n1.jpg\nmissing.jpg\n" + f"{base}/2.jpg\n")
    options = dict(model=tiny_checkpoint(), progress=False, num_workers=1, dtype="fp32")
    embed(str(tmp_path / "remote"), images=[f"{base}/shard.tar", f"{base}/list.txt"],
          **options)
    local = [str(folder / "shard.tar"), str(folder / "list.txt")]
    embed(str(tmp_path / "local"), images=local, **options)
    assert_rows_equal(_by_suffix(read_output(tmp_path / "remote")),
                      _by_suffix(read_output(tmp_path / "local")), 0.0)
    failures = read_failures(tmp_path / "remote")
    assert list(failures) == [f"{base}/missing.jpg"]
    assert "unreadable" in failures[f"{base}/missing.jpg"]


def test_memory_output_writes_no_local_folder(tmp_path, monkeypatch):
    import fsspec
    monkeypatch.chdir(tmp_path)
    write_tar_shard(tmp_path / "shard.tar", _samples(0, 2))
    summary = embed("memory://fastclip-test/out", images=[str(tmp_path / "shard.tar")],
                    model=tiny_checkpoint(), progress=False, num_workers=0)
    assert summary["rows"] == 2
    assert not os.path.exists(tmp_path / "memory:")
    memory = fsspec.filesystem("memory")
    assert memory.exists("/fastclip-test/out/img_emb/img_emb_0.npy")
    memory.rm("/fastclip-test", recursive=True)


@pytest.mark.parametrize("source, expected", [
    ("nosuchscheme://bucket/shards.tar", "unknown storage scheme nosuchscheme://"),
    ("gs://bucket/shard.tar", "needs a package that is not installed"),
])
def test_unusable_stores_are_clear_errors_before_the_model_loads(tmp_path, source, expected):
    if expected.startswith("needs") and __import__("importlib").util.find_spec("gcsfs"):
        pytest.skip("gcsfs is installed")
    result = run_fastclip("embed", "--images", source, "-o", tmp_path / "out", "--model",
                          tmp_path / "no-such-model.pt", check=False)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "no-such-model" not in result.stderr  # the store is refused before the model


def test_an_unreachable_store_and_a_missing_bucket_are_clear_errors(s3, tmp_path):
    fs, bucket = s3
    write_tar_shard(tmp_path / "shard.tar", _samples(0, 1))
    dead = json.dumps({"s3": {"endpoint_url": f"http://127.0.0.1:{free_port()}",
                              "config_kwargs": {"retries": {"max_attempts": 1}}}})
    result = run_fastclip("embed", "--images", "s3://anything/x.tar", "-o", tmp_path / "out",
                          "--model", tiny_checkpoint(), "--storage-options", dead, check=False)
    assert result.returncode != 0 and "Cannot reach s3://anything/x.tar" in result.stderr, \
        result.stderr
    assert "Traceback" not in result.stderr
    result = run_fastclip("embed", "--images", tmp_path / "shard.tar", "-o",
                          "s3://no-such-bucket-here/out", "--model", tiny_checkpoint(),
                          check=False)
    assert result.returncode != 0, result.stderr
    assert "Cannot write to the output folder s3://no-such-bucket-here/out" in result.stderr, \
        result.stderr
