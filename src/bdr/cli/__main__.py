"""``python -m bdr.cli``: the ``bdr`` command."""

import sys

from .app import main

sys.exit(main())
