"""``fastclip search``: the rows of an embedding folder closest to a text or an image."""

from ..loading import load
from ..search import EMBEDDING_FOLDERS, manifest_model, query_vector, search
from .common import add_model_arguments


def add_arguments(parser):
    parser.add_argument("folder", metavar="EMB_DIR", help="an output folder of fastclip embed")
    parser.add_argument("query", help="a text, or the path of an image")
    parser.add_argument("-k", type=int, default=10, help="number of results (default: 10)")
    parser.add_argument("--kind", choices=sorted(EMBEDDING_FOLDERS), default="image",
                        help="search the image or the text embeddings (default: image)")
    add_model_arguments(parser, default=None,
                        help_suffix=" that embeds the query (default: the manifest's)")


def run(args):
    model, preprocess = load(args.model or manifest_model(args.folder), device=args.device,
                             backend=args.backend)
    query = query_vector(model, preprocess, args.query)
    for result in search(args.folder, query, args.k, args.kind):
        label = result.get("image_path") or result.get("caption") or result.get("key") or \
            f"{result['shard']}:{result['row']}"
        print(f"{result['score']:.4f}\t{label}")
    return 0
