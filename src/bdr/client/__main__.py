"""``python -m bdr.client``: the bdr_client daemon."""

import sys

from .daemon import main

sys.exit(main())
