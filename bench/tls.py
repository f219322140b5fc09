"""TLS streaming throughput: bench/stream.py's sequential run (4 KiB ring records -> bdr_client -> loopback TCP
-> bdr_server -> replica file, until every record is acknowledged durable) with mutual TLS and the shared
secret on, next to the same run in plaintext, alternated in one process so both see the same machine.
It also measures the TLS ceiling of Python's ssl module here: one TLS connection over loopback moving the same
amount of data in 8 MiB writes, nothing else (the cipher suite is OpenSSL's default for TLS 1.3).

Usage: python bench/tls.py [--total-mib N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import stream
from bdr.security import certs

TARGET_RATIO = 0.7


def tls_ceiling(pki: Path, total: int) -> tuple[float, str]:
    """MB/s of a bare TLS 1.3 stream over loopback (a sender and a receiver thread; ssl releases the GIL)."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(pki / "ca.pem")
    chunk = memoryview(os.urandom(8 << 20))
    with socket.create_server(("127.0.0.1", 0)) as lst:

        def receive() -> None:
            conn, _ = lst.accept()
            with sctx.wrap_socket(conn, server_side=True) as s:
                buf, got = memoryview(bytearray(1 << 20)), 0
                while got < total:
                    got += s.recv_into(buf)

        t = threading.Thread(target=receive)
        t.start()
        raw = socket.create_connection(lst.getsockname()[:2])
        with cctx.wrap_socket(raw, server_hostname="127.0.0.1") as c:
            t0 = time.perf_counter()
            for _ in range(total // len(chunk)):
                c.sendall(chunk)
            t.join()
            took = time.perf_counter() - t0
            cipher = c.cipher()
    return total / took / 1e6, cipher[0] if cipher else "?"


def main(argv: list[str] | None = None) -> int:
    run(argv or [])
    return 0


def run(argv: list[str]) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-mib", type=int, default=1024, help="data streamed per run (default 1024 MiB)")
    ap.add_argument("--ring-mib", type=int, default=32, help="ring size (default 32 MiB)")
    ap.add_argument("--rounds", type=int, default=3, help="plaintext / TLS pairs; medians are reported")
    args = ap.parse_args(argv)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="bdr-bench-tls-", dir=base))
    total = args.total_mib << 20
    try:
        pki = certs.make(work / "pki", ("127.0.0.1",)).out
        secret = work / "secret"
        secret.write_bytes(b"benchmark-secret-0123456789abcdef\n")
        secret.chmod(0o600)
        server_tls = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
        server_tls += ("--tls-ca", str(pki / "ca.pem"), "--secret-file", str(secret))
        client_tls = ("--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"))
        client_tls += ("--tls-key", str(pki / "client.key"), "--secret-file", str(secret))
        plain, tls = [], []
        cpu: dict[str, list[float]] = {"plain": [], "tls": []}
        for _ in range(args.rounds):
            r = stream.bdr_run(work, total, args.ring_mib, "sequential")
            plain.append(r["mb_s"])
            cpu["plain"].append(r["client_cpu_s"] + r["server_cpu_s"])
            r = stream.bdr_run(work, total, args.ring_mib, "sequential", server_tls, client_tls)
            tls.append(r["mb_s"])
            cpu["tls"].append(r["client_cpu_s"] + r["server_cpu_s"])
            tls_line = r["client_line"]
        ceiling, cipher = tls_ceiling(pki, total)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p_mb, t_mb = statistics.median(plain), statistics.median(tls)
    ratio = t_mb / p_mb
    result: dict[str, object] = {
        "bench": "tls",
        "total_mib": args.total_mib,
        "openssl": ssl.OPENSSL_VERSION,
        "plaintext_mb_s": round(p_mb, 1),
        "tls_mb_s": round(t_mb, 1),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "bare_tls_mb_s": round(ceiling, 1),
        "cipher": cipher,
    }
    print(
        f"TLS stream bench ({args.total_mib} MiB of sequential 4 KiB records per run, {args.rounds} rounds, {ssl.OPENSSL_VERSION}):"
    )
    print(f"  bdr plaintext              {p_mb:8.1f} MB/s   (runs: {', '.join(f'{x:.0f}' for x in plain)})")
    print(f"  bdr mutual TLS 1.3 + secret {t_mb:7.1f} MB/s   (runs: {', '.join(f'{x:.0f}' for x in tls)})")
    print(f"  ratio TLS / plaintext      {ratio:8.2f}        (target >= {TARGET_RATIO})")
    print(
        f"  bare TLS stream, one connection {ceiling:6.1f} MB/s   ({cipher}; bdr TLS reaches {t_mb / ceiling:.2f} of it)"
    )
    print(
        f"  daemon CPU per run while streaming (client + server): plaintext {statistics.median(cpu['plain']):.2f}s, "
        f"TLS {statistics.median(cpu['tls']):.2f}s"
    )
    print(f"  client --benchmark line (last TLS run):\n    {tls_line}")
    print("BENCH " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
