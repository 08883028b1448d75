"""``fastclip classify``: zero-shot classification of image files among given labels."""

import sys

from ..images import InputError, read_image
from ..loading import load
from ..zero_shot import TEMPLATE_SETS, classify, zero_shot_classifier
from .common import add_model_arguments


def add_arguments(parser):
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--labels", required=True,
                        help="comma-separated class names, e.g. 'a cat,a dog,a car'")
    parser.add_argument("--templates", choices=sorted(TEMPLATE_SETS), default="imagenet",
                        help="prompt templates: OpenAI's 80 ImageNet templates, or 'a photo "
                             "of a {}.' (default: imagenet)")
    parser.add_argument("-k", "--top-k", type=int, default=5, help="labels shown per image")
    add_model_arguments(parser)


def run(args):
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise ValueError("--labels is empty; give comma-separated class names.")
    model, preprocess = load(args.model, device=args.device, backend=args.backend)
    weights = zero_shot_classifier(model, labels, TEMPLATE_SETS[args.templates])
    status = 0
    for path in args.images:
        try:
            image = preprocess(read_image(path))
        except InputError as error:
            print(f"{path}: skipped: {error}", file=sys.stderr)
            status = 1
            continue
        probabilities = classify(model, image[None], weights)[0]
        top = probabilities.topk(min(args.top_k, len(labels)))
        ranked = ", ".join(f"{labels[i]} {p:.3f}" for p, i in zip(top.values.tolist(),
                                                                   top.indices.tolist()))
        print(f"{path}\t{ranked}")
    return status
