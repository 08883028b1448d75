"""Input discovery and planning of fastclip embed: brace patterns, globs, folders, lists,
tables, chunks and rank slices."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastclip.embed.plan import Chunk, expand_braces, expand_source, plan_job, rank_chunks

from embed_helpers import write_images


def test_expand_braces_ranges_keep_zero_padding_and_alternatives():
    assert expand_braces("s/{0008..0011}.tar") == [
        "s/0008.tar", "s/0009.tar", "s/0010.tar", "s/0011.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_expand_source_globs_and_reports_what_is_missing(tmp_path):
    for name in ("a.tar", "b.tar", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_source(tmp_path / "*.tar") == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_source(tmp_path / "*.parquet")
    with pytest.raises(FileNotFoundError, match=r"zz\.tar.*does not exist"):
        expand_source(tmp_path / "{a,zz}.tar")


def test_folder_is_listed_recursively_in_sorted_order_without_sidecars(tmp_path):
    paths = write_images(tmp_path, 5)
    (tmp_path / "part0" / "img0000.txt").write_text("a caption, not an input")
    plan = plan_job(images=[str(tmp_path)], shard_size=2)
    items = [item for chunk in plan.chunks for item in chunk.items]
    assert [item.image_path for item in items] == paths
    assert [len(chunk.items) for chunk in plan.chunks] == [2, 2, 1]
    assert [chunk.index for chunk in plan.chunks] == [0, 1, 2]


def test_lists_and_tables_resolve_paths_relative_to_their_folder(tmp_path):
    (tmp_path / "list.txt").write_text("x/one.jpg\n\n/abs/two.jpg\n")
    pq.write_table(pa.table({"path": ["three.jpg"], "caption": ["a cat"]}),
                   tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("path,caption\nfour.jpg,a dog\n")
    plan = plan_job(images=[str(tmp_path / "list.txt"), str(tmp_path / "t.{parquet,csv}")],
                    image_column="path", embed_captions=True)
    items = plan.chunks[0].items
    assert [i.image_path for i in items] == [
        str(tmp_path / "x/one.jpg"), "/abs/two.jpg", str(tmp_path / "three.jpg"),
        str(tmp_path / "four.jpg")]
    assert [i.text for i in items] == [None, None, "a cat", "a dog"]
    assert plan.embed_images and plan.embed_texts


def test_missing_column_names_the_columns_that_exist(tmp_path):
    (tmp_path / "t.csv").write_text("url,caption\nx.jpg,a\n")
    with pytest.raises(ValueError, match=r"no column 'image_path'.*\['url', 'caption'\]"):
        plan_job(images=[str(tmp_path / "t.csv")])


def test_texts_pair_with_images_only_when_counts_match(tmp_path):
    write_images(tmp_path / "images", 3)
    (tmp_path / "texts.txt").write_text("one\ntwo\nthree\n")
    plan = plan_job(images=[str(tmp_path / "images")], texts=[str(tmp_path / "texts.txt")])
    assert [i.text for i in plan.chunks[0].items] == ["one", "two", "three"]
    (tmp_path / "texts.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="3 images and --texts gives 2 texts"):
        plan_job(images=[str(tmp_path / "images")], texts=[str(tmp_path / "texts.txt")])


def test_tar_shards_are_one_chunk_each_after_the_file_chunks(tmp_path):
    write_images(tmp_path / "images", 3)
    for n in range(3):
        (tmp_path / f"{n:05d}.tar").write_bytes(b"")
    plan = plan_job(images=[str(tmp_path / "images"), str(tmp_path / "{00000..00002}.tar")],
                    shard_size=2)
    assert [c.known_size for c in plan.chunks] == [2, 1, None, None, None]
    assert [os.path.basename(c.tar_path) for c in plan.chunks[2:]] == [
        "00000.tar", "00001.tar", "00002.tar"]
    with pytest.raises(ValueError, match="--limit applies to"):
        plan_job(images=[str(tmp_path / "00000.tar")], limit=3)


def test_rank_slices_are_disjoint_cover_everything_and_do_not_pad():
    plan = [Chunk(index=i) for i in range(7)]
    slices = [rank_chunks(plan, rank, 3) for rank in range(3)]
    indices = sorted(c.index for s in slices for c in s)
    assert indices == list(range(7))
    assert [len(s) for s in slices] == [3, 2, 2]
    with pytest.raises(ValueError, match="RANK=3"):
        rank_chunks(plan, 3, 3)


def test_fingerprint_changes_with_inputs_and_shard_size(tmp_path):
    write_images(tmp_path, 4)
    base = plan_job(images=[str(tmp_path)], shard_size=2)
    assert plan_job(images=[str(tmp_path)], shard_size=2).fingerprint == base.fingerprint
    assert plan_job(images=[str(tmp_path)], shard_size=3).fingerprint != base.fingerprint
    assert plan_job(images=[str(tmp_path)], shard_size=2, limit=3).fingerprint != \
        base.fingerprint


def test_shard_numbers_are_zero_padded_to_one_width(tmp_path):
    (tmp_path / "texts.txt").write_text("\n".join(f"text {i}" for i in range(11)))
    plan = plan_job(texts=[str(tmp_path / "texts.txt")], shard_size=1)
    assert len(plan.chunks) == 11 and plan.name_width == 2


def test_unreadable_source_files_are_explained(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        plan_job(texts=[str(tmp_path / "latin1.txt")])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="Cannot read the table .*broken.parquet"):
        plan_job(images=[str(tmp_path / "broken.parquet")])


def test_a_long_list_is_planned_without_holding_its_paths(tmp_path):
    import gc
    import tracemalloc
    lines = 100_000
    with open(tmp_path / "list.txt", "w") as f:
        f.writelines(f"images/{i // 1000:03d}/{i:08d}.jpg\n" for i in range(lines))
    gc.collect()
    tracemalloc.start()
    plan = plan_job(images=[str(tmp_path / "list.txt")], shard_size=10_000)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 100,000 paths held as items would take tens of MB; the plan keeps 20 bytes or so each.
    assert held < 4 << 20, f"the plan holds {held / 2**20:.1f} MiB"
    assert [c.known_size for c in plan.chunks] == [10_000] * 10
    third = plan.chunks[3].items
    assert third[0].image_path == str(tmp_path / "images/030/00030000.jpg")
    assert len(third) == 10_000 and third[-1].key.endswith("00039999.jpg")


def test_repeats_are_found_across_chunks_and_sources(tmp_path):
    (tmp_path / "a.txt").write_text("x.jpg\ny.jpg\nz.jpg\n")
    (tmp_path / "b.txt").write_text("w.jpg\ny.jpg\n")
    plan = plan_job(images=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], shard_size=2)
    errors = [item.error for chunk in plan.chunks for item in chunk.items]
    assert errors == [None, None, None, None, "duplicate key: the same input as input 2 of "
                      "the job"]


def test_limit_reads_only_the_inputs_it_embeds(tmp_path):
    (tmp_path / "list.txt").write_bytes(b"a.jpg\nb.jpg\n" + "caf\xe9\n".encode("latin-1"))
    plan = plan_job(images=[str(tmp_path / "list.txt")], limit=2)
    assert [c.known_size for c in plan.chunks] == [2]
    with pytest.raises(ValueError, match="not UTF-8 text"):
        plan_job(images=[str(tmp_path / "list.txt")])


def test_a_folder_that_changes_after_planning_gives_failures_not_a_crash(tmp_path):
    paths = write_images(tmp_path / "images", 4, nested=False)
    plan = plan_job(images=[str(tmp_path / "images")])
    os.remove(paths[-1])
    items = plan.chunks[0].items
    assert [item.error is None for item in items] == [True, True, True, False]
    assert "changed since the job was planned" in items[-1].error


def test_a_pipe_source_is_one_command_per_shard_of_its_brace_pattern():
    plan = plan_job(images=["pipe:cat shards/{00..02}.tar"])
    assert [c.tar_path for c in plan.chunks] == [
        "pipe:cat shards/00.tar", "pipe:cat shards/01.tar", "pipe:cat shards/02.tar"]
