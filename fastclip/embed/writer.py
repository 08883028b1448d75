"""The output folder: clip-retrieval's layout, written atomically, on a background thread.

Layout (N is the chunk index, zero-padded to the same width for every shard)::

    img_emb/img_emb_{N}.npy          one row per embedded image
    text_emb/text_emb_{N}.npy        one row per embedded text, aligned with the images
    metadata/metadata_{N}.parquet    key, image_path, caption: aligned with the rows
    manifest.json                    model, backend, dtype, normalized, counts, version
    failures.jsonl                   one line per input that could not be embedded
    .fastclip/plan.json              the job's settings and input fingerprint (for --resume)
    .fastclip/failures_{N}.jsonl     the failures of shard N
    .fastclip/done_{N}.json          written last: shard N is complete

Every file is written under a temporary name and renamed into place, so a reader never
sees half a file. A shard counts as written only once its ``done`` marker exists; a run
killed at any moment keeps every complete shard, and ``--resume`` redoes the others
(replacing any of their files that were renamed into place before the kill), so every input
ends up in exactly one shard. ``manifest.json`` and ``failures.jsonl`` are assembled from the
markers once every shard of the plan is done.
"""

import glob
import json
import os
import queue
import threading

import numpy as np

STATE_DIR = ".fastclip"
TEMP_TAG = ".tmp-"


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then
    rename it to ``path`` (atomic on POSIX file systems)."""
    temporary = f"{path}{TEMP_TAG}{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path, value):
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode() + b"\n"))


def read_json(path):
    with open(path) as f:
        return json.load(f)


class OutputFolder:
    """The files of one job's output folder."""

    def __init__(self, root, name_width):
        self.root = root
        self.width = name_width

    def name(self, index):
        return str(index).zfill(self.width)

    def path(self, kind, index):
        """``kind`` is ``img_emb``, ``text_emb``, ``metadata``, ``failures`` or ``done``."""
        if kind in ("img_emb", "text_emb"):
            return os.path.join(self.root, kind, f"{kind}_{self.name(index)}.npy")
        if kind == "metadata":
            return os.path.join(self.root, kind, f"metadata_{self.name(index)}.parquet")
        extension = "jsonl" if kind == "failures" else "json"
        return os.path.join(self.root, STATE_DIR, f"{kind}_{self.name(index)}.{extension}")

    @property
    def plan_path(self):
        return os.path.join(self.root, STATE_DIR, "plan.json")

    def make_folders(self, embed_images, embed_texts):
        folders = ["metadata", STATE_DIR] + ["img_emb"] * embed_images + ["text_emb"] * embed_texts
        for folder in folders:
            os.makedirs(os.path.join(self.root, folder), exist_ok=True)

    def remove_temporaries(self):
        """Delete the temporary files a killed run left (never complete files)."""
        for path in glob.glob(os.path.join(self.root, "**", f"*{TEMP_TAG}*"), recursive=True):
            os.remove(path)
        for path in glob.glob(os.path.join(self.root, STATE_DIR, f"*{TEMP_TAG}*")):
            os.remove(path)

    def done_indices(self):
        """The indices of the shards whose ``done`` marker exists."""
        names = glob.glob(os.path.join(self.root, STATE_DIR, "done_*.json"))
        return {int(os.path.basename(n)[len("done_"):-len(".json")]) for n in names}

    def commit_chunk(self, index, image, text, rows, failures, inputs, columns):
        """Write shard ``index``: embeddings, metadata, failures, then the done marker."""
        files = []
        if rows:
            for kind, array in (("img_emb", image), ("text_emb", text)):
                if array is not None:
                    atomic_write(self.path(kind, index), lambda f, a=array: np.save(f, a))
                    files.append(self.path(kind, index))
            atomic_write(self.path("metadata", index),
                         lambda f: _write_metadata(f, rows, columns))
            files.append(self.path("metadata", index))
        atomic_write(self.path("failures", index),
                     lambda f: f.write("".join(json.dumps(x) + "\n" for x in failures).encode()))
        write_json(self.path("done", index), {
            "index": index, "inputs": inputs, "rows": len(rows), "failures": len(failures),
            "images": 0 if image is None else len(rows),
            "texts": 0 if text is None else len(rows),
            "files": [os.path.relpath(f, self.root) for f in files]})

    def finalize(self, job, n_chunks):
        """Write ``failures.jsonl`` and ``manifest.json`` if every shard is done; return the
        manifest, or None when shards are missing."""
        if self.done_indices() != set(range(n_chunks)):
            return None
        markers = [read_json(self.path("done", i)) for i in range(n_chunks)]

        def concatenate_failures(f):
            for i in range(n_chunks):
                with open(self.path("failures", i), "rb") as part:
                    f.write(part.read())

        atomic_write(os.path.join(self.root, "failures.jsonl"), concatenate_failures)
        total = lambda field: sum(m[field] for m in markers)  # noqa: E731
        manifest = {
            **job,
            "counts": {"inputs": total("inputs"), "rows": total("rows"),
                       "images": total("images"), "texts": total("texts"),
                       "failures": total("failures"),
                       "shards": sum(1 for m in markers if m["rows"])},
            "failures": total("failures"),
        }
        write_json(os.path.join(self.root, "manifest.json"), manifest)
        return manifest


def _write_metadata(f, rows, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([(column, pa.string()) for column in columns])
    table = pa.table({c: [row.get(c) for row in rows] for c in columns}, schema=schema)
    pq.write_table(table, f)


class ShardWriter:
    """Collects embedded batches per chunk and commits each chunk on a background thread,
    so that the model never waits for disk. ``submit`` takes a dict with ``chunk``,
    ``piece`` (the batch's place in its chunk, from 0), ``last`` (true on the chunk's final
    piece), ``inputs``, ``rows``, ``failures`` and ``image``/``text``: each a host tensor and
    a CUDA event (or None) that says when its copy from the device is complete."""

    def __init__(self, folder, columns, max_pending=16):
        self.folder = folder
        self.columns = columns
        self.pending = {}
        self.queue = queue.Queue(maxsize=max_pending)
        self.error = None
        self.thread = threading.Thread(target=self._run, name="fastclip-shard-writer",
                                       daemon=True)
        self.thread.start()

    def submit(self, result):
        self._raise_if_failed()
        self.queue.put(result)

    def close(self):
        """Wait until every submitted chunk is written; re-raise a writing error."""
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self):
        if self.error is not None:
            raise RuntimeError(f"Writing to {self.folder.root} failed: {self.error}") \
                from self.error

    def _run(self):
        while (result := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._add(result)
                except Exception as error:  # reported to the main thread by submit/close
                    self.error = error

    def _add(self, result):
        """Keep a batch until its chunk is complete: every piece up to the ``last`` one,
        which may arrive in any order; then commit the pieces in order."""
        parts = self.pending.setdefault(result["chunk"], {"pieces": {}, "count": None})
        parts["pieces"][result["piece"]] = {
            "image": _to_numpy(*result["image"]) if result.get("image") is not None else None,
            "text": _to_numpy(*result["text"]) if result.get("text") is not None else None,
            "rows": result["rows"], "failures": result["failures"], "inputs": result["inputs"]}
        if result["last"]:
            parts["count"] = result["piece"] + 1
        if parts["count"] is None or len(parts["pieces"]) < parts["count"]:
            return
        del self.pending[result["chunk"]]
        pieces = [parts["pieces"][i] for i in range(parts["count"])]

        def joined(kind):
            arrays = [piece[kind] for piece in pieces if piece[kind] is not None]
            return np.concatenate(arrays) if arrays else None

        self.folder.commit_chunk(
            result["chunk"], joined("image"), joined("text"),
            [row for piece in pieces for row in piece["rows"]],
            [failure for piece in pieces for failure in piece["failures"]],
            sum(piece["inputs"] for piece in pieces), self.columns)


def _to_numpy(tensor, ready_event):
    if ready_event is not None:
        ready_event.synchronize()
    return tensor.numpy()
