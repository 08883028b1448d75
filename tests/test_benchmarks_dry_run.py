"""The GPU suite (benchmarks/gpu_suite.sh) in a dry run on the CPU: the same steps, folder
and files as on a GPU, with the build skipped, the GPU tests only collected and the
benchmarks at tiny sizes. It checks the suite's own logic, which a GPU run has no time to
debug: the steps, the time budget, the JSON it writes and the table and plot it renders."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.sh")
STEPS = ["wheels", "build", "check", "gpu_tests", "decode", "kernels", "models", "render"]


def run_suite(out, **env):
    env = dict(os.environ, FASTCLIP_SUITE_DRY_RUN="1", PYTHON=sys.executable, **env)
    return subprocess.run(["bash", SUITE, str(out)], env=env, capture_output=True, text=True,
                          timeout=900)


def read(path):
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    for needed in ("pytest_benchmark", "matplotlib", "open_clip"):
        pytest.importorskip(needed)
    out = tmp_path_factory.mktemp("gpu_suite")
    result = run_suite(out)
    assert result.returncode == 0, (
        f"the dry run failed ({result.returncode}); suite.log ends with:\n"
        + read(out / "suite.log")[-4000:] + result.stderr[-2000:])
    return out


def test_every_step_runs_and_succeeds(dry_run):
    summary = json.loads(read(dry_run / "summary.json"))
    assert [step["name"] for step in summary["steps"]] == STEPS
    assert all(step["status"] == "0" for step in summary["steps"]), summary["steps"]
    assert summary["machine"]["bench_sizes"] == "tiny"
    for key in ("cpu_model", "cpu_cores", "gpu", "torch", "triton", "cuda"):
        assert key in summary["machine"]


def test_benchmark_json_holds_checked_comparisons(dry_run):
    data = json.loads(read(dry_run / "models_gpu.json"))
    assert data["machine_info"]["fastclip_bench"]["bench_sizes"] == "tiny"
    comparisons = [bench["extra_info"] for bench in data["benchmarks"]]
    assert comparisons, "no benchmark ran"
    for info in comparisons:
        assert info["baseline"] in info["items_per_second"]
        assert info["speedup_vs_baseline"][info["baseline"]] == pytest.approx(1.0)
        assert set(info["agreement"]) == set(info["items_per_second"])
        assert all(len(times) == info["rounds"] for times in info["seconds"].values())


def test_rendered_table_and_plot(dry_run):
    data = json.loads(read(dry_run / "models_gpu.json"))
    table = read(dry_run / "performance_gpu.md")
    for bench in data["benchmarks"]:
        for contender in bench["extra_info"]["items_per_second"]:
            assert f"| {contender} |" in table
    with open(dry_run / "performance_gpu.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_decode_difference_is_measured(dry_run):
    """decode_gpu.json: torchvision's decode against PIL's per case (on the CPU both are
    libjpeg's, so the dry run finds them equal)."""
    report = json.loads(read(dry_run / "decode_gpu.json"))
    if "skipped" in report:
        pytest.skip(report["skipped"])
    assert report["device"] == "cpu" and len(report["cases"]) == 21
    assert {case["subsampling"] for case in report["cases"]} == {"4:4:4", "4:2:2", "4:2:0"}
    assert report["largest_difference"] == 0 and report["share_differing"] == 0


def test_output_fits_what_a_device_call_brings_back(dry_run):
    files = os.listdir(dry_run)
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files), files


def test_the_kernel_benchmarks_and_the_render_keep_their_time(dry_run):
    log = read(dry_run / "suite.log")
    assert "=== kernels (limit 60s)" in log and "=== render (limit 20s)" in log
    limits = [int(limit) for limit in re.findall(r"^=== \w+ \(limit (\d+)s\)", log, re.M)]
    assert sum(limits) <= 480 + 60  # the default budget, and the dry run's own slack


def test_spent_budget_skips_the_steps_and_stops_at_the_check(tmp_path):
    pytest.importorskip("pytest_benchmark")
    result = run_suite(tmp_path, FASTCLIP_SUITE_BUDGET_S="0")
    summary = json.loads(read(tmp_path / "summary.json"))
    assert [step["status"] for step in summary["steps"]] == ["skipped"] * 3
    assert result.returncode == 1 and "stopped: the check failed" in result.stderr


def test_a_failed_install_check_stops_the_suite(tmp_path):
    """When fastclip does not import (its dependencies missing), no benchmark runs under its
    name: the suite stops after the check."""
    fake = tmp_path / "fake" / "fastclip"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ftfy')\n")
    out = tmp_path / "out"
    result = run_suite(out, PYTHONPATH=str(tmp_path / "fake"))
    summary = json.loads(read(out / "summary.json"))
    assert [step["name"] for step in summary["steps"]] == ["wheels", "build", "check"]
    assert summary["steps"][-1]["status"] == "1" and result.returncode == 1
    assert "fastclip does not import (No module named ftfy)" in read(out / "suite.log")


def test_a_failed_step_fails_the_suite(tmp_path):
    steps = tmp_path / "steps.tsv"
    steps.write_text("build\t0\t3\ngpu_tests\t1\t40\nmodels\tskipped\t0\n")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "machine.py"), "--steps", str(steps)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    statuses = [step["status"] for step in json.loads(result.stdout)["steps"]]
    assert statuses == ["0", "1", "skipped"]
