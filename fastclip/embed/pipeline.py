"""The embedding loop: DataLoader workers decode and preprocess, the model embeds, a
background thread writes.

- Decoding, preprocessing and tokenizing run in DataLoader worker processes, which take
  the job's units in turn: pieces of ``batch_size`` inputs of a listed chunk, or a whole tar
  shard. Every batch carries its chunk and its piece number there, and the last one of a
  chunk says so, so the writer puts a chunk's rows back in input order and knows when the
  chunk is complete, whichever workers made its pieces.
- On CUDA, batches arrive in pinned memory and are copied to the device on a side stream
  one batch ahead, so the copy of batch i+1 overlaps the compute of batch i; embeddings go
  back with non-blocking copies that the writer thread waits for, so the main thread keeps
  the device fed instead of waiting on a synchronizing copy.
- Under ``torchrun`` (RANK and WORLD_SIZE set) each rank embeds every WORLD_SIZE-th chunk
  (see ``sources.rank_chunks``); rank 0 writes the manifest once all ranks are done.
"""

import os
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from .. import __version__
from ..tokenizer import tokenize
from . import decode, device_decode
from .models import load_model
from .sources import plan_job, rank_chunks
from .writer import OutputFolder, ShardWriter, read_json, write_json

OUTPUT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
MODEL_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class EmbedDataset(IterableDataset):
    """Batches of preprocessed images and token ids, one chunk at a time, with the metadata
    rows of the inputs that worked and the failures of those that did not."""

    def __init__(self, chunks, preprocess, batch_size, embed_images, embed_texts,
                 context_length=77, max_pixels=decode.DEFAULT_MAX_PIXELS,
                 max_bytes=decode.DEFAULT_MAX_BYTES, image_keys=decode.DEFAULT_IMAGE_KEYS,
                 caption_key=decode.DEFAULT_CAPTION_KEY, device_decode=False):
        self.chunks = chunks
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.embed_images = embed_images
        self.embed_texts = embed_texts
        self.context_length = context_length
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.image_keys = tuple(image_keys)
        self.caption_key = caption_key
        self.device_decode = device_decode

    def units(self):
        """The work of the job as ``(chunk, start, stop)`` units, dealt to the workers in
        turn: a listed chunk is cut into pieces of ``batch_size`` inputs (one batch each), so
        that every worker helps even when the job has fewer chunks than workers; a tar shard
        is one unit (``start`` is None), read in a single pass."""
        units = []
        for chunk in self.chunks:
            if chunk.tar_path is not None:
                units.append((chunk, None, None))
            else:
                size = len(chunk.items)
                units.extend((chunk, start, min(start + self.batch_size, size))
                             for start in range(0, max(size, 1), self.batch_size))
        return units

    def __iter__(self):
        worker = get_worker_info()
        units = self.units()
        if worker is not None:
            units = units[worker.id::worker.num_workers]
        for chunk, start, stop in units:
            if start is None:
                yield from self._batches(chunk, self._samples(chunk))
            else:
                # A piece of a listed chunk: one batch, numbered by its place in the chunk.
                piece = start // self.batch_size
                yield from self._batches(
                    chunk, self._listed_samples(chunk.items[start:stop]), first_piece=piece,
                    last=stop == len(chunk.items))

    def _batches(self, chunk, samples, first_piece=0, last=True):
        """Batches of ``batch_size`` good rows from ``samples``; the final one says whether it
        ends the chunk (``last``). Each batch carries its ``piece`` number in the chunk."""
        rows, images, failures, inputs = [], [], [], 0
        piece = first_piece
        for row, image, reason in samples:
            if len(rows) == self.batch_size:  # full, and more input follows
                yield self._batch(chunk, piece, rows, images, failures, inputs, last=False)
                rows, images, failures, inputs = [], [], [], 0
                piece += 1
            inputs += 1
            if reason is None:
                rows.append(row)
                images.append(image)
            else:
                failures.append({"key": row["key"], "reason": reason, "shard": chunk.index})
        yield self._batch(chunk, piece, rows, images, failures, inputs, last=last)

    def _listed_samples(self, items):
        for item in items:
            yield self._sample(item.key, item.image_path, item.text,
                               partial(decode.read_file, item.image_path, self.max_bytes))

    def _samples(self, chunk):
        """``(row, image tensor, failure reason)`` for each sample of a tar shard."""
        try:
            for key, fields in decode.iter_webdataset(chunk.tar_path, self.max_bytes):
                yield self._sample(f"{chunk.tar_path}:{key}", None,
                                   decode.sample_caption(fields, self.caption_key),
                                   partial(decode.sample_image, fields, self.image_keys))
        except decode.InputError as error:
            yield {"key": chunk.tar_path}, None, str(error)

    def _sample(self, key, image_path, text, read_bytes):
        row = {"key": key, "image_path": image_path, "caption": text}
        try:
            if self.embed_texts and text is None:
                raise decode.InputError("no text (an empty cell, or no caption in the sample)")
            image = None
            if self.embed_images:
                data = read_bytes()
                if self.device_decode:
                    # JPEG bytes, decoded later on the model's device (device_decode.py).
                    image = device_decode.device_decodable(data, self.max_pixels)
                if image is None:
                    image = self.preprocess(decode.decode_image(data, self.max_pixels))
        except decode.InputError as error:
            return row, None, str(error)
        return row, image, None

    def _batch(self, chunk, piece, rows, images, failures, inputs, last):
        jpegs = []
        if self.device_decode and self.embed_images:
            # Preprocessed images first, then the JPEG bytes for the device, rows in step.
            order = sorted(range(len(rows)), key=lambda i: images[i].dim() == 1)
            rows, images = [rows[i] for i in order], [images[i] for i in order]
            while images and images[-1].dim() == 1:
                jpegs.insert(0, images.pop())
        texts = [row["caption"] for row in rows]
        has_rows = len(rows) > 0
        return {
            "chunk": chunk.index, "piece": piece, "last": last, "inputs": inputs, "rows": rows,
            "failures": failures, "jpegs": jpegs or None,
            "images": torch.stack(images) if self.embed_images and images else None,
            # Texts longer than the context are cut (and end with end-of-text), as
            # clip-retrieval does, rather than failing the whole row.
            "tokens": (tokenize(texts, self.context_length, truncate=True)
                       if self.embed_texts and has_rows else None),
        }


def _single_thread_worker(worker_id):
    # Workers decode with PIL and preprocess small tensors; torch's intra-op threads would
    # only compete with the model for cores.
    torch.set_num_threads(1)


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
    """Embeddings as a host tensor of ``dtype`` (normalized in fp32 when asked) and the CUDA
    event that marks the copy complete (None on the CPU)."""
    features = features.float()
    if normalize:
        features = F.normalize(features, dim=-1)
    features = features.to(dtype)
    if features.device.type != "cuda":
        return features, None
    host = torch.empty(features.shape, dtype=dtype, pin_memory=True)
    host.copy_(features, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


# ---------------------------------------------------------------------------------------
# Ranks

def distributed_rank():
    """``(rank, world_size, created)`` from the launcher's environment (one process without
    one); ``created`` says that this call started the process group."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and "MASTER_ADDR" in os.environ:
        import torch.distributed as dist
        if dist.is_available() and not dist.is_initialized():
            # Only for barriers between ranks, so gloo (which needs no GPU) is enough.
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            return rank, world_size, True
    return rank, world_size, False


def barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return True
    return False


def _collective_device():
    """Where tensors of a collective must be: the current GPU for NCCL (a group the caller
    started), the CPU for gloo (the group ``distributed_rank`` starts)."""
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_succeeded(succeeded):
    """``(grouped, all succeeded)``: with a process group, every rank says whether it
    succeeded (a collective, so also a barrier); without one, this rank's own outcome."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False, succeeded
    failed = torch.tensor([0 if succeeded else 1], device=_collective_device())
    dist.all_reduce(failed)
    return True, failed.item() == 0


def default_num_workers(device):
    """Decoding processes for this rank when ``--num-workers`` is not given: the cores are
    shared by the ranks of a machine. A GPU embeds thousands of images a second, so decoding
    needs all the cores it can get; on the CPU the model needs them (a ViT-B/32 image takes
    about 0.1 core-second, decoding and preprocessing a 500x375 JPEG about a tenth of it)."""
    cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cuda":
        return max(1, min(cores - 1, 16))
    return max(1, cores // 8)


def default_device():
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


# ---------------------------------------------------------------------------------------
# Output folder set-up and resume

_SHARED_ERRORS = (FileExistsError, FileNotFoundError, ValueError, TimeoutError)


def on_rank_zero(rank, action):
    """Run ``action`` on rank 0 only. With a process group, every rank learns whether it
    failed and raises the same error, rather than waiting at the next barrier (until the
    group's timeout) for a rank that has stopped."""
    import torch.distributed as dist
    error = None
    if rank == 0:
        try:
            action()
        except Exception as caught:  # re-raised below, after the other ranks are told
            error = caught
    if dist.is_available() and dist.is_initialized():
        outcome = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(outcome, src=0, device=_collective_device())
        if rank != 0 and outcome[0] is not None:
            kind, message = outcome[0]
            shared = {cls.__name__: cls for cls in _SHARED_ERRORS}
            raise shared.get(kind, RuntimeError)(f"rank 0 stopped the job: {message}")
    if error is not None:
        raise error


def prepare_output(folder, plan, job, resume, rank):
    """Check the output folder and record the plan. Rank 0 decides; other ranks wait for its
    plan (at a barrier when a process group exists, else by watching for the file)."""
    import torch.distributed as dist
    grouped = dist.is_available() and dist.is_initialized()
    alone = int(os.environ.get("WORLD_SIZE", 1)) == 1

    def decide():
        check_output_is_free(folder, resume)
        if resume and os.path.exists(folder.plan_path):
            _check_same_job(folder, plan, job)
        folder.make_folders(plan.embed_images, plan.embed_texts)
        # A killed run's temporary files are inert (readers open only final names). They are
        # deleted only while no other rank can be writing: alone, or before the barrier.
        # Without a process group, ranks on a resumed job start at once, so they stay.
        if alone or grouped:
            folder.remove_temporaries()
        write_json(folder.plan_path, {"fingerprint": plan.fingerprint,
                                      "chunks": len(plan.chunks), "job": job})

    on_rank_zero(rank, decide)
    if not barrier() and rank != 0:
        _wait_for_plan(folder, plan)
    if rank != 0 and resume:
        _check_same_job(folder, plan, job)  # every rank refuses a resume with other settings


def check_output_is_free(folder, resume):
    """The output folder must be new or empty, or hold a job that ``resume`` completes."""
    if not os.path.exists(folder.plan_path):
        if os.path.isdir(folder.root) and os.listdir(folder.root):
            raise FileExistsError(
                f"The output folder {folder.root} is not empty and holds no fastclip job; "
                "choose a new or empty folder.")
    elif not resume:
        raise FileExistsError(
            f"The output folder {folder.root} already holds a job; pass --resume to complete "
            "it, or choose a new folder.")


def _check_same_job(folder, plan, job):
    recorded = read_json(folder.plan_path)
    if recorded["fingerprint"] != plan.fingerprint:
        raise ValueError(
            f"--resume: the inputs or --shard-size differ from those of the job in "
            f"{folder.root}; resume with the same inputs and options, or use a new folder.")
    for setting in ("model", "model_dtype", "dtype", "normalized", "backend", "gpu_decode",
                    "max_pixels", "image_keys", "caption_key"):
        if recorded["job"].get(setting) != job[setting]:
            raise ValueError(
                f"--resume: the job in {folder.root} was run with {setting}="
                f"{recorded['job'].get(setting)!r}, not {job[setting]!r}; resume with the "
                "same setting so that every row is computed the same way.")


def _wait_for_plan(folder, plan, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(folder.plan_path) and \
                read_json(folder.plan_path)["fingerprint"] == plan.fingerprint:
            return
        time.sleep(0.2)
    raise TimeoutError(f"Rank 0 did not record the job in {folder.root} within {timeout} s.")


# ---------------------------------------------------------------------------------------
# The job

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


def embed_batches(model, batches, writer, normalize, dtype, bar, decode_on_device=None):
    """Embed every batch and hand the rows to ``writer``; returns the counts.
    ``decode_on_device(batch)`` decodes the JPEGs of ``--gpu-decode`` batches."""
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
            bar.set_postfix(failures=counts["failures"], refresh=False)
    return counts

def embed(output, images=(), texts=(), model="ViT-B/32", batch_size=256, num_workers=None,
          device=None, backend="auto", dtype="fp16", model_dtype=None, normalize=True,
          shard_size=100_000, resume=False, limit=None, image_column="image_path",
          text_column="caption", embed_captions=False, image_keys=decode.DEFAULT_IMAGE_KEYS,
          caption_key=decode.DEFAULT_CAPTION_KEY, max_pixels=decode.DEFAULT_MAX_PIXELS,
          gpu_decode=False, progress=True):
    """Embed images and/or texts into ``output`` in clip-retrieval's layout.

    ``images`` and ``texts`` are lists of sources (see ``fastclip.embed.sources``); ``model``
    is a name, a checkpoint path or ``random:tiny`` (see ``fastclip.embed.models``);
    ``dtype`` is the stored embeddings' dtype (``fp16`` or ``fp32``); ``model_dtype`` the
    weights' (fp16 on CUDA and fp32 on the CPU by default). ``gpu_decode`` decodes JPEGs on
    the model's device (see ``device_decode``; not bit-identical). Under a launcher that sets RANK
    and WORLD_SIZE, each process embeds its share. Returns this process's summary: inputs,
    rows, failures, seconds, items per second, and the manifest once the job is complete.
    """
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {list(OUTPUT_DTYPES)}, got {dtype!r}.")
    if model_dtype is not None and model_dtype not in MODEL_DTYPES:
        raise ValueError(f"model_dtype must be one of {list(MODEL_DTYPES)}, "
                         f"got {model_dtype!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be 0 (decode in this process) or more, "
                         f"got {num_workers}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}.")
    images, texts = ([sources] if isinstance(sources, str) else list(sources or ())
                     for sources in (images, texts))
    start = time.perf_counter()
    # Inputs and the output folder are checked before the model is loaded (or downloaded).
    plan = plan_job(images, texts, shard_size=shard_size, image_column=image_column,
                    text_column=text_column, embed_captions=embed_captions, limit=limit)
    rank, world_size, created_group = distributed_rank()
    folder = OutputFolder(output, plan.name_width)
    device = torch.device(device or default_device())
    if device.type == "cuda":
        # Streams, events and NCCL collectives below use the current device: this rank's.
        torch.cuda.set_device(device)
    on_rank_zero(rank, lambda: check_output_is_free(folder, resume))
    if gpu_decode:
        device_decode.torchvision_decode_jpeg()  # fail now, not in the first batch
    clip_model, preprocess = load_model(model, device, backend,
                                        MODEL_DTYPES.get(model_dtype))
    job = {
        "model": os.path.abspath(model) if os.path.isfile(model) else model,
        "backend": clip_model.backend, "model_dtype": str(clip_model.dtype).split(".")[-1],
        "dtype": dtype, "normalized": bool(normalize), "gpu_decode": bool(gpu_decode),
        # These decide which inputs fail: a resumed job must apply the same rules.
        "max_pixels": int(max_pixels), "image_keys": list(image_keys), "caption_key": caption_key,
        "embed_dim": clip_model.text_projection.shape[1],
        "images": images, "texts": texts, "shard_size": shard_size,
        "fastclip_version": __version__,
    }
    prepare_output(folder, plan, job, resume, rank)

    done = folder.done_indices()
    chunks = [c for c in rank_chunks(plan.chunks, rank, world_size) if c.index not in done]
    dataset = EmbedDataset(chunks, preprocess, batch_size, plan.embed_images, plan.embed_texts,
                           clip_model.context_length, max_pixels=max_pixels,
                           image_keys=image_keys, caption_key=caption_key,
                           device_decode=gpu_decode)
    if num_workers is None:
        num_workers = default_num_workers(device)
    num_workers = min(num_workers, len(dataset.units()))
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                        pin_memory=device.type == "cuda",
                        worker_init_fn=_single_thread_worker if num_workers else None,
                        prefetch_factor=4 if num_workers else None)
    known = [c.known_size for c in chunks]
    bar = tqdm(total=None if None in known else sum(known), unit="item", dynamic_ncols=True,
               disable=not progress or rank != 0, desc="embed")
    writer = ShardWriter(folder, plan.metadata_columns)
    failure = None
    try:
        try:
            counts = embed_batches(
                clip_model, device_batches(loader, device), writer, normalize,
                OUTPUT_DTYPES[dtype], bar, partial(with_device_images, preprocess=preprocess,
                                                   device=device, max_pixels=max_pixels))
        finally:
            writer.close()
            bar.close()
    except Exception as error:  # raised below, once the other ranks know
        failure = error
    grouped, everyone_succeeded = all_ranks_succeeded(failure is None)
    if failure is not None:
        raise failure
    if not everyone_succeeded:
        raise RuntimeError(
            "Another rank of this job failed (its own error says why). This rank's shards are "
            "written; run the job again with --resume and the same options to complete it.")
    manifest = None
    if rank == 0 or not grouped:
        manifest = folder.finalize(job, len(plan.chunks))
    if created_group:
        torch.distributed.destroy_process_group()
    seconds = time.perf_counter() - start
    return {**counts, "seconds": seconds, "items_per_second": counts["inputs"] / seconds,
            "rank": rank, "world_size": world_size, "manifest": manifest}


def summary_line(summary):
    """The one-line report printed at the end of ``fastclip embed``."""
    prefix = f"rank {summary['rank']}: " if summary["world_size"] > 1 else ""
    return (f"{prefix}{summary['inputs']} items, {summary['failures']} failures, "
            f"{summary['items_per_second']:.1f} items/s, {summary['seconds']:.1f} s wall")
