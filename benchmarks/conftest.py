"""pytest configuration of the benchmarks: collect ``bench_*.py``, choose the sizes, and
describe the machine in every JSON that pytest-benchmark writes.

Sizes (``--bench-sizes`` or the environment variable ``FASTCLIP_BENCH_SIZES``):

- ``cpu`` (the default): what a 2-core CPU finishes in a few minutes;
- ``gpu``: batch 1 and 1024, fp16 and bf16, CUDA graphs on and off, on a CUDA device;
- ``tiny``: reduced models, a few seconds, to check the benchmarks' own logic.
"""

import pytest

from machine import SIZES, bench_sizes, machine_description


def pytest_addoption(parser):
    parser.addoption(
        "--bench-sizes", choices=SIZES, default=None,
        help="benchmark sizes: cpu (default), gpu (batch 1 and 1024, fp16/bf16, CUDA graphs) "
             "or tiny (reduced models, to check the logic); also FASTCLIP_BENCH_SIZES")


@pytest.fixture(scope="session")
def sizes(request):
    return bench_sizes(request.config)


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` like test files when pytest is given this folder (a file named
    on the command line is collected by pytest itself)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastclip_bench"] = machine_description(bench_sizes(config))
