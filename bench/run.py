"""`make bench`: run every benchmark in turn and print its figures.

Each benchmark measures its own baseline in the same run and prints ratios against it; nothing here asserts
a speed.  Add a benchmark by adding its module name to BENCHES (it must have a ``main() -> int``).
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCHES = [
    "kernel_fio",  # fio through bdr vs dm-linear in the VM (kernel target overhead)
    "stream",  # ring -> bdr_client -> TCP -> bdr_server -> replica file, vs plain loopback TCP (host)
    "tls",  # the same stream with mutual TLS + shared secret, vs plaintext in the same run (host)
    "vm_resync",  # start-up resync of a 64 MiB device with 1 % changed, in the VM, vs streaming the same blocks
    "failback",  # failback resync in the VM: bytes sent vs bytes of the blocks that differ
    "history",  # streaming with the point-in-time history on vs off; restore of a 1 GiB device vs a plain copy
    "oneshot",  # one-shot sync of a 2 GiB image (1 % of pages changed) vs rsync --inplace --no-whole-file (host)
]


def main(argv: list[str]) -> int:
    names = argv or BENCHES
    failed = []
    for name in names:
        print(f"\n=== bench/{name}.py ===", flush=True)
        t0 = time.monotonic()
        rc = importlib.import_module(name).main()
        print(f"--- {name}: {time.monotonic() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"benchmarks that failed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
