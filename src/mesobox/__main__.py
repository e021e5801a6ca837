"""``python -m mesobox`` is the same as the ``mesobox`` command."""

import sys

from mesobox.cli import main

sys.exit(main())
