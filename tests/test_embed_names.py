"""The names of an output folder's shards: padded as clip-retrieval pads them, and kept by a
resumed job whatever the version that began it."""

import json
import os

from fastclip.embed import embed

from embed_helpers import tiny_checkpoint, write_images


def run(output, checkpoint, **options):
    options = {"batch_size": 2, "num_workers": 0, "dtype": "fp32", "progress": False,
               **options}
    return embed(str(output), model=checkpoint, **options)


def test_shard_names_are_padded_as_clip_retrieval_pads_them(tmp_path):
    paths = write_images(tmp_path / "images", 10, nested=False)
    run(tmp_path / "out", tiny_checkpoint(), images=[str(tmp_path / "images")], shard_size=1)
    names = sorted(os.listdir(tmp_path / "out" / "img_emb"))
    assert names == [f"img_emb_{i:02d}.npy" for i in range(10)]  # int(log10(10)) + 1 digits
    assert len(paths) == 10


def test_a_resumed_job_keeps_the_shard_names_it_began_with(tmp_path):
    """A job begun by a version that padded ten shards to one digit resumes with one."""
    write_images(tmp_path / "images", 10, nested=False)
    images = [str(tmp_path / "images")]
    run(tmp_path / "out", tiny_checkpoint(), images=images, shard_size=1)
    state = tmp_path / "out" / ".fastclip"
    plan = json.loads((state / "plan.json").read_text())
    del plan["name_width"]  # as earlier versions wrote it
    (state / "plan.json").write_text(json.dumps(plan))
    for folder in ("img_emb", "metadata", ".fastclip"):  # rename the shards as they named them
        for name in os.listdir(tmp_path / "out" / folder):
            new = name.replace("_0", "_", 1) if "_0" in name else name
            os.rename(tmp_path / "out" / folder / name, tmp_path / "out" / folder / new)
    os.remove(state / "done_9.json")
    summary = run(tmp_path / "out", tiny_checkpoint(), images=images, shard_size=1,
                  resume=True)
    assert summary["inputs"] == 1 and summary["manifest"] is not None
    assert "img_emb_9.npy" in os.listdir(tmp_path / "out" / "img_emb")
