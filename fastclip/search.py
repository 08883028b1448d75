"""Top-k cosine search over an embedding folder written by ``fastclip embed`` (or any folder
in clip-retrieval's layout), and the ``fastclip search`` command.

The shards are memory-mapped and scored a block of rows at a time, so a folder larger than
memory is searched with bounded memory.
"""

import glob
import json
import os

import numpy as np

EMBEDDING_FOLDERS = {"image": "img_emb", "text": "text_emb"}
BLOCK_ROWS = 1 << 16


def embedding_shards(folder, kind="image"):
    """The sorted ``.npy`` shards of ``kind`` (``image`` or ``text``) in ``folder``."""
    if kind not in EMBEDDING_FOLDERS:
        raise ValueError(f"kind must be 'image' or 'text', got {kind!r}.")
    pattern = os.path.join(folder, EMBEDDING_FOLDERS[kind], "*.npy")
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise FileNotFoundError(f"No {kind} embeddings in {folder} (nothing matches "
                                f"{pattern}); is it the output folder of fastclip embed?")
    return shards


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


# ---------------------------------------------------------------------------------------
# fastclip search

def add_arguments(parser):
    parser.add_argument("folder", metavar="EMB_DIR", help="an output folder of fastclip embed")
    parser.add_argument("query", help="a text, or the path of an image")
    parser.add_argument("-k", type=int, default=10, help="number of results (default: 10)")
    parser.add_argument("--kind", choices=sorted(EMBEDDING_FOLDERS), default="image",
                        help="search the image or the text embeddings (default: image)")
    parser.add_argument("--model", default=None,
                        help="the model that embeds the query (default: the manifest's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default="auto")


def query_model_name(folder, model):
    if model is not None:
        return model
    manifest = os.path.join(folder, "manifest.json")
    if not os.path.exists(manifest):
        raise FileNotFoundError(f"{folder} has no manifest.json to name its model; pass "
                                "--model.")
    with open(manifest) as f:
        return json.load(f)["model"]


def run(args):
    import torch

    from .embed.decode import decode_image, read_file
    from .embed.models import load_model
    from .embed.pipeline import default_device
    from .embed.sources import IMAGE_EXTENSIONS
    from .tokenizer import tokenize

    model, preprocess = load_model(query_model_name(args.folder, args.model),
                                   args.device or default_device(), args.backend)
    device = model.logit_scale.device
    with torch.inference_mode():
        if args.query.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(args.query):
            image = preprocess(decode_image(read_file(args.query)))
            query = model.encode_image(image[None].to(device))
        else:
            query = model.encode_text(tokenize([args.query], model.context_length,
                                               truncate=True).to(device))
    for result in search(args.folder, query.float().cpu().numpy()[0], args.k, args.kind):
        label = result.get("image_path") or result.get("caption") or result.get("key") or \
            f"{result['shard']}:{result['row']}"
        print(f"{result['score']:.4f}\t{label}")
    return 0
