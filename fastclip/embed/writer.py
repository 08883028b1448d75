"""The background writer: embedded batches, gathered per chunk and committed to the output
folder on a thread of their own, so that the model never waits for disk."""

import queue
import threading

import numpy as np

from ..files import describe_os_error


class ShardWriter:
    """Collects embedded batches per chunk and commits each chunk (``OutputFolder.
    commit_chunk``) on a background thread. ``submit takes a dict with ``chunk``,
    ``piece`` (the batch's place in its chunk, from 0), ``last`` (true on the chunk's final
    piece), ``inputs``, ``rows``, ``failures`` and ``image``/``text``: each a host tensor and
    a CUDA event (or None) that says when its copy from the device is complete."""

    def __init__(self, folder, columns, max_pending=16, types=None):
        self.folder = folder
        self.columns = columns
        self.types = types
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
            cause = (describe_os_error(self.error) if isinstance(self.error, OSError)
                     else str(self.error))
            raise RuntimeError(f"Writing to {self.folder.root} failed: {cause}") \
                from self.error

    def _run(self):
        while (result := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._add(result)
                except BaseException as error:  # reported to the main thread by submit/close
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
            sum(piece["inputs"] for piece in pieces), self.columns, self.types)


def _to_numpy(tensor, ready_event):
    if ready_event is not None:
        ready_event.synchronize()
    return tensor.numpy()
