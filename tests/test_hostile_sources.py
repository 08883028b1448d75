"""Sources that fight back: file names that read as commands or URL chains, commands that
flood their error output, lists and tables that change after planning, servers without
range requests, CSVs with multi-line captions, dotted column names, and the plan's walk
stopping at --limit."""

import functools
import http.server
import os
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from fastclip.embed import embed
from fastclip.embed.plan import plan_job

from embed_helpers import (
    REPO,
    image_bytes,
    read_failures,
    read_output,
    tiny_checkpoint,
    write_images,
    write_tar_shard,
)

OPTIONS = dict(model=tiny_checkpoint(), progress=False, num_workers=0, dtype="fp32")


def test_a_file_named_like_a_pipe_that_a_glob_matches_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipe:touch ran; echo.tar").write_bytes(b"")
    write_tar_shard(tmp_path / "good.tar", [("a", {"jpg": image_bytes(0)})])
    summary = embed(str(tmp_path / "out"), images=["*.tar"], **OPTIONS)
    assert summary["rows"] == 1 and summary["failures"] == 1
    assert not (tmp_path / "ran").exists()


def test_a_command_that_floods_its_error_output_does_not_stall_the_job(tmp_path):
    write_tar_shard(tmp_path / "s.tar", [(f"{i}", {"jpg": image_bytes(i)}) for i in range(2)])
    script = (f"import sys; sys.stderr.write('x' * 500000); sys.stderr.flush(); "
              f"sys.stdout.buffer.write(open({str(tmp_path / 's.tar')!r}, 'rb').read())")
    command = f"pipe:{sys.executable} -c \"{script}\""
    result = subprocess.run([sys.executable, "-m", "fastclip", "embed", "--images", command,
                             "-o", str(tmp_path / "out"), "--model", tiny_checkpoint(),
                             "--no-progress"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 items, 0 failures" in result.stderr


def test_chained_urls_and_pipes_in_a_list_are_file_names_in_its_folder(tmp_path):
    (tmp_path / "list.txt").write_text("simplecache::http://127.0.0.1:9/x.jpg\npipe:echo hi\n")
    summary = embed(str(tmp_path / "out"), images=[str(tmp_path / "list.txt")], **OPTIONS)
    assert summary["failures"] == 2
    assert all(key.startswith(str(tmp_path)) and "unreadable" in reason
               for key, reason in read_failures(tmp_path / "out").items())


def test_a_list_changed_after_planning_fails_its_inputs_rather_than_losing_them(tmp_path):
    (tmp_path / "list.txt").write_text("".join(f"{i}.jpg\n" for i in range(6)))
    plan = plan_job(images=[str(tmp_path / "list.txt")], shard_size=3)
    (tmp_path / "list.txt").write_text("0.jpg\n")
    items = plan.chunks[1].items
    assert len(items) == 3
    assert all("changed since the job was planned" in item.error for item in items)


def test_a_table_changed_after_planning_fails_its_inputs(tmp_path):
    pq.write_table(pa.table({"image_path": [f"{i}.jpg" for i in range(4)]}),
                   tmp_path / "t.parquet")
    plan = plan_job(images=[str(tmp_path / "t.parquet")], shard_size=2)
    pq.write_table(pa.table({"image_path": ["0.jpg"]}), tmp_path / "t.parquet")
    assert all("changed since" in item.error for item in plan.chunks[1].items)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_list_on_a_server_without_range_requests_reads_every_shard(tmp_path):
    """Python's http.server answers every request whole: the workers read up to a
    shard's first line instead of seeking to it."""
    site = tmp_path / "site"
    site.mkdir()
    for i in range(4):
        (site / f"{i}.jpg").write_bytes(image_bytes(i))
    (site / "list.txt").write_text("".join(f"{i}.jpg\n" for i in range(4)))
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/list.txt"
        summary = embed(str(tmp_path / "out"), images=[url], shard_size=1, **OPTIONS)
    finally:
        server.shutdown()
        server.server_close()
    assert summary["rows"] == 4 and summary["failures"] == 0, read_failures(tmp_path / "out")


def test_csv_captions_over_several_lines_in_a_large_file(tmp_path):
    images = write_images(tmp_path / "images", 2, nested=False)
    rows = [f'"{images[i % 2]}","a caption\nover two lines {i}"' for i in range(30000)]
    (tmp_path / "t.csv").write_text("image_path,caption\n" + "\n".join(rows) + "\n")
    assert os.path.getsize(tmp_path / "t.csv") > 2 << 20  # more than one parser block
    plan = plan_job(images=[str(tmp_path / "t.csv")], embed_captions=True, shard_size=50_000)
    items = plan.chunks[0].items
    assert len(items) == 30000 and items[-1].text == "a caption\nover two lines 29999"


def test_column_names_with_dots_are_columns(tmp_path):
    images = write_images(tmp_path / "images", 2, nested=False)
    pq.write_table(pa.table({"img.path": images, "meta.url": ["u0", "u1"]}),
                   tmp_path / "t.parquet")
    embed(str(tmp_path / "out"), images=[str(tmp_path / "t.parquet")], image_column="img.path",
          enable_metadata=True, **OPTIONS)
    assert len(read_output(tmp_path / "out")) == 2
    metadata = pq.read_table(tmp_path / "out" / "metadata")
    assert metadata.column("meta.url").to_pylist() == ["u0", "u1"]


def test_a_worker_reads_each_row_group_once(tmp_path, monkeypatch):
    data = [image_bytes(i) for i in range(120)]
    pq.write_table(pa.table({"jpg": pa.array(data, pa.binary()), "n": list(range(120))}),
                   tmp_path / "t.parquet", row_group_size=40)
    reads = []
    original = pq.ParquetFile.read_row_groups

    def counted(self, groups, *args, **kwargs):
        reads.append(tuple(groups))
        return original(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counted)
    summary = embed(str(tmp_path / "out"), images=[str(tmp_path / "t.parquet")],
                    image_column="jpg", enable_metadata=True, batch_size=16, **OPTIONS)
    assert summary["rows"] == 120
    assert len(reads) <= 3, reads  # not once per input, nor per window of rows


def test_the_plan_walks_no_further_than_the_limit(tmp_path, monkeypatch):
    from fastclip.embed import segments
    for part in range(5):
        write_images(tmp_path / f"part{part}", 3, start=3 * part, nested=False)
    walked = []
    original = os.walk

    def counted(*args, **kwargs):
        for triple in original(*args, **kwargs):
            walked.append(triple[0])
            yield triple

    monkeypatch.setattr(segments.os, "walk", counted)
    plan = plan_job(images=[str(tmp_path)], limit=4)
    assert [c.known_size for c in plan.chunks] == [4]
    assert len(walked) <= 3, walked  # the root, part0 and part1; not part2 to part4
