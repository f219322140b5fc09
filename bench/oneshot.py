"""One-shot sync of an image file (bdr_client without --control-device) vs rsync's delta transfer.

Two 2 GiB image files in /dev/shm filled with random data; 1 % of the 4 KiB pages of the source changed.  Our
one-shot sync (bdr_client -> loopback TCP -> bdr_server, a journal scan: staged, committed, applied) and
``rsync --inplace --no-whole-file`` (local to local, which still runs rsync's delta algorithm between its
sender and receiver) bring a copy of the old image up to date.  Printed: wall time, data bytes sent, the ratios.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
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


def run_bdr(d: Path, src: Path, replica: Path) -> tuple[float, int]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    srv_log = open(d / "server.log", "wb")  # noqa: SIM115 - closed below
    srv = subprocess.Popen(
        [*base("server", port), "--target-device", str(replica), "--journal", str(d / "journal")],
        stdout=srv_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_port(port)
        t0 = time.monotonic()
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
    return took, int(m.group(1))


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of 4 KiB pages changed")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = ap.parse_args(argv or [])
    if shutil.which("rsync") is None:
        print("rsync not installed: skipped")
        return 1
    d = Path(tempfile.mkdtemp(prefix="bdr-bench-oneshot-", dir=args.dir))
    try:
        size = args.size_mib << 20
        src, old, changed = make_images(d, size, args.changed, seed=1)
        replica, rdest = d / "replica.img", d / "rsync.img"
        shutil.copyfile(old, replica)
        shutil.copyfile(old, rdest)
        bdr_s, bdr_bytes = run_bdr(d, src, replica)
        rs_s, rs_literal, rs_sent = run_rsync(src, rdest)
        ok = identical(src, replica) and identical(src, rdest)
        print(f"image {args.size_mib} MiB, {changed} bytes changed ({args.changed:.1%} of 4 KiB pages)")
        print(
            f"bdr one-shot : {bdr_s:7.2f} s, data sent {bdr_bytes} bytes ({bdr_bytes / changed:.2f}x changed)"
        )
        print(
            f"rsync        : {rs_s:7.2f} s, literal data {rs_literal} bytes ({rs_literal / changed:.2f}x changed), "
            f"total sent {rs_sent} bytes"
        )
        print(f"speed-up vs rsync: {rs_s / bdr_s:.2f}x; both copies identical to the source: {ok}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
