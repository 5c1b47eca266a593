"""``python -m invmon``: the same command as the ``invmon`` script."""

import sys

from invmon.cli import main

sys.exit(main())
