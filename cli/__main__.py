"""`python -m cli ARGS`, the same as `tunery ARGS` without the installed script."""

import sys

from cli.main import main

sys.exit(main())
