"""``bdr history``, ``bdr restore``, ``bdr export`` and ``bdr rollback``: the replica's point-in-time history, read from its
directory on the replica host (the server may be running, except for a rollback)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from bdr.history import At, History, HistoryError, HistoryFormatError, PointRefused, fmt_point, parse_at
from bdr.history.export import Export, make_server
from bdr.history.restore import Outcome, restore, rollback
from bdr.history.view import PointView

from .status import size
from .targets import SetupError

log = logging.getLogger("bdr")


def _at(text: str) -> At:
    try:
        return parse_at(text)
    except ValueError as exc:
        raise SetupError(str(exc)) from None


def show(directory: str, as_json: bool) -> int:
    try:
        with History(directory) as h:
            info = h.summary()
    except HistoryFormatError as exc:
        raise SetupError(str(exc)) from None
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"history {info['directory']} of replica {info['replica']} ({size(info['replica_bytes'])})")
    print(f"  {size(info['bytes_used'])} used in {info['segments']} segments")
    oldest, newest = info["oldest"], info["newest"]
    if isinstance(oldest, dict) and isinstance(newest, dict):
        print(f"  {info['points']} points: oldest {_p(oldest)}, newest {_p(newest)}")
    else:
        print("  no point offered yet")
    gaps: Any = info["gaps"]
    for g in gaps:
        before = g["last_point_before"]
        after = f" (the last point before it, {_p(before)}, is lost)" if before else ""
        print(f"  gap at {g['time']}: {g['reason']}{after}")
    windows: Any = info["resyncs"]
    for w in windows:
        print(f"  no moment from {w['from']} to {w['to']}: {w['reason']} (the points before and after stay)")
    if info["rolled_back"]:
        print(f"  the replica was {info['rolled_back']}; the next client start resyncs it")
    return 0


def _p(point: dict[str, Any]) -> str:
    return f"{point['time']} (seq {point['seq']})"


def _report(what: str, out: Outcome) -> None:
    print(
        f"{what} {fmt_point(out.point)}: {out.undone} writes undone ({size(out.undone_bytes)}) in "
        f"{out.seconds:.1f}s"
    )


def _give_back(what: str, run: Callable[[At], Outcome], at_text: str) -> Outcome | None:
    """Run a restore or rollback (``what``); None when the moment is refused (said on standard error)."""
    at = _at(at_text)
    try:
        return run(at)
    except PointRefused as exc:
        verb = "roll back to" if what == "rollback" else what
        print(f"bdr: cannot {verb} {at}: {exc}", file=sys.stderr)
        return None
    except (HistoryError, HistoryFormatError) as exc:
        raise SetupError(str(exc)) from None
    except OSError as exc:
        raise SetupError(f"{what} failed: {exc.strerror or exc}") from None


def do_restore(directory: str, at_text: str, dest: str) -> int:
    out = _give_back("restore", lambda at: restore(directory, at, dest), at_text)
    if out is None:
        return 1
    _report(f"{dest} now holds the replica as of", out)
    return 0


def do_rollback(directory: str, at_text: str) -> int:
    out = _give_back("rollback", lambda at: rollback(directory, at), at_text)
    if out is None:
        return 1
    _report("the replica is rolled back to", out)
    print("the next bdr_client start resyncs it to the source's present; until then it is that past moment")
    return 0


def do_export(directory: str, at_text: str, listen: str, name: str) -> int:
    at = _at(at_text)
    try:
        view = PointView(directory, at)
    except PointRefused as exc:
        print(f"bdr: cannot export {at}: {exc}", file=sys.stderr)
        return 1
    except (HistoryError, HistoryFormatError) as exc:
        raise SetupError(str(exc)) from None
    except OSError as exc:
        raise SetupError(f"export failed: {exc.strerror or exc}") from None
    with view:
        try:
            export = Export(view, name)
            server = make_server(export, listen)
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        except OSError as exc:
            raise SetupError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        logging.basicConfig(level=logging.INFO, format="bdr export: %(message)s", stream=sys.stderr)
        with server:
            addr = server.server_address  # (host, port, ...), or a Unix socket's path
            tcp = isinstance(addr, tuple)
            where = f"{addr[0]} {addr[1]}" if isinstance(addr, tuple) else f"-unix {listen}"
            print(
                f"exporting {view.history.meta.replica} as of {fmt_point(view.point)} read-only over NBD on "
                f"{listen}, export {name!r} ({size(view.written)} of it from the history so far)\n"
                f"  to use it here: modprobe nbd; nbd-client -N {name} {where} /dev/nbd0; "
                "mount -o ro /dev/nbd0 /mnt\n"
                "  stop with Ctrl-C or SIGTERM, after umount and nbd-client -d /dev/nbd0",
                flush=True,
            )
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                with contextlib.suppress(KeyboardInterrupt):
                    server.serve_forever()
            finally:
                if not tcp:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(listen)
            export.lock.acquire(timeout=10)  # no read of a client's is under way when the view closes
        print(f"export of {fmt_point(view.point)} stopped")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
