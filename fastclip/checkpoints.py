"""Checkpoint files: OpenAI's published models (downloaded and checked against their
SHA256), the models shipped with fastclip, and reading a file's state dict.

OpenAI's released checkpoints are TorchScript archives. fastclip reads only their weights
(``fastclip.torchscript``, never ``torch.jit.load``) and builds its own model; no code in an
archive ever runs. Plain state dicts are read with
``torch.load(..., weights_only=True)``.
"""

import hashlib
import http.client
import os
import urllib.error
import urllib.request
import warnings
import zipfile

import torch
from tqdm import tqdm

from . import torchscript
from .files import atomic_write

_MODELS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

DEFAULT_ROOT = os.path.expanduser("~/.cache/clip")  # the cache OpenAI's package uses


class ChecksumError(RuntimeError):
    """A checkpoint's SHA256 is not the one published for it."""


# Models shipped inside the package (no download): name -> file in fastclip/pretrained/.
_BUNDLED = {"fastclip-shapes-rn": "fastclip-shapes-rn.pt"}
_PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def available_models():
    """The names of the models ``load`` can fetch, then those shipped with fastclip."""
    return list(_MODELS) + list(_BUNDLED)


def _bundled_path(name):
    path = os.path.join(_PRETRAINED_DIR, _BUNDLED[name])
    if not os.path.isfile(path):
        raise RuntimeError(
            f"The bundled model {name} should be at {path}, but that file is missing: this "
            "installation of fastclip lacks its package data. Reinstall fastclip, or train "
            "the model again with python -m fastclip.train (see the README).")
    return path


def model_sha256(name):
    """The SHA256 of the weights a model name or path stands for: the published one for
    OpenAI's models (their files are checked against it), the file's own for paths and the
    bundled models, None for ``random:`` models (their weights follow from the name)."""
    if name in _MODELS:
        return _MODELS[name].split("/")[-2]
    path = _bundled_path(name) if name in _BUNDLED else name
    return _sha256(path) if os.path.isfile(path) else None


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url, root):
    """Fetch ``url`` into ``root`` (reusing a cached copy whose SHA256 matches) and return
    the file's path. The expected SHA256 is the URL's second-to-last path part. The file is
    written under a temporary name and renamed only once complete and verified, so a cut or
    corrupt download never becomes the cached file."""
    os.makedirs(root, exist_ok=True)
    filename = os.path.basename(url)
    expected = url.split("/")[-2]
    target = os.path.join(root, filename)

    if os.path.isfile(target):
        if _sha256(target) == expected:
            return target
        warnings.warn(f"{target} exists but its SHA256 does not match {expected}; "
                      "downloading it again.")

    def fetch_and_verify(output):
        # Renamed onto the cached name only once complete and verified (atomic_write): a cut
        # or corrupt download never becomes the cached file.
        digest = _fetch(url, output, filename, root)
        if digest != expected:
            raise ChecksumError(
                f"The file downloaded from {url} has SHA256 {digest}, not the published "
                f"{expected}; it was not saved. Try again, or load a verified local file "
                "with fastclip.load(path).")

    atomic_write(target, fetch_and_verify, durable=False)
    return target


def _fetch(url, output, filename, root, timeout=60):
    """Stream ``url`` into the open file ``output`` with a progress bar; returns the SHA256 of
    what was written. Network failures, including a connection closed before Content-Length
    bytes, raise a RuntimeError naming the URL and the offline alternative; errors writing
    the file are left as they are."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as source:
            total = source.headers.get("Content-Length")
            total = int(total) if total else None
            received = 0
            with tqdm(total=total, unit="iB", unit_scale=True, unit_divisor=1024,
                      desc=filename) as bar:
                for chunk in iter(lambda: source.read(1 << 16), b""):
                    output.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise ConnectionError(f"the connection closed after {received} of {total} bytes")
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
            ValueError) as error:
        raise RuntimeError(
            f"Could not download {url}: {error}. Without network access, download the file "
            f"elsewhere and load it with fastclip.load('/path/to/{filename}'), or put it in "
            f"{root}.") from error
    return digest.hexdigest()


def _is_torchscript_archive(path):
    """TorchScript archives are zip files whose top folder holds ``constants.pkl`` and a
    ``code/`` folder; ``torch.save`` files hold neither (their top folder is named after the
    file, which may itself be called ``code``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        second_parts = {tuple(name.split("/")[1:2]) for name in archive.namelist()}
    return ("constants.pkl",) in second_parts and ("code",) in second_parts


def _unwrap_state_dict(checkpoint, path):
    """Accept plain state dicts and training checkpoints (``{"state_dict": ...}``,
    ``module.`` prefixes from DistributedDataParallel)."""
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not contain a state dict of tensors; fastclip.load "
                         "expects an OpenAI CLIP archive or a CLIP state dict.")
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def _read(path, what, read):
    """``read()``, with any failure raised as a ValueError naming the file and ``what`` it
    should have been."""
    try:
        return read()
    except Exception as error:  # torch raises many types for a file it cannot read
        raise ValueError(f"{path} is not a readable {what} ({type(error).__name__}: "
                         f"{error}).") from error


def read_checkpoint(path, what="checkpoint"):
    """``torch.load(path, weights_only=True)`` onto the CPU; see :func:`_read`."""
    return _read(path, what, lambda: torch.load(path, map_location="cpu", weights_only=True))


def load_state_dict(path):
    """The state dict stored at ``path``: an OpenAI TorchScript archive (only its weights are
    read, and none of its code runs: ``fastclip.torchscript``) or a ``torch.save``'d state
    dict, loaded with ``weights_only=True``."""
    what = ("checkpoint; fastclip.load expects an OpenAI CLIP .pt archive or a state dict "
            "saved with torch.save")
    if _is_torchscript_archive(path):
        return _read(path, what, lambda: torchscript.read_weights(path))
    return _unwrap_state_dict(read_checkpoint(path, what), path)


def checkpoint_path(name, download_root=None):
    """The local file of a model name (downloaded and verified if needed) or a path."""
    if name in _MODELS:
        return _download(_MODELS[name], download_root or DEFAULT_ROOT)
    if name in _BUNDLED:
        return _bundled_path(name)
    if os.path.isfile(name):
        return name
    return None
