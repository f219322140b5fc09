"""What a running daemon reports about itself: a typed snapshot its main loop publishes (``schema``), served

- as JSON on a Unix control socket (``--status-socket``, default ``/run/bdr/client-<chardev>.sock`` or
  ``/run/bdr/server-<port>.sock``), read by ``bdr status`` and used by ``bdr verify`` to ask the client for a
  verification pass (``control``), and
- as Prometheus metrics over HTTP (``--metrics-address HOST:PORT``, path ``/metrics``) (``metrics``).

Both read the same snapshot, so ``bdr status --json`` and a scrape taken at the same moment show the same numbers.
"""

from .control import REQUEST_MAX as REQUEST_MAX
from .control import RUN_DIR as RUN_DIR
from .control import Board as Board
from .control import ControlSocket as ControlSocket
from .control import Handler as Handler
from .control import Snapshot as Snapshot
from .control import StatusUnavailable as StatusUnavailable
from .control import open_control as open_control
from .control import query as query
from .control import request as request
from .metrics import MetricsEndpoint as MetricsEndpoint
from .metrics import lookup as lookup
from .metrics import parse_address as parse_address
from .schema import CLIENT_METRICS as CLIENT_METRICS
from .schema import CLIENT_STATES as CLIENT_STATES
from .schema import SERVER_METRICS as SERVER_METRICS
from .schema import SERVER_STATES as SERVER_STATES
from .schema import ClientSnapshot as ClientSnapshot
from .schema import ServerSnapshot as ServerSnapshot
from .schema import Spec as Spec
