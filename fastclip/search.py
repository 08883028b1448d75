"""Top-k cosine search over an embedding folder written by ``fastclip embed`` (or any folder
in clip-retrieval's layout).

The shards are memory-mapped and scored a block of rows at a time, so a folder larger than
memory is searched with bounded memory.
"""

import json
import os

import numpy as np
import torch

from .images import IMAGE_EXTENSIONS, read_image
from .tokenizer import tokenize

EMBEDDING_FOLDERS = {"image": "img_emb", "text": "text_emb"}
BLOCK_ROWS = 1 << 16


def embedding_shards(folder, kind="image"):
    """The sorted ``.npy`` shards of ``kind`` (``image`` or ``text``) in ``folder``."""
    if kind not in EMBEDDING_FOLDERS:
        raise ValueError(f"kind must be 'image' or 'text', got {kind!r}.")
    shard_folder = os.path.join(folder, EMBEDDING_FOLDERS[kind])
    names = os.listdir(shard_folder) if os.path.isdir(shard_folder) else []
    shards = sorted(os.path.join(shard_folder, n) for n in names if n.endswith(".npy"))
    if not shards:
        raise FileNotFoundError(f"No {kind} embeddings in {folder} (no .npy file in "
                                f"{shard_folder}); is it the output folder of fastclip embed?")
    return shards


def manifest_model(folder):
    """The model that wrote ``folder``, as its ``manifest.json`` names it."""
    manifest = os.path.join(folder, "manifest.json")
    if not os.path.exists(manifest):
        raise FileNotFoundError(f"{folder} has no manifest.json to name its model; name the "
                                "model that embeds the query (--model).")
    with open(manifest) as f:
        return json.load(f)["model"]


def query_vector(model, preprocess, query):
    """The embedding of ``query`` as a numpy vector: the image at that path when ``query``
    names an image file, else the text itself."""
    device = model.logit_scale.device
    with torch.inference_mode():
        if query.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(query):
            features = model.encode_image(preprocess(read_image(query))[None].to(device))
        else:
            features = model.encode_text(tokenize([query], model.context_length,
                                                  truncate=True).to(device))
    return features.float().cpu().numpy()[0]


def search(folder, query, k=10, kind="image"):
    """The ``k`` rows of ``folder``'s ``kind`` embeddings most cosine-similar to ``query`` (a
    vector), best first: dicts with ``score``, ``shard`` (the .npy path), ``row`` and the
    row's metadata (``key``, ``image_path``, ``caption``) when the folder has it."""
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    query = query / np.linalg.norm(query)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    best_scores = np.empty(0, dtype=np.float32)
    best_places = np.empty((0, 2), dtype=np.int64)
    shards = embedding_shards(folder, kind)
    for shard_number, path in enumerate(shards):
        rows = np.load(path, mmap_mode="r")
        if rows.ndim != 2 or rows.shape[1] != query.shape[0]:
            raise ValueError(f"{path} holds embeddings of shape {rows.shape}, but the query "
                             f"has {query.shape[0]} dimensions; use the model that wrote "
                             "the folder (see its manifest.json).")
        for start in range(0, rows.shape[0], BLOCK_ROWS):
            block = np.asarray(rows[start:start + BLOCK_ROWS], dtype=np.float32)
            # Cosine, whether or not the rows were stored normalized.
            norms = np.maximum(np.linalg.norm(block, axis=1), 1e-12)
            scores = block @ query / norms
            places = np.stack([np.full(len(scores), shard_number),
                               np.arange(start, start + len(scores))], axis=1)
            best_scores = np.concatenate([best_scores, scores])
            best_places = np.concatenate([best_places, places])
            if len(best_scores) > k:
                keep = np.argpartition(-best_scores, k - 1)[:k]
                best_scores, best_places = best_scores[keep], best_places[keep]
    order = np.argsort(-best_scores, kind="stable")
    return [_result(folder, kind, shards[int(s)], int(r), float(best_scores[i]))
            for i, (s, r) in ((i, best_places[i]) for i in order)]


def _result(folder, kind, shard, row, score):
    result = {"score": score, "shard": shard, "row": row}
    prefix = EMBEDDING_FOLDERS[kind] + "_"
    number = os.path.basename(shard)[len(prefix):-len(".npy")]
    metadata = os.path.join(folder, "metadata", f"metadata_{number}.parquet")
    if os.path.exists(metadata):
        import pyarrow.parquet as pq
        result.update(pq.read_table(metadata).slice(row, 1).to_pylist()[0])
    return result
