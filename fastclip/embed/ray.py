"""fastclip on Ray: a callable class for Ray Data's ``map_batches``, and the whole embedding
job run as Ray tasks across a cluster.

Ray Data (Ray is not a dependency of fastclip; install ``ray[data]`` yourself)::

    import ray
    from fastclip.embed.ray import ClipEmbedder

    dataset = ray.data.read_parquet("s3://bucket/images.parquet")   # a column of image bytes
    embedded = dataset.map_batches(
        ClipEmbedder, fn_constructor_kwargs=dict(model="ViT-B/32", image_column="jpg"),
        batch_format="numpy", batch_size=256, compute=ray.data.ActorPoolStrategy(size=8),
        num_gpus=1)
    embedded.write_parquet("s3://bucket/embeddings/")

A batch is a dict of numpy arrays. Images may be encoded bytes, file paths or URLs,
``{bytes, path}`` dicts (Hugging Face's Image feature), or decoded ``(H, W, C)`` uint8
arrays (``ray.data.read_images``). The output batch is the input batch plus ``embedding``
(``(n, embed_dim)``) and ``error``: an empty string for rows that worked; for rows that did
not (a corrupt image, say), the reason, with a row of NaNs as embedding, so that no row
disappears silently.

The whole job (clip-retrieval's layout, resumable): :func:`run_on_ray` runs an
:class:`EmbedJob` as ``tasks`` Ray tasks, each one rank of the job (``ranks``): every task
embeds every ``tasks``-th shard, and they meet only through the output folder, which
should be in an object store that every node reaches (``s3://bucket/out``). The command
line's ``fastclip embed --ray-tasks N`` does the same.
"""

import numpy as np
import torch
from PIL import Image

from ..images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, InputError, decode_image, read_file
from ..loading import load
from ..model import unit_norm
from ..tokenizer import tokenize
from . import storage
from .job import EmbedJob
from .reader import preprocess_bounded


class ClipEmbedder:
    def __init__(self, model="ViT-B/32", image_column=None, text_column=None,
                 output_column="embedding", device=None, backend="auto", normalize=True,
                 dtype="fp32", max_pixels=DEFAULT_MAX_PIXELS):
        if (image_column is None) == (text_column is None):
            raise ValueError("ClipEmbedder embeds one column: give image_column or "
                             "text_column (not both; use two map_batches for pairs).")
        if dtype not in ("fp16", "fp32"):
            raise ValueError(f"dtype must be 'fp16' or 'fp32', got {dtype!r}.")
        self.model, self.preprocess = load(model, device=device, backend=backend)
        self.device = self.model.logit_scale.device
        self.image_column = image_column
        self.text_column = text_column
        self.output_column = output_column
        self.normalize = normalize
        self.dtype = np.float16 if dtype == "fp16" else np.float32
        self.max_pixels = max_pixels

    def __call__(self, batch):
        column = self.image_column or self.text_column
        if column not in batch:
            raise KeyError(f"The batch has no column {column!r}; its columns are "
                           f"{list(batch)}. Pass map_batches(..., batch_format='numpy') and "
                           "the right column name.")
        values = list(batch[column])
        inputs, errors = [], [""] * len(values)
        for i, value in enumerate(values):
            try:
                inputs.append(self._image(value) if self.image_column else self._text(value))
            except InputError as error:
                errors[i] = str(error)
        embedding = np.full((len(values), self.model.text_projection.shape[1]), np.nan,
                            dtype=self.dtype)
        worked = [i for i, error in enumerate(errors) if not error]
        if worked:
            embedding[worked] = self._embed(inputs)
        return {**batch, self.output_column: embedding, "error": np.array(errors, dtype=object)}

    def _image(self, value):
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
            image = Image.fromarray(value)
        elif isinstance(value, dict) and ("bytes" in value or "path" in value):
            inner = value.get("bytes") or value.get("path")  # Hugging Face's Image feature
            if not inner:
                raise InputError("no image (an empty {bytes, path} cell)")
            return self._image(inner)
        elif isinstance(value, str):
            data = read_file(value, DEFAULT_MAX_BYTES, None,
                             storage.read_remote if storage.is_url(value) else None)
            image = decode_image(data, self.max_pixels)
        elif isinstance(value, (bytes, bytearray, np.bytes_)):
            image = decode_image(bytes(value), self.max_pixels)
        else:
            raise InputError(f"cannot read an image from a {type(value).__name__}; "
                                    "give bytes, a path, or an (H, W, C) uint8 array")
        return preprocess_bounded(self.preprocess, image, self.max_pixels)

    def _text(self, value):
        if not isinstance(value, str):
            raise InputError(f"not a text: {type(value).__name__}")
        return value

    def _embed(self, inputs):
        with torch.inference_mode():
            if self.image_column:
                features = self.model.encode_image(torch.stack(inputs).to(self.device))
            else:
                tokens = tokenize(inputs, self.model.context_length, truncate=True)
                features = self.model.encode_text(tokens.to(self.device))
            features = features.float()
            if self.normalize:
                features = unit_norm(features)
        return features.cpu().numpy().astype(self.dtype)


def _run_rank(job, rank, world_size):
    """One task of :func:`run_on_ray`: the job's rank ``rank``, in a Ray worker process."""
    import os

    from .runner import run
    names = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE",
             "LOCAL_WORLD_SIZE")
    saved = {name: os.environ.pop(name, None) for name in names}
    # The tasks meet through the output folder only (no process group).
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE="1")
    try:
        return run(job)
    finally:  # a Ray worker process is reused by later tasks
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_on_ray(job, tasks, num_cpus=1, num_gpus=0, address=None):
    """Run ``job`` (an :class:`EmbedJob`) as ``tasks`` Ray tasks, each with ``num_cpus``
    CPUs and ``num_gpus`` GPUs, on the cluster at ``address`` (``RAY_ADDRESS``, or a local
    instance, when None and none is running). Returns the tasks' summaries, by rank; once
    all are done the folder holds the whole job and its manifest.

    A task that fails raises here, once every task has ended; the shards that the others
    wrote stay, and ``--resume`` completes the job."""
    if not isinstance(job, EmbedJob):
        raise TypeError(f"run_on_ray takes an EmbedJob, got {type(job).__name__}.")
    if tasks < 1:
        raise ValueError(f"tasks must be at least 1, got {tasks}.")
    try:
        import ray
    except ImportError:
        raise ImportError("Running on Ray needs Ray: pip install 'ray[data]'.") from None
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(_run_rank)
    pending = [remote.remote(job, rank, tasks) for rank in range(tasks)]
    summaries, errors = [], []
    for ref in pending:
        try:
            summaries.append(ray.get(ref))
        except Exception as error:  # ray.exceptions.RayTaskError wraps the task's own
            errors.append(error)
    if errors:
        raise RuntimeError(f"{len(errors)} of {tasks} Ray tasks failed; the first: "
                           f"{getattr(errors[0], 'cause', None) or errors[0]}. The other "
                           "tasks' shards are written: run the job again with resume to "
                           "complete it.") from errors[0]
    return summaries
