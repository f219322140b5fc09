"""``bdr``: the admin tool — set up and remove bdr targets, show their state (``bdr status``: the kernel's
counters joined with what each daemon reports on its control socket), run an online verification
(``bdr verify``), and create the credentials the daemons authenticate each other with (``bdr certs``,
``bdr secret``).

The daemons are separate commands (``bdr_client``, ``bdr_server``); this tool talks to them only through their
control sockets (``bdr.status``).
"""

from .app import build_parser as build_parser
from .app import main as main
from .status import parse_status_line as parse_status_line
from .status import print_status as print_status
from .targets import SetupError as SetupError
from .targets import SetupPlan as SetupPlan
from .targets import check_plan as check_plan
from .targets import parse_buffer as parse_buffer
