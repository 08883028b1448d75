"""The fastclip command: subcommands, errors, and the embed -> search -> classify path."""

import shutil
import subprocess

import pytest

import fastclip
from fastclip import cli
from fastclip.images import decode_image, read_file
from fastclip.zero_shot import SIMPLE_TEMPLATES, classify, zero_shot_classifier

from embed_helpers import read_output, run_fastclip, tiny_checkpoint, write_images


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("embed", "classify", "search"):
        assert name in text


def test_every_subcommand_module_has_add_arguments_and_run():
    import importlib
    for name, (module_name, _) in cli.SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.run), name


def test_input_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    status = cli.main(["embed", "--images", str(tmp_path / "nowhere"), "-o",
                       str(tmp_path / "out"), "--model", "random:tiny", "--no-progress"])
    assert status == 2
    error = capsys.readouterr().err
    assert "fastclip embed: error:" in error and "nowhere" in error and "Traceback" not in error


def test_python_m_fastclip_embeds_with_a_random_model(tmp_path):
    write_images(tmp_path / "images", 3)
    result = run_fastclip("embed", "--images", tmp_path / "images", "-o", tmp_path / "out",
                          "--model", "random:tiny", "--batch-size", "2")
    assert "3 items, 0 failures" in result.stderr and "items/s" in result.stderr
    assert "item/s" in result.stderr and "failures=0" in result.stderr  # the progress bar
    assert len(read_output(tmp_path / "out")) == 3


@pytest.mark.skipif(shutil.which("fastclip") is None, reason="the console script is not installed")
def test_console_script_runs():
    result = subprocess.run(["fastclip", "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == f"fastclip {fastclip.__version__}"


def test_search_finds_the_embedded_text_and_image(tmp_path, capsys):
    paths = write_images(tmp_path / "images", 5)
    texts = ["a red car", "a small dog", "the moon at night", "a bowl of soup", "two birds"]
    (tmp_path / "texts.txt").write_text("\n".join(texts))
    assert cli.main(["embed", "--images", str(tmp_path / "images"), "--texts",
                     str(tmp_path / "texts.txt"), "-o", str(tmp_path / "out"), "--model",
                     tiny_checkpoint(), "--num-workers", "0", "--no-progress"]) == 0
    capsys.readouterr()

    assert cli.main(["search", str(tmp_path / "out"), "the moon at night", "--kind", "text",
                     "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    score, label = lines[0].split("\t")
    assert label == paths[2] and float(score) > 0.999  # the pair's image path labels the row

    assert cli.main(["search", str(tmp_path / "out"), paths[3], "-k", "1"]) == 0
    score, label = capsys.readouterr().out.strip().split("\t")
    assert label == paths[3] and float(score) > 0.999


def test_classify_prints_the_top_label_of_the_python_api(tmp_path, capsys):
    paths = write_images(tmp_path / "images", 2)
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    labels = ["cat", "dog", "car"]
    status = cli.main(["classify", *paths, str(tmp_path / "broken.jpg"), "--labels",
                       ",".join(labels), "--templates", "simple", "--model", tiny_checkpoint(),
                       "-k", "3"])
    captured = capsys.readouterr()
    assert status == 1 and "broken.jpg: skipped: not an image" in captured.err
    model, preprocess = fastclip.load(tiny_checkpoint(), device="cpu")
    weights = zero_shot_classifier(model, labels, SIMPLE_TEMPLATES)
    for path, line in zip(paths, captured.out.splitlines()):
        image = preprocess(decode_image(read_file(path)))[None]
        best = labels[int(classify(model, image, weights)[0].argmax())]
        printed_path, ranked = line.split("\t")
        assert printed_path == path and ranked.split(",")[0].rsplit(" ", 1)[0] == best


def test_embed_exits_1_when_every_input_failed_or_too_many(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"bad{i}.jpg").write_bytes(b"not an image")
    result = run_fastclip("embed", "--images", images, "-o", tmp_path / "out", "--model",
                          "random:tiny", "--no-progress", "--num-workers", "0", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "fastclip embed: error: every input failed (3 of 3)")
    write_images(images, 3, nested=False)  # now 3 of 6 fail
    result = run_fastclip("embed", "--images", images, "-o", tmp_path / "half", "--model",
                          "random:tiny", "--no-progress", "--num-workers", "0",
                          "--max-failure-rate", "0.25", check=False)
    assert result.returncode == 1 and "more than --max-failure-rate 0.25" in result.stderr
    result = run_fastclip("embed", "--images", images, "-o", tmp_path / "ok", "--model",
                          "random:tiny", "--no-progress", "--num-workers", "0", check=False)
    assert result.returncode == 0
