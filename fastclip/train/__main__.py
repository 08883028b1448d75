"""``python -m fastclip.train``: the same as ``fastclip train``."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
