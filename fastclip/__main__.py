"""``python -m fastclip``: the ``fastclip`` command."""

import sys

from .cli import main

sys.exit(main())
