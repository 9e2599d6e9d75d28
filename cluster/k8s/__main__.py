"""``python -m cluster.k8s ACTION ...``: the same actions as ``mve k8s``."""

import sys

from cluster.k8s.cli import main

sys.exit(main())
