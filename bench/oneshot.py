"""One-shot sync of an image file (bdr_client without --control-device) vs rsync's delta transfer.

Two 2 GiB image files filled with random data; 1 % of the 4 KiB pages of the source changed.  Our one-shot sync
(bdr_client -> loopback TCP -> bdr_server, a journal scan: staged, committed, applied, each step made durable)
and ``rsync --inplace --no-whole-file`` (local to local, which still runs rsync's delta algorithm between its
sender and receiver; it syncs nothing) bring a copy of the old image up to date.  Run twice: images and journal
in a directory on the machine's disk (``--disk-dir``), then in /dev/shm; the images are written back (``sync``)
before each timed run, so no run pays for the set-up's dirty pages.  Printed: wall time with its breakdown from
the daemons' logs, data bytes sent, the ratios.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAGE = 4096
CHUNK = 64 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def make_images(d: Path, size: int, fraction: float, seed: int) -> tuple[Path, Path, int]:
    """source.img (random), old.img (= source before the change); returns the number of changed bytes."""
    src, old = d / "source.img", d / "old.img"
    with open(src, "wb") as f:
        for _ in range(size // CHUNK):
            f.write(os.urandom(CHUNK))
    shutil.copyfile(src, old)
    rnd = random.Random(seed)
    pages = rnd.sample(range(size // PAGE), int(size // PAGE * fraction))
    with open(src, "r+b") as f:
        for pg in pages:
            f.seek(pg * PAGE)
            f.write(rnd.randbytes(PAGE))
    return src, old, len(pages) * PAGE


def identical(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def base(daemon: str, port: int) -> list[str]:
    return [sys.executable, "-m", f"bdr.{daemon}", "--address", "127.0.0.1", "--port", str(port)]


def _stamp(log: str, pattern: str) -> float | None:
    """The wall-clock time (seconds since the epoch) of the first log line matching ``pattern``."""
    m = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) .*" + pattern, log, re.M)
    if m is None:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()


def breakdown(t0: float, cli: str, srv: str, t_end: float) -> str:
    """Where the time went: process start to the scan, the scan (read, hash, compare, send, stage), then the
    commit and apply on the server, then the exit."""
    marks = [
        ("start", t0),
        ("scan", _stamp(cli, r"scan 1 \(")),
        ("stage+sync", _stamp(srv, r"scan 1 ended")),
        ("commit", _stamp(srv, r"journal: resync committed")),
        ("apply+exit", _stamp(srv, r"journal resync applied")),
        ("exit", t_end),
    ]
    if any(t is None for _, t in marks):
        return "(breakdown not in the logs)"
    parts = []
    for (name, a), (_, b) in itertools.pairwise(marks):
        assert a is not None and b is not None
        parts.append(f"{name} {b - a:.2f}")
    return ", ".join(parts)


def run_bdr(d: Path, src: Path, replica: Path) -> tuple[float, int, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    srv_log = open(d / "server.log", "wb")  # noqa: SIM115 - closed below
    srv = subprocess.Popen(
        [
            *base("server", port),
            "--target-device",
            str(replica),
            "--journal",
            str(d / "journal"),
            "--verbose",
        ],
        stdout=srv_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_port(port)
        t0, w0 = time.monotonic(), time.time()
        cli = subprocess.run(
            [*base("client", port), "--source-device", str(src)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        took = time.monotonic() - t0
    finally:
        srv.terminate()
        srv.wait(30)
        srv_log.close()
    m = re.search(r"sent with data \((\d+) bytes\)", cli.stderr + cli.stdout)
    if cli.returncode != 0 or m is None:
        raise RuntimeError(f"bdr_client exited {cli.returncode}: {cli.stderr[-2000:]}")
    srv_text = (d / "server.log").read_text(errors="replace")
    return took, int(m.group(1)), breakdown(w0, cli.stderr + cli.stdout, srv_text, w0 + took)


def run_rsync(src: Path, dest: Path) -> tuple[float, int, int]:
    t0 = time.monotonic()
    out = subprocess.run(
        ["rsync", "--inplace", "--no-whole-file", "--stats", str(src), str(dest)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    took = time.monotonic() - t0
    literal = int(re.search(r"Literal data: ([\d,]+)", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    return took, literal, sent


def one_run(where: str, size_mib: int, fraction: float) -> bool:
    d = Path(tempfile.mkdtemp(prefix="bdr-bench-oneshot-", dir=where))
    try:
        size = size_mib << 20
        src, old, changed = make_images(d, size, fraction, seed=1)
        replica, rdest = d / "replica.img", d / "rsync.img"
        shutil.copyfile(old, replica)
        shutil.copyfile(old, rdest)
        os.sync()  # the set-up's dirty pages are not the timed runs' to write back
        bdr_s, bdr_bytes, parts = run_bdr(d, src, replica)
        os.sync()
        rs_s, rs_literal, rs_sent = run_rsync(src, rdest)
        ok = identical(src, replica) and identical(src, rdest)
        print(
            f"-- images and journal in {where}: {size_mib} MiB, {changed} bytes changed ({fraction:.1%} of pages)"
        )
        print(
            f"bdr one-shot : {bdr_s:7.2f} s, data sent {bdr_bytes} bytes ({bdr_bytes / changed:.2f}x changed)"
        )
        print(f"               {parts}")
        print(
            f"rsync        : {rs_s:7.2f} s, literal data {rs_literal} bytes ({rs_literal / changed:.2f}x changed), "
            f"total sent {rs_sent} bytes"
        )
        print(
            f"speed-up vs rsync: {rs_s / bdr_s:.2f}x; both copies identical to the source: {ok}", flush=True
        )
        return ok
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of 4 KiB pages changed")
    ap.add_argument("--disk-dir", default="/var/tmp", help="a directory on the machine's disk")
    ap.add_argument("--no-shm", action="store_true", help="skip the run in /dev/shm")
    args = ap.parse_args(argv or [])
    if shutil.which("rsync") is None:
        print("rsync not installed: skipped")
        return 1
    dirs = [args.disk_dir] + ([] if args.no_shm or not os.path.isdir("/dev/shm") else ["/dev/shm"])
    ok = [one_run(d, args.size_mib, args.changed) for d in dirs]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
