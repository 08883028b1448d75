"""The fastclip command: embed, classify, search, train and shapes.

Each subcommand is a module of this package with ``add_arguments(parser)`` and ``run(args)``
(returning the exit status); adding one is one line in ``SUBCOMMANDS``.
"""

import argparse
import importlib
import os
import sys

from ..files import describe_os_error
from ..version import __version__

# OSErrors that fastclip raises with a message of its own (the others are described).
_OWN_MESSAGES = (FileNotFoundError, FileExistsError, TimeoutError)

SUBCOMMANDS = {
    "embed": ("fastclip.cli.embed",
              "embed images and texts into clip-retrieval's layout (img_emb, text_emb, "
              "metadata)"),
    "classify": ("fastclip.cli.classify", "zero-shot classify images among given labels"),
    "search": ("fastclip.cli.search", "top-k search of an embedding folder by a text or image"),
    "train": ("fastclip.cli.train", "train or fine-tune a CLIP contrastively (see README)"),
    "shapes": ("fastclip.cli.shapes",
               "write sample images of the procedural shapes dataset, named after what they "
               "show"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="fastclip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fastclip {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError, RuntimeError, TimeoutError) as error:
        # Errors about the user's inputs, options and files: the message says what to do,
        # and a traceback would bury it. FASTCLIP_DEBUG=1 shows the traceback.
        if os.environ.get("FASTCLIP_DEBUG"):
            raise
        message = error if type(error) in _OWN_MESSAGES or not isinstance(error, OSError) \
            else describe_os_error(error)
        print(f"fastclip {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
