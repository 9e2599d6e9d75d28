import sys

from mve_cli.main import main

sys.exit(main())
