"""Test settings that must hold before any test module imports fastclip."""

import os

import pytest
import torch

from servers import s3, s3_server  # noqa: F401  (fixtures)

if not torch.cuda.is_available():
    # Without CUDA the Triton kernels run in Triton's interpreter, which Triton chooses when a
    # kernel is defined: set here, before any test module can import fastclip.kernels, so no
    # test depends on the order in which modules are collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with a reason, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with `pytest -m gpu` on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
