"""python -m bdr.server"""

import sys

from .options import main

sys.exit(main())
