"""Point-in-time history: what keeping it costs and what giving a moment back takes, each against a baseline of
the same run.

1. Streaming with ``--history`` on vs off: bench/stream.py's runs (4 KiB ring records -> bdr_client -> loopback
   TCP -> bdr_server -> replica file, until durable), sequential and at random offsets, into a replica holding
   random data (so every before-image is real data, not zeros), alternated on and off; the ratio of the
   medians, and the history's bytes per replicated byte (from the server's status: bytes preserved).  The
   history is kept at 64 MiB, so it is full after the first 64 MiB and every new byte replaces an old one.
2. Restore of a 1 GiB device: a replica file of random data receives 128 MiB of random 4 KiB writes with a
   durability point every 1 MiB through the server's applier with a history; ``bdr restore`` of the oldest
   point to a new file, next to a plain copy of the replica file (the floor: a restore copies the device once).

Files live on /dev/shm when it exists; a warm-up first writes and deletes a file as large as a run's history (in
this virtual machine the first touch of a memory page is expensive, which would count against "on" only).

Usage: python bench/history.py [--total-mib N] [--rounds N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import stream
from bdr import wire as p
from bdr.history import At, History, HistoryWriter, Meta
from bdr.history.restore import restore
from bdr.journal import JFlag, Journal
from bdr.server import Applier
from bdr.server.replica import Replica

TARGET = 0.6
# the history of the streaming runs: full after the first 64 MiB, then every new byte replaces an old one (the
# steady state of a history at its size limit)
HISTORY_SIZE = 64 << 20
RESTORE_DEVICE = 1 << 30
RESTORE_WRITES = 128 << 20


def fill_random(path: Path, size: int = stream.DEVICE) -> None:
    """The replica holds data before the run: each before-image is 4 KiB of it, not a zero block."""
    block = random.Random(5).randbytes(16 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)


def warm_up(work: Path, size: int) -> None:
    """Write and delete a file as large as the history a run keeps.  On this machine (a virtual machine) the
    first touch of a memory page costs about as much as copying it twenty times; the history's tmpfs pages would
    pay it in the first "on" round only, and the "off" rounds never (their replica file is reused)."""
    chunk = bytes(16 << 20)
    path = work / "warm-up"
    with open(path, "wb") as f:
        for _ in range(size // len(chunk) + 1):
            f.write(chunk)
    path.unlink()


def appended(server_log: Path) -> int:
    """History bytes the server wrote in a run (its closing line)."""
    m = re.findall(r"history \S+: (\d+) bytes appended since start", server_log.read_text())
    if not m:
        raise RuntimeError(f"no history line in {server_log}")
    return int(m[-1])


def streaming(work: Path, total: int, rounds: int) -> dict[str, object]:
    hist = work / "history"
    warm_up(work, 2 * stream.DEVICE + 2 * HISTORY_SIZE)  # the replica of a run, the last one's, the history
    runs: dict[str, dict[str, list[float]]] = {
        pat: {"off": [], "on": [], "bytes_per_byte": [], "cpu_off": [], "cpu_on": [], "server_on": []}
        for pat in ("sequential", "random")
    }
    for _ in range(rounds):
        for pat in ("sequential", "random"):
            n = total if pat == "sequential" else total // 4
            off = stream.bdr_run(work, n, 32, pat, fill=fill_random)
            shutil.rmtree(hist, ignore_errors=True)
            on = stream.bdr_run(
                work,
                n,
                32,
                pat,
                server_extra=("--history", str(hist), "--history-size", str(HISTORY_SIZE), "--verbose"),
                fill=fill_random,
            )
            runs[pat]["off"].append(off["mb_s"])
            runs[pat]["on"].append(on["mb_s"])
            runs[pat]["cpu_off"].append(off["cpu_per_gib"])
            runs[pat]["cpu_on"].append(on["cpu_per_gib"])
            runs[pat]["server_on"].append(on["server_cpu_s"] / on["gib"] - off["server_cpu_s"] / off["gib"])
            runs[pat]["bytes_per_byte"].append(appended(work / f"{pat}-logs" / "server.log") / n)
            shutil.rmtree(hist, ignore_errors=True)
    out: dict[str, object] = {}
    for pat, r in runs.items():
        off_m, on_m = statistics.median(r["off"]), statistics.median(r["on"])
        out[pat] = {
            "off_mb_s": round(off_m, 1),
            "on_mb_s": round(on_m, 1),
            "ratio": round(on_m / off_m, 3),
            "history_bytes_per_replicated_byte": round(statistics.median(r["bytes_per_byte"]), 4),
            # CPU time the machine spent per GiB streamed (bench/stream.py), and what the history added to the
            # server's (with its reader process)
            "cpu_s_per_gib_off": round(statistics.median(r["cpu_off"]), 3),
            "cpu_s_per_gib_on": round(statistics.median(r["cpu_on"]), 3),
            "server_cpu_s_per_gib_added": round(statistics.median(r["server_on"]), 3),
            "rounds_off": [round(x) for x in r["off"]],
            "rounds_on": [round(x) for x in r["on"]],
        }
    return out


def batch(first: int, offsets: list[int], data: bytes) -> p.Data:
    """4 KiB writes at ``offsets`` numbered from ``first``, then a FLUSH."""
    recs = [
        struct.pack("<QQIHHQ", first + i, off // 512, 4096, p.OP_WRITE, 0, 0) for i, off in enumerate(offsets)
    ]
    recs.append(struct.pack("<QQIHHQ", first + len(offsets), 0, 0, p.OP_FLUSH, 0, 0))
    desc = b"".join(recs)
    return p.Data.parse(memoryview(p.DATA_HEAD.pack(len(recs), len(data)) + desc + data), 0)


def restoring(work: Path) -> dict[str, object]:
    rep, hist, dest, copy = work / "rep1g.img", work / "h1g", work / "restored.img", work / "copy.img"
    fill_random(rep, RESTORE_DEVICE)
    replica = Replica(rep)
    journal = Journal(work / "j1g")
    journal.commit(
        flags=JFlag.SEQ_VALID | JFlag.SOURCE_KNOWN | JFlag.CONSISTENT | JFlag.HAS_DATA, durable_seq=p.NO_SEQ
    )
    writer = HistoryWriter(hist, replica.fd, Meta(str(rep), replica.size, str(work / "j1g")), 1 << 30, None)
    applier = Applier(replica, journal)
    applier.history = writer
    rnd = random.Random(9)
    data = rnd.randbytes(1 << 20)
    seq = 0
    for _ in range(RESTORE_WRITES >> 20):
        offsets = [rnd.randrange(RESTORE_DEVICE // 4096) * 4096 for _ in range(256)]
        applier.apply(batch(seq, offsets, data))
        seq += 257
    writer.close()
    replica.close()
    journal.close()
    with History(hist) as h:
        oldest = h.points()[0]
        used = h.bytes_used
    t0 = time.perf_counter()
    out = restore(hist, At(seq=oldest.seq), str(dest), quiet=True)
    took = time.perf_counter() - t0
    t0 = time.perf_counter()
    shutil.copyfile(rep, copy)
    with open(copy, "rb+") as f:
        os.fsync(f.fileno())
    copy_took = time.perf_counter() - t0
    return {
        "device_mib": RESTORE_DEVICE >> 20,
        "written_mib": RESTORE_WRITES >> 20,
        "history_mib": round(used / (1 << 20), 1),
        "undone_writes": out.undone,
        "restore_s": round(took, 2),
        "copy_s": round(copy_took, 2),
        "ratio_to_copy": round(took / copy_took, 2),
    }


def main(argv: list[str] | None = None) -> int:
    run(argv or [])
    return 0


def run(argv: list[str]) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-mib", type=int, default=1024, help="data streamed per run (default 1024 MiB)")
    ap.add_argument("--rounds", type=int, default=5, help="on / off pairs; medians are used (default 5)")
    ap.add_argument(
        "--dir",
        type=Path,
        help="where the replica, journal and history go (default /dev/shm, else the temp dir)",
    )
    args = ap.parse_args(argv)
    base = args.dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="bdr-bench-history-", dir=base))
    try:
        st = streaming(work, args.total_mib << 20, args.rounds)
        for f in work.iterdir():
            if f.is_file():
                f.unlink()
        rs = restoring(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, object] = {"bench": "history", "files_on": str(base), "streaming": st, "restore": rs}
    print(f"history bench ({args.total_mib} MiB of 4 KiB records per run, files on {base}):")
    for pat, r in st.items():
        assert isinstance(r, dict)
        print(
            f"  {pat:<10} history off {r['off_mb_s']:8.1f} MB/s, on {r['on_mb_s']:8.1f} MB/s   ratio "
            f"{r['ratio']:.2f} (target >= {TARGET})   history {r['history_bytes_per_replicated_byte']:.3f} "
            f"bytes per replicated byte   (rounds off {r['rounds_off']}, on {r['rounds_on']})"
        )
        print(
            f"  {'':<10} CPU time per GiB streamed: off {r['cpu_s_per_gib_off']:.2f} s, on {r['cpu_s_per_gib_on']:.2f} s"
            f" (the server's, with its history reader, {r['server_cpu_s_per_gib_added']:+.2f} s)"
        )
    print(
        f"  restore of a {rs['device_mib']} MiB device to its oldest point ({rs['undone_writes']} writes undone, "
        f"{rs['history_mib']} MiB of history for {rs['written_mib']} MiB written): {rs['restore_s']} s; "
        f"a plain copy of the device {rs['copy_s']} s (restore = {rs['ratio_to_copy']}x the copy)"
    )
    print("BENCH " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
