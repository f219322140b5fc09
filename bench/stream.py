"""Streaming throughput: 4 KiB ring records from a RingProducer through bdr_client and bdr_server over loopback
TCP into a replica file, next to a plain loopback TCP baseline measured in the same run.

The clock runs from the first record published until every record is acknowledged *durable* by the server
(the client releases ring slots only then), so the figure includes the server's fdatasync + metadata commits.
Files live on /dev/shm when it exists, so the figure is the pipeline's, not the disk's.  Records at random
offsets are also set against what the replica file alone accepts: the same 4 KiB pwrites from one thread,
with no network and no protocol.  Both patterns are also set against a bare receiver of the same run: a sender
that only sends and a receiver that only moves the bytes into the file the way bdr_server does (splice, or a
pwrite per 4 KiB record), with no protocol, ring or producer: the most a server built that way can make here.

Each run also reports the CPU time the machine spent per GiB streamed (TCP, bdr split by process), next to
what the machine's CPUs allow a pipeline that makes the targets.

Usage: python bench/stream.py [--total-mib N] [--ring-mib N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bdr.testing.ring_producer import RingProducer

RECORD = 4096
GIB = 1 << 30
CHUNK_RECORDS = 256  # records per producer call (1 MiB)
DEVICE = 512 << 20  # the replicated device (an image file)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of a live process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process and its live children (the server's history reader) used so
    far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_seconds(int(c)) for c in children)


def machine_cpu_seconds() -> float:
    """CPU time every CPU of the machine spent busy so far (user, system, interrupts: everything but idle)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


_RECEIVER = """
import socket, sys
lst = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
conn, _ = lst.accept()
conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
buf = memoryview(bytearray(8 << 20))
total = 0
while n := conn.recv_into(buf):
    total += n
conn.sendall(str(total).encode())
"""


def baseline(total: int) -> tuple[float, float]:
    """Plain loopback TCP: one process sends ``total`` bytes with sendall, another recv_into()s them.  MB/s, and
    the CPU time the machine spent per GiB moved."""
    port = free_port()
    rx = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(port)], stdout=subprocess.PIPE)
    assert rx.stdout is not None
    rx.stdout.readline()
    cpu0 = machine_cpu_seconds()
    mb_s = timed_send(port, total)
    cpu = machine_cpu_seconds() - cpu0
    rx.wait(10)
    return mb_s, cpu / (total / GIB)


def timed_send(port: int, total: int) -> float:
    """Send ``total`` bytes over loopback TCP to a receiver on ``port`` that answers with the count it got, once
    it has them all (MB/s, until that answer)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        block = memoryview(random.Random(1).randbytes(8 << 20))
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            n = min(len(block), total - sent)
            s.sendall(block[:n])
            sent += n
        s.shutdown(socket.SHUT_WR)
        got = int(s.recv(64))
        dt = time.perf_counter() - t0
    assert got == total, (got, total)
    return total / dt / 1e6


def preallocate(path: Path) -> None:
    """A device-sized file written once with zeros, like a real target device: no page allocation or zeroing
    in the figures."""
    zeros = bytes(16 << 20)
    with open(path, "wb") as f:
        for _ in range(DEVICE // len(zeros)):
            f.write(zeros)


def write_ceiling(work: Path, total: int) -> float:
    """What the replica file alone accepts: ``total`` bytes of 4 KiB pwrites at random offsets into a
    preallocated file of the bench's device size, one thread, no network (MB/s).  The server cannot apply
    scattered records faster than this on the same machine."""
    path = work / "ceiling.img"
    preallocate(path)
    fd = os.open(path, os.O_RDWR)
    try:
        data = memoryview(random.Random(2).randbytes(CHUNK_RECORDS * RECORD))
        rnd = random.Random(3)
        offsets = [rnd.randrange(0, DEVICE // RECORD) * RECORD for _ in range(total // RECORD)]
        pwrite = os.pwrite
        t0 = time.perf_counter()
        for i, off in enumerate(offsets):
            j = (i % CHUNK_RECORDS) * RECORD
            pwrite(fd, data[j : j + RECORD], off)
        os.fdatasync(fd)
        return total / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)
        path.unlink()


_BARE = r"""
import fcntl, os, random, socket, sys
mode, path = sys.argv[1], sys.argv[2]
lst = socket.create_server(("127.0.0.1", 0))
print(lst.getsockname()[1], flush=True)
conn, _ = lst.accept()
conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
total = 0
if mode == "sequential":  # socket -> pipe -> file, as the server's splice path, with nothing else
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 1 << 20)
    while k := os.splice(conn.fileno(), w, 1 << 20):
        done = 0
        while done < k:
            done += os.splice(r, fd, k - done, offset_dst=(total + done) % size)
        total += k
else:  # 8 MiB frames received whole, then one pwrite per 4 KiB at a random offset
    frame = 8 << 20
    buf = memoryview(bytearray(frame))
    rnd = random.Random(3)
    offsets = [rnd.randrange(0, size // 4096) * 4096 for _ in range(frame // 4096)]
    pwrite = os.pwrite
    while True:
        got = 0
        while got < frame and (n := conn.recv_into(buf[got:])):
            got += n
        for i in range(got // 4096):
            pwrite(fd, buf[i * 4096 : (i + 1) * 4096], offsets[i])
        total += got
        if got < frame:
            break
os.fdatasync(fd)
conn.sendall(str(total).encode())
"""


def bare_server(work: Path, total: int, pattern: str) -> float:
    """The least any server can do with the stream, measured (MB/s): a sender that only sends, and a receiver
    that only puts the bytes into a preallocated replica file, with no protocol, no ring and no producer.
    ``sequential``: splice socket -> pipe -> file; ``random``: recv 8 MiB, then a pwrite per 4 KiB record at a
    random offset.  What bdr makes is bounded by this on the same machine."""
    path = work / "bare.img"
    preallocate(path)
    rx = subprocess.Popen([sys.executable, "-c", _BARE, pattern, str(path)], stdout=subprocess.PIPE)
    try:
        assert rx.stdout is not None
        return timed_send(int(rx.stdout.readline()), total)
    finally:
        rx.wait(30)
        path.unlink()


def bdr_run(
    work: Path,
    total: int,
    ring_mib: int,
    pattern: str,
    server_extra: tuple[str, ...] = (),
    client_extra: tuple[str, ...] = (),
    fill: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Stream ``total`` bytes of 4 KiB records through the daemons; MB/s and peak RSS of both.  ``*_extra``:
    more daemon flags (bench/tls.py adds the TLS and secret flags); ``fill``: writes the replica file before
    the run (default: zeros)."""
    dev = DEVICE
    src, rep, jr, ring = work / "src.img", work / "rep.img", work / "journal", work / "ring"
    for f in (rep, jr, ring, Path(str(ring) + ".dirty")):
        f.unlink(missing_ok=True)
    with open(src, "wb") as f:
        f.truncate(dev)
    (fill or preallocate)(rep)
    prod = RingProducer(ring, ring_mib * 1024 * 1024 // RECORD, dev)
    port = free_port()
    py = sys.executable
    logs = work / f"{pattern}-logs"
    logs.mkdir(exist_ok=True)
    srv_argv = [
        "--address",
        "127.0.0.1",
        "--port",
        str(port),
        "--target-device",
        str(rep),
        "--journal",
        str(jr),
    ]
    srv = subprocess.Popen(
        [py, "-m", "bdr.server", *srv_argv, *server_extra, "--benchmark"],
        stdout=open(logs / "server.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    wait_port(port)
    cli_argv = ["--address", "127.0.0.1", "--port", str(port), "--control-device", str(ring)]
    cli = subprocess.Popen(
        [
            py,
            "-m",
            "bdr.client",
            *cli_argv,
            *client_extra,
            "--source-device",
            str(src),
            "--no-replication",
            "--benchmark",
        ],
        stdout=open(logs / "client.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    data = memoryview(random.Random(2).randbytes(CHUNK_RECORDS * RECORD))
    nchunks = total // len(data)
    dev_chunks = dev // len(data)
    order = list(range(nchunks))
    rnd = random.Random(3)
    time.sleep(1.0)  # handshake
    try:
        c0 = (cpu_seconds(cli.pid), cpu_seconds(srv.pid), machine_cpu_seconds())
        t0 = time.perf_counter()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        for i in order:
            if pattern == "sequential":
                sector = (i % dev_chunks) * CHUNK_RECORDS * 8
                prod.write_run(sector, data, block=True)
            else:  # every 4 KiB record at a random offset: nothing coalesces, one write per record
                prod.write_records([rnd.randrange(0, dev // RECORD) * 8 for _ in range(CHUNK_RECORDS)], data)
        while prod.tail != prod.head:
            if cli.poll() is not None or srv.poll() is not None:
                raise RuntimeError(f"a daemon died; logs in {logs}")
            time.sleep(0.0005)
        dt = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_c, cpu_s, cpu_m = (
            cpu_seconds(cli.pid) - c0[0],
            cpu_seconds(srv.pid) - c0[1],
            machine_cpu_seconds() - c0[2],
        )
        cpu_p = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
        rss_c, rss_s = vm_hwm_mb(cli.pid), vm_hwm_mb(srv.pid)
    finally:
        for proc in (cli, srv):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (cli, srv):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        prod.close()

    def last_bench_line(name: str) -> str:
        lines = [
            ln for ln in (logs / name).read_text(errors="replace").splitlines() if ln.startswith("bench ")
        ]
        return max(lines, key=lambda ln: "durable_lag_ms_max=0.0" not in ln) if lines else ""

    return {
        "client_line": last_bench_line("client.log"),
        "server_line": last_bench_line("server.log"),
        "mb_s": nchunks * len(data) / dt / 1e6,
        "seconds": dt,
        "client_rss_mb": rss_c,
        "server_rss_mb": rss_s,
        # CPU time while streaming (not start-up or handshake), each process's and the whole machine's
        "client_cpu_s": cpu_c,
        "server_cpu_s": cpu_s,
        "producer_cpu_s": cpu_p,
        "machine_cpu_s": cpu_m,
        "gib": nchunks * len(data) / GIB,
        "cpu_per_gib": cpu_m / (nchunks * len(data) / GIB),
    }


def print_cpu(tcp: float, tcp_cpu: float, seq: dict[str, Any], rnd: dict[str, Any], ceil: float) -> None:
    """Where the CPU time goes while streaming, in CPU seconds per GiB, next to what the machine's CPUs allow
    a pipeline that makes the targets (its CPUs busy all the time, for as long as a GiB may take then)."""
    cpus = os.cpu_count() or 1
    gib_s = tcp * 1e6 / GIB  # loopback TCP, GiB/s

    def split(r: dict[str, Any]) -> str:
        per = r["gib"]
        parts = (r["client_cpu_s"], r["server_cpu_s"], r["producer_cpu_s"])
        other = r["machine_cpu_s"] - sum(parts)
        return (
            f"{r['cpu_per_gib']:.2f} = client {parts[0] / per:.2f} + server {parts[1] / per:.2f} + producer"
            f" {parts[2] / per:.2f} + other {other / per:.2f} (softirq, ...); {r['cpu_per_gib'] * r['mb_s'] * 1e6 / GIB:.1f}"
            " CPUs busy"
        )

    print(f"  CPU time while streaming, s per GiB ({cpus} CPUs):")
    print(f"    loopback TCP             {tcp_cpu:.2f}; {tcp_cpu * gib_s:.1f} CPUs busy")
    print(f"    bdr sequential           {split(seq)}")
    print(f"    bdr random 4 KiB         {split(rnd)}")
    print(f"    4 KiB pwrites alone      {GIB / (ceil * 1e6):.2f} (one thread)")
    print(
        f"    the most a pipeline may use to make 0.7 of TCP here: {cpus / (0.7 * gib_s):.2f}; 0.5 of TCP:"
        f" {cpus / (0.5 * gib_s):.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    run(argv or [])
    return 0


def run(argv: list[str]) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-mib", type=int, default=2048, help="data streamed per run (default 2048 MiB)")
    ap.add_argument("--ring-mib", type=int, default=32, help="ring size (default 32 MiB = 8192 slots)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every measurement; medians are used (3)")
    args = ap.parse_args(argv)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="bdr-bench-", dir=base))
    total = args.total_mib << 20
    try:
        # three rounds of baseline, sequential, random and write ceiling; the median of each is used (the
        # machine is shared: one slow round does not decide the figure)
        tcps, tcp_cpus, seqs, rnds, ceils, bare_seqs, bare_rnds = [], [], [], [], [], [], []
        for _ in range(args.rounds):
            tcp_mb_s, tcp_cpu = baseline(total)
            tcps.append(tcp_mb_s)
            tcp_cpus.append(tcp_cpu)
            bare_seqs.append(bare_server(work, total, "sequential"))
            seqs.append(bdr_run(work, total, args.ring_mib, "sequential"))
            bare_rnds.append(bare_server(work, total // 4, "random"))
            rnds.append(bdr_run(work, total // 4, args.ring_mib, "random"))
            ceils.append(write_ceiling(work, total // 4))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tcp, tcp_cpu = statistics.median(tcps), statistics.median(tcp_cpus)
    seq = sorted(seqs, key=lambda r: r["mb_s"])[len(seqs) // 2]
    rnd = sorted(rnds, key=lambda r: r["mb_s"])[len(rnds) // 2]
    ceil = statistics.median(ceils)
    bare_seq, bare_rnd = statistics.median(bare_seqs), statistics.median(bare_rnds)
    result: dict[str, object] = {
        "bench": "stream",
        "record_bytes": RECORD,
        "total_mib": args.total_mib,
        "files_on": str(base),
        "loopback_tcp_mb_s": round(tcp, 1),
        "bdr_sequential_mb_s": round(seq["mb_s"], 1),
        "ratio_sequential": round(seq["mb_s"] / tcp, 3),
        "bdr_random_4k_mb_s": round(rnd["mb_s"], 1),
        "ratio_random_4k": round(rnd["mb_s"] / tcp, 3),
        "random_4k_pwrite_ceiling_mb_s": round(ceil, 1),
        "ratio_random_4k_to_ceiling": round(rnd["mb_s"] / ceil, 3),
        "bare_sequential_mb_s": round(bare_seq, 1),
        "ratio_bare_sequential_to_tcp": round(bare_seq / tcp, 3),
        "bare_random_4k_mb_s": round(bare_rnd, 1),
        "ratio_bare_random_4k_to_tcp": round(bare_rnd / tcp, 3),
        "cpus": os.cpu_count(),
        "tcp_cpu_s_per_gib": round(tcp_cpu, 3),
        "sequential_cpu_s_per_gib": round(seq["cpu_per_gib"], 3),
        "random_4k_cpu_s_per_gib": round(rnd["cpu_per_gib"], 3),
        "client_peak_rss_mb": round(max(r["client_rss_mb"] for r in seqs + rnds), 1),
        "server_peak_rss_mb": round(max(r["server_rss_mb"] for r in seqs + rnds), 1),
    }
    print(f"stream bench ({args.total_mib} MiB of 4 KiB records, ring {args.ring_mib} MiB, files on {base}):")
    print(f"  loopback TCP baseline      {tcp:8.1f} MB/s   (median of {', '.join(f'{t:.0f}' for t in tcps)})")
    seq_runs = ", ".join(f"{r['mb_s']:.0f}" for r in seqs)
    rnd_runs = ", ".join(f"{r['mb_s']:.0f}" for r in rnds)
    print(f"  bdr runs (median used): sequential {seq_runs} MB/s, random {rnd_runs} MB/s")
    print(
        f"  bdr sequential 4 KiB       {seq['mb_s']:8.1f} MB/s   ratio {seq['mb_s'] / tcp:.2f}   (target >= 0.7)"
    )
    print(f"  bdr random 4 KiB           {rnd['mb_s']:8.1f} MB/s   ratio {rnd['mb_s'] / tcp:.2f}")
    print(
        f"  random 4 KiB pwrite alone  {ceil:8.1f} MB/s   (one thread into the replica file, no network:"
        f" bdr random is {rnd['mb_s'] / ceil:.2f} of it)"
    )
    print(
        f"  bare receivers (bdr's data path alone: no protocol, ring or producer): splice {bare_seq:.0f} MB/s ="
        f" {bare_seq / tcp:.2f} of TCP (bdr sequential {seq['mb_s'] / bare_seq:.2f} of it), recv + pwrite per"
        f" record {bare_rnd:.0f} MB/s = {bare_rnd / tcp:.2f} of TCP (bdr random {rnd['mb_s'] / bare_rnd:.2f} of it)"
    )
    print_cpu(tcp, tcp_cpu, seq, rnd, ceil)
    print(
        f"  peak RSS client / server   {result['client_peak_rss_mb']} / {result['server_peak_rss_mb']} MB (target < 150)"
    )
    print(
        f"  daemons' own --benchmark lines (sequential run):\n    {seq['client_line']}\n    {seq['server_line']}"
    )
    print("BENCH " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
