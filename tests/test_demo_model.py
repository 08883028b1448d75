"""The bundled model fastclip-shapes-rn, and the procedural shapes dataset it was trained on:
the model loads by name with no network and recognizes shape-color combinations it never
saw in training."""

import json
import os
import urllib.request
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import fastclip
from fastclip import cli
from fastclip.model import infer_config
from fastclip.train import shapes
from fastclip.transform import Preprocess

NAME = "fastclip-shapes-rn"
PRETRAINED = os.path.join(os.path.dirname(fastclip.__file__), "pretrained")
OPENAI_MODELS = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16",
                 "ViT-L/14", "ViT-L/14@336px"]


@pytest.fixture(scope="module")
def demo():
    model, preprocess = fastclip.load(NAME, device="cpu")
    return model, preprocess


# ---------------------------------------------------------------------- the model

def test_listed_and_loaded_by_name_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("fastclip.load tried to download the bundled model")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert fastclip.available_models() == OPENAI_MODELS + [NAME]
    model, preprocess = fastclip.load(NAME, device="cpu")
    assert model.visual.input_resolution == 64 and preprocess.n_px == 64
    assert model.context_length == 77 and model.vocab_size == 49408
    assert not model.training and model.dtype == torch.float32


def test_shipped_weights_are_a_small_fp16_state_dict():
    path = os.path.join(PRETRAINED, f"{NAME}.pt")
    assert os.path.getsize(path) < 8 * 2**20
    state = torch.load(path, weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    with open(os.path.join(PRETRAINED, f"{NAME}.json")) as f:
        description = json.load(f)
    config = infer_config(state)
    assert description["config"] == {k: list(v) if isinstance(v, tuple) else v
                                      for k, v in config.items()}
    assert config["transformer_width"] % 64 == 0  # loading infers heads as width // 64


def test_fp16_load_matches_fp32(demo):
    model, _ = demo
    half, _ = fastclip.load(NAME, device="cpu", dtype=torch.bfloat16)
    images = shapes.make_batch(7, 0, 8, split="held_out")[0]
    with torch.no_grad():
        full = model.encode_image(images)
        low = half.encode_image(images).float()
    cosine = torch.nn.functional.cosine_similarity(full, low)
    assert cosine.min() > 0.99, cosine


def test_zero_shot_accuracy_on_held_out_combinations(demo):
    model, _ = demo
    # Fresh images: the training run drew its batches from seed 0 and evaluated seed 1.
    result = shapes.evaluate(model, n=512, seed=2026, split="held_out")
    print(f"\n{NAME} on 512 held-out images (shape-color pairs never seen in training): "
          f"zero-shot accuracy {result['accuracy']:.3f} over {round(1 / result['chance'])} classes "
          f"(chance {result['chance']:.3f}); shape {result['shape_accuracy']:.3f}, "
          f"color {result['color_accuracy']:.3f}; image-to-caption recall@1 "
          f"{result['recall_at_1']:.3f}")
    assert result["accuracy"] >= 0.9
    assert result["recall_at_1"] >= 0.5


def test_sample_images_are_classified(tmp_path, demo):
    """The README's first command: sample images written to a folder, then classified."""
    model, preprocess = demo
    paths = shapes.write_samples(tmp_path, n=8)  # six shapes, then two repeated
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)
    truth = [" ".join(os.path.basename(p).split(".")[0].split("_")[:2]) for p in paths]
    labels = [f"a {color} {shape}" for shape in shapes.SHAPES for color in shapes.COLORS]
    images = torch.stack([preprocess(Image.open(p)) for p in paths])
    with torch.no_grad():
        logits, _ = model(images, fastclip.tokenize(labels))
    predicted = [labels[i][len("a "):] for i in logits.argmax(dim=1).tolist()]
    assert predicted == truth


# ------------------------------------------------------------------- the dataset

def test_held_out_pairs_take_each_shape_once_in_different_colors():
    held_out = shapes.HELD_OUT_PAIRS
    assert Counter(s for s, _ in held_out) == Counter(shapes.SHAPES)
    colors = [c for _, c in held_out]
    assert len(set(colors)) == len(colors) and set(colors) <= set(shapes.COLORS)


def test_training_split_never_shows_a_held_out_pair():
    rng = np.random.default_rng(0)
    train = {(s.shape, s.color) for s in (shapes.sample_scene(rng) for _ in range(3000))}
    held_out = {(s.shape, s.color)
                for s in (shapes.sample_scene(rng, "held_out") for _ in range(300))}
    assert train == set(shapes.classes()[0]) - shapes.HELD_OUT_PAIRS
    assert held_out == shapes.HELD_OUT_PAIRS


def test_batches_are_a_function_of_seed_and_step():
    images, captions, _ = shapes.make_batch(3, 5, 4, image_size=32)
    again, captions_again, _ = shapes.make_batch(3, 5, 4, image_size=32)
    other, _, _ = shapes.make_batch(3, 6, 4, image_size=32)
    assert torch.equal(images, again) and captions == captions_again
    assert not torch.equal(images, other)


def test_training_groups_differ_only_in_shape():
    _, _, scenes = shapes.make_batch(0, 0, 16, group_size=4)
    for start in range(0, 16, 4):
        group = scenes[start:start + 4]
        assert len({s.shape for s in group}) == 4
        assert len({(s.color, s.size, s.background) for s in group}) == 1
        assert not {(s.shape, s.color) for s in group} & shapes.HELD_OUT_PAIRS


def test_batch_images_are_preprocessed_renders():
    images, captions, scenes = shapes.make_batch(1, 0, 3, image_size=64)
    preprocess = Preprocess(64)
    expected = torch.stack([preprocess(shapes.render(s, 128)) for s in scenes])
    assert torch.equal(images, expected)
    for caption, scene in zip(captions, scenes):
        assert scene.color in caption and scene.shape in caption


def test_render_draws_the_shape_in_its_color():
    scene = shapes.sample_scene(np.random.default_rng(4))
    pixels = np.asarray(shapes.render(scene, 128)).reshape(-1, 3).astype(int)
    fill = np.array(shapes.COLORS[scene.color]) + scene.color_jitter
    covered = (np.abs(pixels - np.clip(fill, 0, 255)).max(axis=1) <= 1).mean()
    disc = np.pi * scene.radius ** 2  # the shape lies within its circle of `radius`
    assert 0.15 * disc < covered <= disc + 0.01, (covered, disc)


def test_unknown_split_is_explained():
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        shapes.sample_scene(np.random.default_rng(0), "test")


def test_samples_command_writes_named_images(tmp_path, capsys):
    assert cli.main(["shapes", str(tmp_path / "samples"), "-n", "10", "--size", "96"]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 10 and all(os.path.isfile(p) for p in paths)
    assert all(Image.open(p).size == (96, 96) for p in paths)
    named = {os.path.basename(p).split(".")[0].split("_")[1] for p in paths}
    assert named == set(shapes.SHAPES)


def test_samples_command_refuses_bad_sizes(tmp_path, capsys):
    assert cli.main(["shapes", str(tmp_path / "samples"), "-n", "0"]) == 2
    assert "-n must be at least 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "samples")
