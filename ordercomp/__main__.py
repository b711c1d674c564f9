"""``python -m ordercomp``: the command line (see :mod:`ordercomp.cli`)."""

import sys

from .cli import main

sys.exit(main())
