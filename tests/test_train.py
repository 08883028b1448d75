"""The contrastive training loop (fastclip.train) on a tiny CLIP: the loss, the optimizer's
groups and schedule, that training lowers the loss, determinism, and that a run resumed from
a checkpoint continues exactly as an uninterrupted one."""

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch

from fastclip import train
from fastclip.cli.train import add_arguments, config_from
from fastclip.tokenizer import tokenize
from fastclip.train import shapes

from small_models import small_clip

# A smaller variant of the tests' small CLIP: one block per tower, 32-pixel images.
TINY = dict(embed_dim=64, image_resolution=32, vision_layers=1, vision_width=64,
            vision_patch_size=8, transformer_width=64, transformer_heads=1,
            transformer_layers=1)


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny model's matrices are too small to gain from a second thread, and on a busy
    # machine threads waiting for each other slow every step down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse(*argv):
    """The TrainConfig of ``fastclip train`` with ``argv`` (and no progress or evaluation)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from(parser.parse_args(["--quiet", "--eval-images", "0", *argv]))


def tiny_model(seed=0):
    return small_clip(seed, **TINY).set_backend("torch")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_model().state_dict(), path)
    return str(path)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def step_losses(path):
    return {r["step"]: r["loss"] for r in read_log(path) if "step" in r and "loss" in r}


# ------------------------------------------------------------------------- the loss

def test_contrastive_loss_is_symmetric_cross_entropy():
    logits = torch.randn(5, 5)
    by_hand = -(logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean()) / 2
    torch.testing.assert_close(train.contrastive_loss(logits), by_hand)
    # Uniform logits: ln(batch); a confident diagonal: near zero.
    assert train.contrastive_loss(torch.zeros(8, 8)).item() == pytest.approx(math.log(8))
    assert train.contrastive_loss(100 * torch.eye(8)).item() < 1e-6


def test_trim_padding_keeps_the_text_features():
    model = tiny_model().eval()
    tokens = tokenize(["a red circle", "a small blue star on a black background"])
    trimmed = train.trim_padding(tokens)
    assert trimmed.shape[1] == int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(tokens),
                                   rtol=1e-5, atol=1e-5)


def test_logit_scale_is_clamped_at_100():
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000))
    args = parse("--steps", "1", "--batch-size", "4")
    optimizer, scheduler = train.make_optimizer(model, args)
    images, tokens = train.ShapesBatches(0, 4, 32, 77)(0)
    train.train_step(model, optimizer, scheduler, images, train.trim_padding(tokens), "fp32",
                     1.0)
    assert model.logit_scale.exp().item() == pytest.approx(100, rel=1e-5)


# ------------------------------------------------------------ optimizer and schedule

def test_no_weight_decay_on_gains_biases_embeddings_and_logit_scale():
    model = tiny_model()
    decay, no_decay = train.parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    for name in ("logit_scale", "token_embedding.weight", "positional_embedding",
                 "visual.class_embedding", "visual.positional_embedding", "ln_final.weight",
                 "ln_final.bias", "transformer.resblocks.0.mlp.c_fc.bias"):
        assert name in exempt, name
    for name in ("visual.conv1.weight", "visual.proj", "text_projection",
                 "transformer.resblocks.0.attn.in_proj_weight",
                 "transformer.resblocks.0.mlp.c_fc.weight"):
        assert name in decayed, name


def test_warmup_then_cosine():
    schedule = train.WarmupCosine(warmup=10, total=110)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5)
    assert schedule(110) == pytest.approx(0.0, abs=1e-12)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# --------------------------------------------------------------------------- training

def test_a_few_hundred_steps_lower_the_loss():
    model = tiny_model()
    args = parse("--steps", "200", "--batch-size", "16", "--lr", "2e-3", "--warmup", "20")
    # Independent scenes (no groups that differ only in shape): the loop, not the dataset's
    # hardest contrasts, is under test.
    batches = train.ShapesBatches(0, 16, 32, 77, group_size=1)
    losses, _ = train.train(model, batches, args)
    assert len(losses) == 200
    print(f"tiny model, 200 steps: loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}")
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    # ln(16) = 2.77 is the loss of a model that cannot tell the pairs apart.
    assert first > 2.4, first
    # The 20-step means vary by about 0.05 from run to run; learning moves them by 0.5.
    assert last < first - 0.3, (first, last)


def test_training_is_deterministic_for_a_seed():
    def losses(seed):
        args = parse("--steps", "4", "--batch-size", "8", "--seed", str(seed))
        return train.train(tiny_model(seed), train.ShapesBatches(seed, 8, 32, 77), args)[0]

    assert losses(3) == losses(3)
    assert losses(3) != losses(4)


def test_resume_continues_the_same_run(tmp_path, tiny_checkpoint, monkeypatch):
    common = ["--init", tiny_checkpoint, "--steps", "16", "--batch-size", "8", "--warmup",
              "4", "--checkpoint-every", "6", "--log-every", "1", "--seed", "5"]
    whole = tmp_path / "whole.jsonl"
    train.run(parse(*common, "--checkpoint", str(tmp_path / "whole.pt"), "--log", str(whole)))

    # The same run, crashed at step 8: its last checkpoint is from step 6.
    parted = tmp_path / "parted.jsonl"
    checkpoint = str(tmp_path / "parted.pt")
    real_batches = train.ShapesBatches.__call__

    def crash_at_8(self, step):
        if step == 8:
            raise KeyboardInterrupt
        return real_batches(self, step)

    monkeypatch.setattr(train.ShapesBatches, "__call__", crash_at_8)
    with pytest.raises(KeyboardInterrupt):
        train.run(parse(*common, "--checkpoint", checkpoint, "--log", str(parted)))
    assert torch.load(checkpoint, weights_only=True)["step"] == 6
    monkeypatch.setattr(train.ShapesBatches, "__call__", real_batches)
    train.run(parse(*common, "--checkpoint", checkpoint, "--log", str(parted), "--resume"))

    starts = [r for r in read_log(parted) if r.get("event") == "start"]
    assert [r["start_step"] for r in starts] == [0, 6]
    resumed = [r for r in read_log(parted) if "step" in r][8:]  # after the crash
    assert [r["step"] for r in resumed] == list(range(7, 17))
    expected = step_losses(whole)
    assert [r["loss"] for r in resumed] == [expected[s] for s in range(7, 17)]
    final_whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    final_parted = torch.load(checkpoint, weights_only=True)
    for key, value in final_whole["state_dict"].items():
        assert torch.equal(value, final_parted["state_dict"][key]), key


def test_resume_with_other_options_is_refused(tmp_path, tiny_checkpoint):
    checkpoint = str(tmp_path / "run.pt")
    common = ["--init", tiny_checkpoint, "--batch-size", "4", "--checkpoint", checkpoint]
    train.run(parse(*common, "--steps", "2"))
    with pytest.raises(ValueError, match=r"--steps 2 \(now 5\)"):
        train.run(parse(*common, "--steps", "5", "--resume"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = tiny_model()
    args = parse("--steps", "2")
    optimizer, scheduler = train.make_optimizer(model, args)
    path = str(tmp_path / "run.pt")
    train.save_checkpoint(path, model, optimizer, scheduler, 1, args)
    before = open(path, "rb").read()

    def dies_midway(obj, f, *a, **k):
        f.write(b"truncated")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        train.save_checkpoint(path, model, optimizer, scheduler, 2, args)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["run.pt"]


def test_fine_tunes_a_loaded_model_on_a_caption_file(tmp_path, tiny_checkpoint):
    lines = []
    for i, scene in enumerate(shapes.make_batch(0, 0, 4, 32)[2]):
        shapes.render(scene, 48).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png\t{scene.caption()}")
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    export = tmp_path / "tuned.pt"
    train.run(parse("--init", tiny_checkpoint, "--data", str(tmp_path / "pairs.tsv"),
                    "--steps", "3", "--batch-size", "4", "--export", str(export)))
    tuned = torch.load(export, weights_only=True)
    start = torch.load(tiny_checkpoint, weights_only=True)
    assert tuned["visual.conv1.weight"].dtype == torch.float16
    assert not torch.equal(tuned["visual.proj"].float(), start["visual.proj"].half().float())
    # Tokens absent from the captions keep their pretrained rows (no zeroed rows).
    assert tuned["token_embedding.weight"].ne(0).any(dim=1).all()
    description = json.loads((tmp_path / "tuned.json").read_text())
    assert description["config"]["vision_width"] == TINY["vision_width"]


def test_export_zeroes_only_untrained_token_rows(tmp_path):
    model = tiny_model()
    args = parse("--steps", "2", "--batch-size", "4")
    batches = train.ShapesBatches(0, 4, 32, 77)
    _, optimizer = train.train(model, batches, args)
    unused = train.untouched_token_rows(optimizer, model)
    tokens = torch.cat([batches(0)[1], batches(1)[1]])
    # Padding (id 0) comes after the end of text, so it never reaches the features.
    assert set(torch.nonzero(~unused).flatten().tolist()) == set(tokens.unique().tolist()) - {0}
    train.export_model(model, tmp_path / "m.pt", unused_token_rows=unused)
    exported = torch.load(tmp_path / "m.pt", weights_only=True)["token_embedding.weight"]
    assert (exported[unused] == 0).all()
    torch.testing.assert_close(exported[~unused].float(),
                               model.token_embedding.weight[~unused].detach(),
                               rtol=1e-3, atol=1e-3)
    assert os.path.getsize(tmp_path / "m.pt") < 1_500_000  # the zero rows compress away


# ----------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, message", [
    (["--resume"], "--resume needs --checkpoint"),
    (["--batch-size", "1"], "at least 2"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--data", "/no/such/pairs.tsv"], "neither 'shapes' nor a file"),
])
def test_bad_arguments_are_explained(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def test_malformed_caption_file_names_the_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("a.png\ta caption\nb.png without a tab\n")
    with pytest.raises(ValueError, match=r"pairs.tsv, line 2"):
        train.CaptionFileBatches(str(path), 0, 1, 32, 77)


def test_caption_file_smaller_than_a_batch_is_explained(tmp_path):
    path = tmp_path / "two.tsv"
    path.write_text("a.png\ta black square\nb.png\ta dark square\n")
    with pytest.raises(ValueError, match="fewer than the batch size 8"):
        train.CaptionFileBatches(str(path), 0, 8, 32, 77)
