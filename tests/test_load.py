"""fastclip.load: local checkpoints of every supported kind, and downloads from a server on
127.0.0.1 with right and wrong checksums and a connection cut short."""

import hashlib
import http.server
import os
import threading
import warnings

import pytest
import torch

import fastclip
from fastclip import checkpoints as loading

from numerics import assert_close_relative
from small_models import small_clip


@pytest.fixture(scope="module")
def model():
    return small_clip()


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(2, 3, 64, 64), fastclip.tokenize(["a red square", "a blue circle"])


def features(model, inputs):
    images, texts = inputs
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def assert_same_model(loaded, model, inputs):
    for actual, expected in zip(features(loaded, inputs), features(model, inputs)):
        assert_close_relative(actual, expected, 1e-6)


def test_state_dict(tmp_path, model, inputs):
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    loaded, preprocess = fastclip.load(str(path), device="cpu")
    assert loaded.dtype == torch.float32 and not loaded.training
    assert preprocess.n_px == 64
    assert_same_model(loaded, model, inputs)


def test_fp32_weights_load_without_rounding(tmp_path, model):
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    loaded, _ = fastclip.load(str(path), device="cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_training_checkpoint_with_module_prefix(tmp_path, model, inputs):
    path = tmp_path / "checkpoint.pt"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, path)
    loaded, _ = fastclip.load(str(path), device="cpu")
    assert_same_model(loaded, model, inputs)


def test_torchscript_archive(tmp_path, model, inputs):
    """OpenAI's releases are TorchScript archives whose state dicts also hold
    input_resolution, context_length and vocab_size."""
    scripted_source = small_clip()
    scripted_source.load_state_dict(model.state_dict())
    for name, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        scripted_source.__dict__.pop(name, None)
        scripted_source.register_buffer(name, torch.tensor(value))
    images, _ = inputs
    archive = torch.jit.trace_module(scripted_source, {"encode_image": images})
    path = tmp_path / "ViT-tiny.pt"
    archive.save(str(path))
    assert loading._is_torchscript_archive(str(path))
    loaded, _ = fastclip.load(str(path), device="cpu")
    assert isinstance(loaded, fastclip.CLIP)
    assert_same_model(loaded, model, inputs)


def test_openai_fp16_checkpoint_keeps_mixed_layout(tmp_path, model, inputs):
    half = fastclip.convert_weights(small_clip(), torch.float16)
    half.load_state_dict(model.state_dict())
    path = tmp_path / "half.pt"
    torch.save(half.state_dict(), path)
    built = fastclip.build_model(torch.load(path, weights_only=True))
    assert built.dtype == torch.float16 and built.ln_final.weight.dtype == torch.float32
    loaded, _ = fastclip.load(str(path), device="cpu")  # fp32 on the CPU, as OpenAI's
    assert loaded.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_override(tmp_path, model, dtype):
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    loaded, _ = fastclip.load(str(path), device="cpu", dtype=dtype)
    assert loaded.dtype == dtype
    assert loaded.logit_scale.dtype == torch.float32


def test_state_dict_file_named_code(tmp_path, model, inputs):
    """torch.save names its zip's top folder after the file: code.pt is still a state dict."""
    path = tmp_path / "code.pt"
    torch.save(model.state_dict(), path)
    assert not loading._is_torchscript_archive(str(path))
    assert_same_model(fastclip.load(str(path), device="cpu")[0], model, inputs)


def test_backend_is_reported(tmp_path, model, monkeypatch):
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    assert fastclip.load(str(path), device="cpu", backend="reference")[0].backend == "reference"
    assert fastclip.load(str(path), device="cpu")[0].backend == "torch"  # auto on a CPU


def test_jit_true_warns_and_returns_fastclip_model(tmp_path, model):
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    with pytest.warns(UserWarning, match="fastclip runs its own model"):
        loaded, _ = fastclip.load(str(path), device="cpu", jit=True)
    assert isinstance(loaded, fastclip.CLIP)


def test_unknown_name_lists_available_models():
    with pytest.raises(RuntimeError, match=r"Model ViT-H/99 not found; available models = \["):
        fastclip.load("ViT-H/99")


def test_available_models_include_openai_releases():
    assert {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16",
            "ViT-L/14", "ViT-L/14@336px"} <= set(fastclip.available_models())


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_garbage_file_gets_clear_error(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        fastclip.load(str(path), device="cpu")


def test_non_clip_state_dict_gets_clear_error(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="not a CLIP checkpoint"):
        fastclip.load(str(path), device="cpu")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "pickle.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": os.getcwd}, path)
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        fastclip.load(str(path), device="cpu")


# --- downloads -------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}  # path -> bytes
    cut_short = set()  # paths whose body stops halfway

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.path in self.cut_short else body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def checkpoint_bytes(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path.read_bytes()


def publish(server, monkeypatch, body, sha256=None, cut_short=False):
    sha256 = sha256 or hashlib.sha256(body).hexdigest()
    path = f"/clip/models/{sha256}/Tiny.pt"
    _Handler.files[path] = body
    if cut_short:
        _Handler.cut_short.add(path)
    monkeypatch.setitem(loading._MODELS, "Tiny", server + path)
    return path


def test_download_verifies_and_caches(tmp_path, server, monkeypatch, checkpoint_bytes, model,
                                      inputs):
    publish(server, monkeypatch, checkpoint_bytes)
    loaded, _ = fastclip.load("Tiny", device="cpu", download_root=str(tmp_path))
    assert_same_model(loaded, model, inputs)
    assert os.listdir(tmp_path) == ["Tiny.pt"]
    # A second load reuses the verified cached file, even with the server gone.
    monkeypatch.setitem(loading._MODELS, "Tiny", loading._MODELS["Tiny"].replace(
        server, "http://127.0.0.1:9"))
    assert_same_model(fastclip.load("Tiny", device="cpu", download_root=str(tmp_path))[0],
                      model, inputs)


def test_wrong_checksum_is_refused_and_not_cached(tmp_path, server, monkeypatch,
                                                  checkpoint_bytes):
    publish(server, monkeypatch, checkpoint_bytes, sha256="0" * 64)
    with pytest.raises(loading.ChecksumError, match="not the published"):
        fastclip.load("Tiny", device="cpu", download_root=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_corrupt_cached_file_is_downloaded_again(tmp_path, server, monkeypatch,
                                                 checkpoint_bytes):
    publish(server, monkeypatch, checkpoint_bytes)
    (tmp_path / "Tiny.pt").write_bytes(b"truncated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastclip.load("Tiny", device="cpu", download_root=str(tmp_path))
    assert any("does not match" in str(w.message) for w in caught)
    assert (tmp_path / "Tiny.pt").read_bytes() == checkpoint_bytes


def test_download_cut_short_leaves_nothing(tmp_path, server, monkeypatch, checkpoint_bytes):
    publish(server, monkeypatch, checkpoint_bytes + b"-cut", cut_short=True)
    with pytest.raises(RuntimeError, match="Could not download http://127.0.0.1"):
        fastclip.load("Tiny", device="cpu", download_root=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_unreachable_server_names_url_and_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setitem(loading._MODELS, "Tiny",
                        "http://127.0.0.1:9/clip/models/" + "1" * 64 + "/Tiny.pt")
    with pytest.raises(RuntimeError,
                       match=r"Could not download .*fastclip.load\('/path/to/Tiny.pt'\)"):
        fastclip.load("Tiny", device="cpu", download_root=str(tmp_path))
