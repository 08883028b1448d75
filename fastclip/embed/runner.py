"""The job: plan the inputs, check the output folder, load the model once, then stream
batches from the reader's workers through the model to the writer.

- On CUDA, batches arrive in pinned memory and are copied to the device on a side stream
  one batch ahead, so the copy of batch i+1 overlaps the compute of batch i; embeddings go
  back with non-blocking copies that the writer thread waits for, so the main thread keeps
  the device fed instead of waiting on a synchronizing copy.
- Under a launcher each rank embeds its share of the chunks (``ranks``); rank 0 writes the
  manifest once all ranks are done.
"""

import os
import time
from functools import partial

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoints import model_sha256
from ..loading import default_device, load
from ..model import unit_norm
from ..ops.dispatch import auto_decisions
from ..ops.dispatch import triton_fallbacks as fallbacks
from . import device_decode
from . import ranks as ranks_
from .job import MODEL_DTYPES, OUTPUT_DTYPES, EmbedJob
from .output import OutputFolder, check_output_is_free, prepare_output, recorded_name_width
from .plan import plan_job, rank_chunks
from .reader import EmbedDataset, single_thread_worker
from .writer import ShardWriter


def device_batches(loader, device):
    """Iterate ``loader``'s batches with their tensors on ``device``. On CUDA the copy of
    the next batch runs on a side stream while the current one computes."""
    if device.type != "cuda":
        yield from loader
        return
    copy_stream = torch.cuda.Stream(device)
    pending = None
    for batch in loader:
        with torch.cuda.stream(copy_stream):
            moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        if pending is not None:
            yield _wait_for_copy(*pending)
        pending = moved, ready
    if pending is not None:
        yield _wait_for_copy(*pending)


def _wait_for_copy(batch, ready):
    compute_stream = torch.cuda.current_stream()
    compute_stream.wait_event(ready)
    for value in batch.values():
        if torch.is_tensor(value):
            # The tensor was allocated on the copy stream; tell the allocator it is used on
            # the compute stream so its memory is not reused too early.
            value.record_stream(compute_stream)
    return batch


def to_host(features, normalize, dtype):
    """Embeddings as a host tensor of ``dtype`` (unit-norm when asked, computed from the
    model's features in fp32, so a bf16 model's rows are rounded once, to ``dtype``) and the
    CUDA event that marks the copy complete (None on the CPU)."""
    features = unit_norm(features.float()) if normalize else features
    features = features.to(dtype)
    if features.device.type != "cuda":
        return features, None
    host = torch.empty(features.shape, dtype=dtype, pin_memory=True)
    host.copy_(features, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def default_num_workers(device, ranks):
    """Decoding processes for this rank when ``--num-workers`` is not given: the cores are
    shared by the ranks of a machine. A GPU embeds thousands of images a second, so decoding
    needs all the cores it can get; on the CPU the model needs most of them (it costs about
    ten times as much per image as decoding and preprocessing)."""
    cores = len(os.sched_getaffinity(0)) // ranks.local_world_size
    if device.type == "cuda":
        return max(1, min(cores - 1, 16))
    return max(1, cores // 8)


def with_device_images(batch, preprocess, device, max_pixels):
    """The batch with its JPEGs decoded on ``device`` and appended to its images; rows that
    could not be decoded move to its failures."""
    images, kept, failed = device_decode.device_images(batch["jpegs"], preprocess, device,
                                                       max_pixels)
    first_jpeg = len(batch["rows"]) - len(batch["jpegs"])
    keep = list(range(first_jpeg)) + [first_jpeg + i for i in kept]
    parts = [t for t in (batch["images"], images) if t is not None]
    tokens = batch["tokens"]
    return {
        **batch, "jpegs": None,
        "images": torch.cat(parts) if parts else None,
        "rows": [batch["rows"][i] for i in keep],
        "tokens": tokens[keep] if tokens is not None and keep else None,
        "failures": batch["failures"] + [
            {"key": batch["rows"][first_jpeg + i]["key"], "reason": reason,
             "shard": batch["chunk"]} for i, reason in failed],
    }


class ShardProgress:
    """What the bar says beyond items and items/s: shards done of this rank's total and,
    where the total of items is unknown (tar shards), an ETA from the shards done."""

    def __init__(self, shards, items_known):
        self.shards = shards
        self.items_known = items_known
        self.done = 0
        self.start = time.perf_counter()

    def postfix(self, batch, failures):
        self.done += bool(batch["last"])
        postfix = {"shards": f"{self.done}/{self.shards}", "failures": failures}
        if not self.items_known and 0 < self.done < self.shards:
            seconds = (time.perf_counter() - self.start) / self.done * (self.shards - self.done)
            postfix["eta"] = time.strftime("%H:%M:%S", time.gmtime(seconds))
        return postfix


def embed_batches(model, batches, writer, normalize, dtype, bar, decode_on_device=None,
                  progress=None):
    """Embed every batch and hand the rows to ``writer``; returns the counts.
    ``decode_on_device(batch)`` decodes the JPEGs of ``--gpu-decode`` batches; ``progress``
    (a :class:`ShardProgress`) adds shards and an ETA to the bar."""
    counts = {"inputs": 0, "rows": 0, "failures": 0}
    with torch.inference_mode():
        for batch in batches:
            if batch["jpegs"]:
                batch = decode_on_device(batch)
            result = {k: batch[k]
                      for k in ("chunk", "piece", "last", "inputs", "rows", "failures")}
            result["image"] = result["text"] = None
            if batch["images"] is not None:
                result["image"] = to_host(model.encode_image(batch["images"]), normalize, dtype)
            if batch["tokens"] is not None:
                result["text"] = to_host(model.encode_text(batch["tokens"]), normalize, dtype)
            writer.submit(result)
            counts["inputs"] += batch["inputs"]
            counts["rows"] += len(batch["rows"])
            counts["failures"] += len(batch["failures"])
            bar.update(batch["inputs"])
            bar.set_postfix(progress.postfix(batch, counts["failures"]) if progress else
                            {"failures": counts["failures"]}, refresh=False)
    return counts


def embed(output, images=(), texts=(), **settings):
    """Embed images and/or texts into ``output`` in clip-retrieval's layout: ``run(EmbedJob(
    output, images, texts, **settings))``; the settings are :class:`EmbedJob`'s fields."""
    return run(EmbedJob(output=output, images=images, texts=texts, **settings))


def run(job):
    """Run an :class:`EmbedJob`. Under a launcher that sets RANK and WORLD_SIZE, each process
    embeds its share. Returns this process's summary: inputs, rows, failures, seconds, items
    per second, and the manifest once the job is complete."""
    start = time.perf_counter()
    # Inputs and the output folder are checked before the model is loaded (or downloaded).
    plan = plan_job(job.images, job.texts, shard_size=job.shard_size,
                    image_column=job.image_column, text_column=job.text_column,
                    embed_captions=job.embed_captions, limit=job.limit,
                    storage_options=job.storage_options, enable_metadata=job.enable_metadata)
    ranks = ranks_.from_environment()
    folder = OutputFolder(job.output, recorded_name_width(job.output, job.resume,
                                                          job.storage_options)
                          or plan.name_width, job.storage_options)
    device = torch.device(job.device) if job.device else default_device()
    if device.type == "cuda":
        # Streams, events and NCCL collectives below use the current device: this rank's.
        torch.cuda.set_device(device)
    ranks_.on_rank_zero(ranks, lambda: check_output_is_free(folder, job.resume))
    if job.gpu_decode:
        device_decode.torchvision_decode_jpeg()  # fail now, not in the first batch
    model, preprocess = load(job.model, device=device, backend=job.backend,
                             dtype=MODEL_DTYPES.get(job.model_dtype))
    record = job.record(model, model_sha256(job.model))
    prepare_output(folder, plan, record, job.resume, ranks)

    done = folder.done_indices()
    chunks = [c for c in rank_chunks(plan.chunks, ranks.rank, ranks.world_size)
              if c.index not in done]
    dataset = EmbedDataset(chunks, preprocess, job.batch_size, plan.embed_images,
                           plan.embed_texts, model.context_length, max_pixels=job.max_pixels,
                           max_bytes=job.max_bytes, image_keys=job.image_keys,
                           caption_key=job.caption_key, device_decode=job.gpu_decode,
                           read_timeout=job.read_timeout, storage_options=job.storage_options,
                           enable_metadata=job.enable_metadata,
                           table_columns=plan.table_columns)
    num_workers = job.num_workers
    if num_workers is None:
        num_workers = default_num_workers(device, ranks)
    num_workers = min(num_workers, len(dataset.units()))
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                        pin_memory=device.type == "cuda",
                        worker_init_fn=single_thread_worker if num_workers else None,
                        prefetch_factor=4 if num_workers else None)
    known = [c.known_size for c in chunks]
    bar = tqdm(total=None if None in known else sum(known), unit="item", dynamic_ncols=True,
               disable=not job.progress or ranks.rank != 0, desc="embed")
    writer = ShardWriter(folder, plan.metadata_columns, types=plan.metadata_types)
    failure = None
    try:
        try:
            counts = embed_batches(
                model, device_batches(loader, device), writer, job.normalize,
                OUTPUT_DTYPES[job.dtype], bar,
                partial(with_device_images, preprocess=preprocess, device=device,
                        max_pixels=job.max_pixels), ShardProgress(len(chunks), None not in known))
        finally:
            writer.close()
            bar.close()
    except Exception as error:  # raised below, once the other ranks know
        failure = error
    grouped, everyone_succeeded = ranks_.all_succeeded(failure is None)
    if failure is not None:
        raise failure
    if not everyone_succeeded:
        raise RuntimeError(
            "Another rank of this job failed (its own error says why). This rank's shards are "
            "written; run the job again with --resume and the same options to complete it.")
    manifest = None
    if ranks.rank == 0 or not grouped:
        ran = ({"triton_fallbacks": fallbacks(), "auto_decisions": auto_decisions()}
               if model.backend in ("triton", "auto") else None)
        manifest = folder.finalize(record, len(plan.chunks), ran)
    ranks.finish()
    seconds = time.perf_counter() - start
    return {**counts, "seconds": seconds, "items_per_second": counts["inputs"] / seconds,
            "rank": ranks.rank, "world_size": ranks.world_size, "manifest": manifest}


def summary_line(summary):
    """The one-line report printed at the end of ``fastclip embed``."""
    prefix = f"rank {summary['rank']}: " if summary["world_size"] > 1 else ""
    return (f"{prefix}{summary['inputs']} items, {summary['failures']} failures, "
            f"{summary['items_per_second']:.1f} items/s, {summary['seconds']:.1f} s wall")
