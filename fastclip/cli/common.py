"""Options that several subcommands share."""

from ..ops.dispatch import BACKEND_NAMES


def add_model_arguments(parser, default="ViT-B/32", help_suffix=""):
    """``--model``, ``--device`` and ``--backend``: what ``fastclip.load`` takes."""
    parser.add_argument("--model", default=default,
                        help="a model name, a checkpoint path, 'random:tiny' or "
                             f"'random:<architecture>'{help_suffix}")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:1 or cpu (default: CUDA when available)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
