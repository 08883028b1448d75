"""Checkpoints fastclip did not make: no code in them runs, and broken or changed weights
are refused with an error that names them."""

import os
import sys
import textwrap

import pytest
import torch

import fastclip
from fastclip.embed import embed
from fastclip.torchscript import ArchiveError, read_weights

from embed_helpers import run_python
from small_models import small_clip

ARCHIVE_WITH_CODE = textwrap.dedent('''
    import sys
    from typing import Tuple
    import torch
    from torch import Tensor

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w

        @torch.jit.export
        def __getstate__(self) -> Tuple[Tensor, bool]:
            return (self.w, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[Tensor, bool]) -> None:
            print("archive code ran")
            self.w = state[0]
            self.training = state[1]

    torch.jit.script(Module()).save(sys.argv[1])
''')


@pytest.fixture(scope="module")
def archive_with_code(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    path = folder / "ViT-B-32.pt"
    made = run_python(folder, ARCHIVE_WITH_CODE, str(path))
    assert made.returncode == 0, made.stderr[-2000:]
    return path


def test_torchscript_archive_code_would_run_under_torch_jit_load(tmp_path, archive_with_code):
    """The crafted archive is a real attack: torch.jit.load runs its __setstate__."""
    loaded = run_python(tmp_path, f"import torch; torch.jit.load({str(archive_with_code)!r})")
    assert "archive code ran" in loaded.stdout


def test_fastclip_load_never_runs_an_archives_code(tmp_path, archive_with_code):
    loaded = run_python(tmp_path, textwrap.dedent(f"""
        import fastclip
        try:
            fastclip.load({str(archive_with_code)!r}, device="cpu")
        except ValueError as error:
            print("refused:", error)
    """))
    assert "archive code ran" not in loaded.stdout, loaded.stdout
    assert "refused:" in loaded.stdout and "custom state" in loaded.stdout, loaded.stdout
    with pytest.raises(ArchiveError, match="class __torch__.Module has a custom state"):
        read_weights(archive_with_code)


def test_traced_archive_weights_equal_torch_jit_loads(tmp_path):
    model = small_clip()
    archive = torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, 64, 64)})
    path = tmp_path / "traced.pt"
    archive.save(str(path))
    expected = torch.jit.load(str(path)).state_dict()
    weights = read_weights(path)
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key


def test_archive_asking_for_other_globals_is_refused(tmp_path):
    """A data.pkl that names a global other than tensors and its own modules (here os.system)
    is refused before anything is built."""
    import pickle
    import zipfile

    class Payload:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)

    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(Payload(), protocol=2))
        archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("archive/code/__torch__.py", "")
    with pytest.raises(ValueError, match="asks for posix.system"):
        fastclip.load(str(path), device="cpu")
    assert not (tmp_path / "pwned").exists()


def test_resume_refuses_a_checkpoint_whose_weights_changed(tmp_path):
    from embed_helpers import write_images

    images = tmp_path / "images"
    write_images(images, 4, nested=False)
    checkpoint = tmp_path / "model.pt"
    torch.save(small_clip(seed=1).state_dict(), checkpoint)
    run = dict(images=[str(images)], model=str(checkpoint), num_workers=0, progress=False,
               shard_size=2)
    embed(str(tmp_path / "out"), **run)
    embed(str(tmp_path / "out"), resume=True, **run)  # the same weights: nothing to redo
    torch.save(small_clip(seed=2).state_dict(), checkpoint)  # same path, other weights
    with pytest.raises(ValueError, match="are not those the job .* began with"):
        embed(str(tmp_path / "out"), resume=True, **run)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoints_with_non_finite_weights_are_refused_by_name(tmp_path, bad):
    state = small_clip().state_dict()
    state["transformer.resblocks.1.mlp.c_fc.weight"][3, 5] = bad
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"transformer.resblocks.1.mlp.c_fc.weight holds 1 NaN"):
        fastclip.load(str(path), device="cpu")


def archive_of_references(path, references, numel, compress=False):
    """A TorchScript-like archive whose module holds ``references`` tensors, each naming the
    same storage anew (no pickle memo), as a crafted archive can."""
    import collections
    import io
    import pickle
    import types
    import zipfile

    module = types.ModuleType("__torch__")
    module.M = type("M", (), {"__module__": "__torch__"})

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (Storage(), 0, (numel,), (1,), False,
                                                     collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    top = module.M()
    top.__dict__.update({f"w{i}": Tensor() for i in range(references)})
    buffer = io.BytesIO()
    saved = sys.modules.get("__torch__")
    sys.modules["__torch__"] = module
    try:
        Pickler(buffer, protocol=2).dump(top)
    finally:
        if saved is None:
            del sys.modules["__torch__"]
        else:
            sys.modules["__torch__"] = saved
    names = ", ".join(f'"w{i}"' for i in range(references))
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("archive/code/__torch__.py",
                         f"class M(Module):\n  __parameters__ = [{names}, ]\n  __buffers__ = []\n")
        archive.writestr("archive/data/0", b"\0" * (4 * numel))
    return path


def test_a_storage_named_many_times_is_read_once(tmp_path):
    path = archive_of_references(tmp_path / "refs.pt", references=200, numel=1 << 18)
    weights = read_weights(path)
    assert len(weights) == 200
    assert len({w.untyped_storage().data_ptr() for w in weights.values()}) == 1


def test_a_compressed_storage_that_expands_like_a_bomb_is_refused(tmp_path):
    path = archive_of_references(tmp_path / "bomb.pt", references=1, numel=32 << 20,
                                 compress=True)  # 128 MiB of zeros in about 130 KB
    with pytest.raises(ArchiveError, match="far more than weights ever compress"):
        read_weights(path)
