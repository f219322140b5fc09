"""A TCP relay for the VM tests: killing it cuts the connection between client and server mid-stream.

tcpproxy.py LISTEN_HOST:PORT TARGET_HOST:PORT
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def main() -> None:
    lhost, lport = sys.argv[1].rsplit(":", 1)
    thost, tport = sys.argv[2].rsplit(":", 1)
    srv = socket.create_server((lhost, int(lport)), reuse_port=True)
    print("proxy ready", flush=True)
    while True:
        conn, _ = srv.accept()
        try:
            up = socket.create_connection((thost, int(tport)))
        except OSError:
            conn.close()
            continue
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    main()
