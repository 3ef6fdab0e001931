"""``python -m fastjepa <command> ...``: see :mod:`fastjepa.cli`."""
import sys

from .cli import main

sys.exit(main())
