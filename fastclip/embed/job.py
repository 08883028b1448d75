"""One embedding job's settings: a frozen dataclass, built by ``fastclip embed`` and by
:func:`fastclip.embed.embed` alike, and checked once, before any work."""

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..version import __version__

OUTPUT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
MODEL_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DEFAULT_CAPTION_KEY = "txt"
DEFAULT_READ_TIMEOUT = 60.0


def _same_on_resume(default, recorded_as=None):
    """A field whose value a resumed job must share with the job it completes: every row of
    one output folder is computed the same way. ``recorded_as`` names it in the plan and the
    manifest where that name differs."""
    return dataclasses.field(default=default, metadata={"same_on_resume": True,
                                                        "recorded_as": recorded_as})


@dataclass(frozen=True)
class EmbedJob:
    """What to embed, with which model, and where the rows go."""
    output: str
    # Inputs (see ``fastclip.embed.plan``): their listing also fixes the output's shards.
    images: Tuple[str, ...] = ()
    texts: Tuple[str, ...] = ()
    image_column: str = "image_path"
    text_column: str = "caption"
    embed_captions: bool = False
    limit: Optional[int] = None
    shard_size: int = 100_000
    # fsspec's options for URLs (endpoint, credentials): one dict, or one per protocol. Never
    # recorded (it may hold secrets).
    storage_options: Optional[dict] = None
    # What decides which inputs fail and how rows are computed.
    image_keys: Tuple[str, ...] = _same_on_resume(DEFAULT_IMAGE_KEYS)
    caption_key: str = _same_on_resume(DEFAULT_CAPTION_KEY)
    enable_metadata: bool = _same_on_resume(False)  # a table's columns, a sample's .json
    max_pixels: int = _same_on_resume(DEFAULT_MAX_PIXELS)
    max_bytes: int = _same_on_resume(DEFAULT_MAX_BYTES)  # of one file, tar member or sample
    model: str = _same_on_resume("ViT-B/32")
    model_dtype: Optional[str] = _same_on_resume(None)  # fp16 on CUDA, fp32 elsewhere
    backend: str = _same_on_resume("auto")
    gpu_decode: bool = _same_on_resume(False)
    dtype: str = _same_on_resume("fp16")  # of the stored rows
    normalize: bool = _same_on_resume(True, recorded_as="normalized")
    # How it runs: free to change between a job and its resumption.
    resume: bool = False
    read_timeout: Optional[float] = DEFAULT_READ_TIMEOUT  # seconds one file's read may take
    batch_size: int = 256
    num_workers: Optional[int] = None
    device: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        # Sources given as one string or any sequence are kept as tuples of strings.
        for name in ("images", "texts", "image_keys"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value or ())
            object.__setattr__(self, name, tuple(str(v) for v in value))
        if self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype must be one of {list(OUTPUT_DTYPES)}, got {self.dtype!r}.")
        if self.model_dtype is not None and self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype must be one of {list(MODEL_DTYPES)}, "
                             f"got {self.model_dtype!r}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 (decode in this process) or more, "
                             f"got {self.num_workers}.")
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError("max_bytes and max_pixels must be at least 1.")
        if self.read_timeout is not None and self.read_timeout <= 0:
            raise ValueError(f"read_timeout must be positive (seconds), got {self.read_timeout}.")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ValueError("storage_options must be a dict (fsspec's options), got "
                             f"{type(self.storage_options).__name__}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}.")

    def record(self, model, model_sha256=None):
        """The job as the plan and the manifest record it, with what ``model`` resolved
        (its backend and dtype) and the SHA256 of its weights: the settings a resumption is
        checked against, and what a reader of the folder needs to know of its rows."""
        recorded = self.resume_settings()
        recorded.update(model_sha256=model_sha256,
            model=os.path.abspath(self.model) if os.path.isfile(self.model) else self.model,
            backend=model.backend, model_dtype=str(model.dtype).removeprefix("torch."),
            image_keys=list(self.image_keys), max_pixels=int(self.max_pixels),
            max_bytes=int(self.max_bytes),
            embed_dim=model.text_projection.shape[1], images=list(self.images),
            texts=list(self.texts), shard_size=self.shard_size, fastclip_version=__version__)
        return recorded

    def resume_settings(self):
        """``{recorded name: value}`` of the fields a resumed job must share."""
        return {field.metadata["recorded_as"] or field.name: getattr(self, field.name)
                for field in dataclasses.fields(self) if field.metadata.get("same_on_resume")}

    @classmethod
    def resume_names(cls):
        """The recorded names of what a resumed job must share: the marked fields, and the
        SHA256 of the model's weights (the same path may hold other weights by then)."""
        return tuple(field.metadata["recorded_as"] or field.name
                     for field in dataclasses.fields(cls)
                     if field.metadata.get("same_on_resume")) + ("model_sha256",)
