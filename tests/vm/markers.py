"""An application for the history tests: appends numbered, time-stamped markers to DIR/markers.log, each
fsync'd, while it creates and deletes files in DIR/files.  It pauses on request so that the test can take the
source's checksum at a quiet moment.

markers.py DIR --control CTL   (CTL/pause: pause, then CTL/paused holds the last fsync'd marker; CTL/stop: stop)
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--control", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    files = args.dir / "files"
    files.mkdir(exist_ok=True)
    pause, paused, stop = args.control / "pause", args.control / "paused", args.control / "stop"
    log = args.dir / "markers.log"
    # a log from an earlier run (on the other side of a failover) is continued: numbers keep increasing
    lines = log.read_text().split() if log.exists() else []
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    n = int(lines[-2]) if len(lines) >= 2 else 0
    alive: list[Path] = []
    while not stop.exists():
        if pause.exists():
            paused.write_text(str(n))
            while pause.exists() and not stop.exists():
                time.sleep(0.05)
            paused.unlink(missing_ok=True)
            continue
        n += 1
        os.write(fd, f"{n} {time.time():.6f}\n".encode())
        os.fsync(fd)
        f = files / f"f{n}"
        f.write_bytes(rnd.randbytes(rnd.choice([512, 4096, 20000, 65536])))
        alive.append(f)
        if len(alive) > 20 or rnd.random() < 0.3:
            alive.pop(rnd.randrange(len(alive))).unlink()
        time.sleep(0.02)
    os.close(fd)
    print(f"wrote markers up to {n}")


if __name__ == "__main__":
    main()
