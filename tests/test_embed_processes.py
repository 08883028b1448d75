"""fastclip embed across processes: a run killed with SIGKILL and resumed, and two ranks
under torchrun, each compared with one uninterrupted process."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

from fastclip.embed import embed

from embed_helpers import (
    REPO,
    assert_rows_equal,
    read_output,
    run_fastclip,
    tiny_checkpoint,
    write_corrupt_files,
    write_images,
)


def embed_in_process(output, checkpoint, images, **options):
    embed(str(output), images=images, model=checkpoint, progress=False, num_workers=0,
          **options)


def test_sigkilled_run_resumes_to_the_same_rows(tmp_path):
    write_images(tmp_path / "images", 40)
    write_corrupt_files(tmp_path / "images" / "bad")
    images = [str(tmp_path / "images")]
    options = ["--shard-size", "2", "--batch-size", "2", "--num-workers", "0", "--dtype", "fp32"]
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "fastclip", "embed", "--images", *images, "-o", str(out),
         "--model", tiny_checkpoint(), "--no-progress", *options],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not glob.glob(str(out / ".fastclip" / "done_*.json")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard was written within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    done_before = len(glob.glob(str(out / ".fastclip" / "done_*.json")))

    result = run_fastclip("embed", "--images", *images, "-o", out, "--model", tiny_checkpoint(),
                          "--resume", "--no-progress", *options)
    assert "items" in result.stderr and "failures" in result.stderr, result.stderr
    embed_in_process(tmp_path / "whole", tiny_checkpoint(), images, shard_size=2, batch_size=2,
                     dtype="fp32")
    assert_rows_equal(read_output(out), read_output(tmp_path / "whole"), 0.0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["inputs"] == 44 and manifest["failures"] == 4, manifest
    # Whether or not the kill landed mid-run, every shard exists once.
    assert done_before >= 1
    assert len(glob.glob(str(out / ".fastclip" / "done_*.json"))) == 22


def test_two_torchrun_ranks_give_the_rows_of_one_process(tmp_path):
    write_images(tmp_path / "images", 9)
    write_corrupt_files(tmp_path / "images" / "bad")
    images = [str(tmp_path / "images")]
    result = run_fastclip(
        "embed", "--images", *images, "-o", tmp_path / "ranks", "--model", tiny_checkpoint(),
        "--shard-size", "2", "--num-workers", "1", "--no-progress",
        launcher=["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"],
        env={"OMP_NUM_THREADS": "1"})
    assert "rank 0:" in result.stderr and "rank 1:" in result.stderr, result.stderr
    embed_in_process(tmp_path / "one", tiny_checkpoint(), images, shard_size=2)
    ranks, one = read_output(tmp_path / "ranks"), read_output(tmp_path / "one")
    assert_rows_equal(ranks, one, 5e-4)  # fp16 storage: one ulp at most
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text())
                 for name in ("ranks", "one")]
    assert manifests[0]["counts"] == manifests[1]["counts"]
    assert os.path.exists(tmp_path / "ranks" / "failures.jsonl")


def test_a_refused_output_folder_stops_every_torchrun_rank(tmp_path):
    """Rank 0 checks the output folder; the other rank must stop with its error at once, not
    wait at a barrier until the process group's timeout."""
    write_images(tmp_path / "images", 2)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not a fastclip job")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastclip", "embed", "--images", str(tmp_path / "images"),
         "-o", str(tmp_path / "taken"), "--model", tiny_checkpoint(), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    assert "is not empty and holds no fastclip job" in result.stderr, result.stderr
    assert "rank 0 stopped the job" in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path / "taken")) == ["notes.txt"]


def test_a_rank_that_fails_mid_job_stops_the_others(tmp_path):
    """A rank whose shard cannot be written tells the others at the end of the job: they
    stop with an error that says to resume, and no manifest claims the job complete."""
    write_images(tmp_path / "images", 4)
    out = tmp_path / "out"
    common = ["embed", "--images", str(tmp_path / "images"), "-o", out, "--model",
              tiny_checkpoint(), "--shard-size", "1", "--num-workers", "0", "--no-progress"]
    torchrun = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    environment = {"OMP_NUM_THREADS": "1"}
    run_fastclip(*common, launcher=torchrun, env=environment)
    # Shards 1 and 3 (rank 1's) are redone on --resume; a folder where shard 1's embeddings
    # go makes rank 1's writer fail.
    for folder, _, names in os.walk(out):  # the done markers too, in .fastclip/
        for name in names:
            if name.rsplit(".", 1)[0].endswith(("_1", "_3")):
                os.remove(os.path.join(folder, name))
    os.remove(out / "manifest.json")
    os.makedirs(out / "img_emb" / "img_emb_1.npy")
    result = run_fastclip(*common, "--resume", launcher=torchrun, env=environment, check=False)
    assert result.returncode != 0
    assert "Another rank of this job failed" in result.stderr, result.stderr
    assert "Writing to" in result.stderr, result.stderr
    assert not (out / "manifest.json").exists()
    # The job completes once the obstacle is gone.
    os.rmdir(out / "img_emb" / "img_emb_1.npy")
    run_fastclip(*common, "--resume", launcher=torchrun, env=environment)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["inputs"] == 4 and manifest["counts"]["rows"] == 4
