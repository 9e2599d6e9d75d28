"""``python -m cluster.tune ...``: the same as ``mve tune ...``."""

import sys

from cluster.tune.cli import main

sys.exit(main())
