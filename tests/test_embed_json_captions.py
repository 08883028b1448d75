"""--caption-key json:FIELD: a WebDataset sample's caption read from a field of its .json."""

import json

from fastclip.embed.plan import plan_job
from fastclip.embed.reader import EmbedDataset, sample_caption
from fastclip.images import InputError
from fastclip.transform import Preprocess

from embed_helpers import image_bytes, write_tar_shard


def shard(tmp_path):
    samples = [
        ("a", {"jpg": image_bytes(1), "json": json.dumps({"caption": " a red square ",
                                                           "url": "http://x/a.jpg"}).encode()}),
        ("b", {"jpg": image_bytes(2), "json": b"{not json"}),
        ("c", {"jpg": image_bytes(3), "json": json.dumps({"url": "http://x/c.jpg"}).encode()}),
        ("d", {"jpg": image_bytes(4), "json": json.dumps({"caption": ["a", "list"]}).encode()}),
        ("e", {"jpg": image_bytes(5), "txt": b"a txt caption",
               "json": json.dumps({"meta": {"caption": "nested"}}).encode()}),
    ]
    path = tmp_path / "shard.tar"
    write_tar_shard(path, samples)
    return path


def rows_and_failures(path, caption_key, embed_texts):
    plan = plan_job(images=[str(path)])
    batches = list(EmbedDataset(plan.chunks, Preprocess(32), 8, True, embed_texts,
                                caption_key=caption_key))
    rows = {row["image_path"]: row["caption"] for batch in batches for row in batch["rows"]}
    failures = {failure["key"].rsplit(":", 1)[-1]: failure["reason"]
                for batch in batches for failure in batch["failures"]}
    return rows, failures


def test_json_field_captions_are_embedded(tmp_path):
    rows, failures = rows_and_failures(shard(tmp_path), "json:caption", embed_texts=True)
    assert rows == {"a": "a red square"}
    assert "not valid JSON" in failures["b"]
    assert failures["c"].startswith("no text")
    assert "is not text (a JSON list)" in failures["d"]
    assert failures["e"].startswith("no text")  # its caption is nested under meta
    rows, failures = rows_and_failures(shard(tmp_path), "json:meta.caption", embed_texts=True)
    assert rows == {"e": "nested"}


def test_json_captions_of_an_image_only_job_never_fail_a_sample(tmp_path):
    rows, failures = rows_and_failures(shard(tmp_path), "json:caption", embed_texts=False)
    assert not failures
    assert rows == {"a": "a red square", "b": None, "c": None, "d": None, "e": None}


def test_plain_extensions_still_read_the_member():
    fields = {"txt": b" plain ", "json": b'{"caption": "x"}'}
    assert sample_caption(fields, "txt") == "plain"
    assert sample_caption(fields, "json") == '{"caption": "x"}'
    assert sample_caption(fields, "json:caption") == "x"
    assert isinstance(sample_caption({"json": b"[1"}, "json:caption"), InputError)


def test_command_line_embeds_json_captions(tmp_path):
    import glob

    import pyarrow.parquet as pq

    from embed_helpers import read_output, run_fastclip, tiny_checkpoint
    path = shard(tmp_path)
    out = tmp_path / "out"
    run_fastclip("embed", "--images", path, "-o", out, "--model", tiny_checkpoint(),
                 "--caption-key", "json:caption", "--embed-captions", "--num-workers", "0")
    table = pq.read_table(glob.glob(str(out / "metadata" / "*.parquet"))[0])
    assert table.column("caption").to_pylist() == ["a red square"]
    assert len(read_output(out, "text_emb")) == 1
