"""The output folder: clip-retrieval's layout, its files, and the checks that let a job
start in it or resume it.

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
sees half a file; in an object store (``-o s3://bucket/out``), where there is no atomic
rename, each file is one upload, visible whole or not at all. A shard counts as written
only once its ``done`` marker exists; a run killed at any moment keeps every complete
shard, and ``--resume`` redoes the others (replacing any of their files that were put in
place before the kill), so every input ends up in exactly one shard. ``manifest.json``
and ``failures.jsonl`` are assembled from the markers once every shard of the plan is
done.
"""

import json
import os
import tempfile
import time
import uuid

import numpy as np

from ..files import describe_os_error, is_temporary
from .job import EmbedJob
from .ranks import barrier, grouped, on_rank_zero
from .storage import output_files

STATE_DIR = ".fastclip"


class OutputError(ValueError):
    """The output folder cannot take the job's files; the message names the path and why."""


def _json_bytes(value):
    return json.dumps(value, indent=2).encode() + b"\n"


class OutputFolder:
    """The files of one job's output folder, local or remote (``storage.output_files``)."""

    def __init__(self, root, name_width, storage_options=None):
        self.files = output_files(root, storage_options)
        self.root = self.files.root
        self.width = name_width

    def write_json(self, path, value):
        self.files.write(path, lambda f: f.write(_json_bytes(value)))

    def read_json(self, path):
        return json.loads(self.files.read(path))

    def name(self, index):
        return str(index).zfill(self.width)

    def path(self, kind, index):
        """``kind`` is ``img_emb``, ``text_emb``, ``metadata``, ``failures`` or ``done``."""
        join = self.files.join
        if kind in ("img_emb", "text_emb"):
            return join(self.root, kind, f"{kind}_{self.name(index)}.npy")
        if kind == "metadata":
            return join(self.root, kind, f"metadata_{self.name(index)}.parquet")
        extension = "jsonl" if kind == "failures" else "json"
        return join(self.root, STATE_DIR, f"{kind}_{self.name(index)}.{extension}")

    @property
    def plan_path(self):
        return self.files.join(self.root, STATE_DIR, "plan.json")

    def make_folders(self, embed_images, embed_texts):
        folders = ["metadata", STATE_DIR] + ["img_emb"] * embed_images + ["text_emb"] * embed_texts
        for folder in folders:
            self.files.makedirs(self.files.join(self.root, folder))

    def remove_temporaries(self):
        """Delete the temporary files a killed run left (never complete files; an object
        store holds none)."""
        if self.files.remote:
            return
        for folder, _, names in os.walk(self.root):
            for name in names:
                if is_temporary(name):
                    os.remove(os.path.join(folder, name))

    def done_indices(self):
        """The indices of the shards whose ``done`` marker exists."""
        names = self.files.listdir(self.files.join(self.root, STATE_DIR))
        return {int(n[len("done_"):-len(".json")]) for n in names
                if n.startswith("done_") and n.endswith(".json") and n[5:-5].isdigit()}

    def commit_chunk(self, index, image, text, rows, failures, inputs, columns, types=None):
        """Write shard ``index``: embeddings, metadata, failures, then the done marker. Files
        of the shard that this attempt does not write (an earlier attempt's, killed before
        its marker) are removed before the marker, so the marker always describes exactly
        the shard's files."""
        files, write = [], self.files.write
        if rows:
            for kind, array in (("img_emb", image), ("text_emb", text)):
                if array is not None:
                    write(self.path(kind, index), lambda f, a=array: np.save(f, a))
                    files.append(self.path(kind, index))
            write(self.path("metadata", index),
                  lambda f: _write_metadata(f, rows, columns, types))
            files.append(self.path("metadata", index))
        for kind in ("img_emb", "text_emb", "metadata"):
            stale = self.path(kind, index)
            if stale not in files:
                self.files.remove(stale)
        write(self.path("failures", index),
              lambda f: f.write("".join(json.dumps(x) + "\n" for x in failures).encode()))
        self.write_json(self.path("done", index), {
            "index": index, "inputs": inputs, "rows": len(rows), "failures": len(failures),
            "images": 0 if image is None else len(rows),
            "texts": 0 if text is None else len(rows),
            "files": [f[len(self.root):].lstrip("/" + os.sep) for f in files]})

    def finalize(self, job, n_chunks, ran=None):
        """Write ``failures.jsonl`` and ``manifest.json`` if every shard is done; return the
        manifest, or None when shards are missing. ``ran`` adds what this process saw of how
        the ops ran (the triton backend's fallbacks)."""
        if self.done_indices() != set(range(n_chunks)):
            return None
        markers = [self.read_json(self.path("done", i)) for i in range(n_chunks)]

        def concatenate_failures(f):
            for i in range(n_chunks):
                f.write(self.files.read(self.path("failures", i)))

        self.files.write(self.files.join(self.root, "failures.jsonl"), concatenate_failures)
        total = lambda field: sum(m[field] for m in markers)  # noqa: E731
        manifest = {
            **job,
            "counts": {"inputs": total("inputs"), "rows": total("rows"),
                       "images": total("images"), "texts": total("texts"),
                       "failures": total("failures"),
                       "shards": sum(1 for m in markers if m["rows"])},
            "failures": total("failures"),
            **(ran or {}),
        }
        self.write_json(self.files.join(self.root, "manifest.json"), manifest)
        return manifest


def _write_metadata(f, rows, columns, types=None):
    """The metadata parquet of a shard: ``columns`` as text, then any other fields the rows
    carry (``--enable-metadata``), in the order they first appear, typed as their table's
    column when ``types`` knows it, else as pyarrow infers from the values."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    arrays = {c: pa.array([row.get(c) for row in rows], pa.string()) for c in columns}
    extra = dict.fromkeys(name for row in rows for name in row if name not in arrays)
    for name in extra:
        values = [row.get(name) for row in rows]
        arrays[name] = _typed_array(values, (types or {}).get(name))
    pq.write_table(pa.table(arrays), f)


def _typed_array(values, kind):
    import pyarrow as pa
    try:
        return pa.array(values, kind)
    except (pa.ArrowException, TypeError, ValueError):
        pass
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError):
        # Values of mixed types (a number in one .json, text in the next): kept as JSON.
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def prepare_output(folder, plan, job, resume, ranks):
    """Check the output folder and record the plan and the ``job`` (``EmbedJob.record``).
    Rank 0 decides; other ranks wait for its plan (at a barrier when a process group exists,
    else by watching for the file)."""
    group = grouped()

    def decide():
        check_output_is_free(folder, resume)
        if resume and folder.files.exists(folder.plan_path):
            _check_same_job(folder, plan, job)
        folder.make_folders(plan.embed_images, plan.embed_texts)
        # A killed run's temporary files are inert (readers open only final names). They are
        # deleted only while no other rank can be writing: alone, or before the barrier.
        # Without a process group, ranks on a resumed job start at once, so they stay.
        if ranks.alone or group:
            folder.remove_temporaries()
        folder.write_json(folder.plan_path, {"fingerprint": plan.fingerprint,
                                      "chunks": len(plan.chunks), "name_width": folder.width,
                                      "job": job})

    on_rank_zero(ranks, decide)
    if not barrier() and ranks.rank != 0:
        _wait_for_plan(folder, plan)
    if ranks.rank != 0 and resume:
        _check_same_job(folder, plan, job)  # every rank refuses a resume with other settings


def recorded_name_width(root, resume, storage_options=None):
    """The shard-name width of the job a resume completes: its own, so that its shards keep
    their names (jobs begun by versions that did not record it padded ``count - 1``)."""
    if not resume:
        return None
    folder = OutputFolder(root, 0, storage_options)
    try:
        plan = folder.read_json(folder.plan_path)
    except (OSError, ValueError):
        return None  # no plan yet, or the resume checks report an unreadable one
    if "name_width" in plan:
        return int(plan["name_width"])
    return len(str(max(int(plan.get("chunks", 1)) - 1, 0)))


def check_output_is_free(folder, resume):
    """The output folder must be a folder this process can create and write to, and new or
    empty, or hold a job that ``resume`` completes. Checked before any model is loaded."""
    if folder.files.remote:
        return _check_remote_output_is_free(folder, resume)
    if os.path.lexists(folder.root) and not os.path.isdir(folder.root):
        raise FileExistsError(f"The output path {folder.root} is a file, not a folder; choose "
                              "a folder (new or empty).")
    try:
        os.makedirs(folder.root, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder.root):  # no name, so nothing is left behind
            pass
    except OSError as error:
        raise OutputError(f"Cannot write to the output folder {folder.root}: "
                          f"{describe_os_error(error, folder.root)}.") from None
    _check_holds_no_other_job(folder, resume, os.path.exists(folder.plan_path),
                              os.path.isdir(folder.root) and os.listdir(folder.root))


def _check_remote_output_is_free(folder, resume):
    files = folder.files
    try:
        if files.isfile(folder.root):
            raise FileExistsError(f"The output {folder.root} is a file, not a folder; choose "
                                  "a folder (new or empty).")
        entries = files.listdir(folder.root)
        # One small object, written and removed again, proves the credentials can write.
        probe = files.join(folder.root, f".fastclip-write-check-{uuid.uuid4().hex}")
        files.write(probe, lambda f: None)
        files.remove(probe)
        has_plan = files.exists(folder.plan_path)
    except FileExistsError:
        raise
    except Exception as error:  # the store's client errors: permissions, no bucket, no network
        raise OutputError(f"Cannot write to the output folder {folder.root}: "
                          f"{type(error).__name__}: {error}. Check the URL, the credentials "
                          "and the endpoint (AWS_ENDPOINT_URL, --storage-options).") from None
    _check_holds_no_other_job(folder, resume, has_plan, entries)


def _check_holds_no_other_job(folder, resume, has_plan, entries):
    if not has_plan:
        if entries:
            raise FileExistsError(
                f"The output folder {folder.root} is not empty and holds no fastclip job; "
                "choose a new or empty folder.")
    elif not resume:
        raise FileExistsError(
            f"The output folder {folder.root} already holds a job; pass --resume to complete "
            "it, or choose a new folder.")


def _check_same_job(folder, plan, job):
    recorded = folder.read_json(folder.plan_path)
    if recorded["fingerprint"] != plan.fingerprint:
        raise ValueError(
            f"--resume: the inputs or --shard-size differ from those of the job in "
            f"{folder.root}; resume with the same inputs and options, or use a new folder.")
    for setting in EmbedJob.resume_names():
        if setting not in recorded["job"]:
            continue  # a job begun by an earlier version is checked on what it recorded
        if setting == "model_sha256" and recorded["job"].get(setting) != job[setting]:
            raise ValueError(
                f"--resume: the weights of {job['model']} are not those the job in "
                f"{folder.root} began with (SHA256 {recorded['job'].get(setting)}, now "
                f"{job[setting]}); one folder must hold one model's rows. Restore the "
                "checkpoint, or start a new folder.")
        if recorded["job"].get(setting) != job[setting]:
            raise ValueError(
                f"--resume: the job in {folder.root} was run with {setting}="
                f"{recorded['job'].get(setting)!r}, not {job[setting]!r}; resume with the "
                "same setting so that every row is computed the same way.")


def _wait_for_plan(folder, plan, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.files.exists(folder.plan_path) and \
                folder.read_json(folder.plan_path)["fingerprint"] == plan.fingerprint:
            return
        time.sleep(0.2)
    raise TimeoutError(f"Rank 0 did not record the job in {folder.root} within {timeout} s.")
