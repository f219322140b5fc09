"""A replicated pair inside one lab guest: a bdr target over a source disk, bdr_server on a replica disk and
bdr_client, both on the guest's loopback.  Used by the VM replication tests and by `make demo`."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from tests.vm.lab import Guest

REPO = Path(__file__).resolve().parents[2]
BIN = f"{REPO}/.venv/bin"
PROXY = f"{BIN}/python {REPO}/tests/vm/tcpproxy.py"


class Pair:
    def __init__(
        self,
        g: Guest,
        src: str,
        dst: str,
        journal: str,
        *,
        name: str = "rep",
        chardev: str = "bdr_rep",
        buffer: str = "64M",
        port: int = 8000,
        proxy_port: int | None = None,
        address: str = "127.0.0.1",
        server_ns: str | None = None,
        client_ns: str | None = None,
        server_args: str = "",
        client_args: str = "",
    ) -> None:
        self.g, self.src, self.dst, self.journal = g, src, dst, journal
        self.name, self.chardev, self.buffer = name, chardev, buffer
        self.port, self.proxy_port, self.address = port, proxy_port, address
        # commands run inside a network namespace the test created (ip netns add), or in the guest's own
        self.server_exec = f"ip netns exec {server_ns} " if server_ns else ""
        self.client_exec = f"ip netns exec {client_ns} " if client_ns else ""
        self.server_args, self.client_args = server_args, client_args
        self.mapper = f"/dev/mapper/{name}"
        self._client = f"'bin/bdr_client .*{chardev}'"  # pkill's pattern for this pair's client
        self.client_log = f"/tmp/{name}-client.log"
        self.server_log = f"/tmp/{name}-server.log"

    # -- setup

    def setup(self) -> str:
        return self.g.run(
            f"{BIN}/bdr setup --device {self.src} --name {self.name} --chardev {self.chardev} --buffer {self.buffer}"
        ).output

    def start_server(self, *extra: str) -> None:
        args = " ".join(shlex.quote(a) for a in extra)
        self.g.run(
            f"{self.server_exec}nohup {BIN}/bdr_server --address {self.address} --port {self.port}"
            f" --target-device {self.dst} --journal {self.journal} --verbose {self.server_args} {args}"
            f" >> {self.server_log} 2>&1 &"
        )
        self.g.run(
            f"for i in $(seq 300); do grep -q 'listening' {self.server_log} && exit 0; sleep 0.1; done;"
            f" cat {self.server_log}; exit 1"
        )

    def start_proxy(self) -> None:
        assert self.proxy_port is not None
        self.g.run(
            f"nohup {PROXY} 127.0.0.1:{self.proxy_port} 127.0.0.1:{self.port} >> /tmp/proxy.log 2>&1 &"
        )
        self.g.run(
            "for i in $(seq 100); do grep -q 'proxy ready' /tmp/proxy.log && exit 0; sleep 0.1; done; exit 1"
        )

    def stop_proxy(self) -> None:
        self.g.run("pkill -KILL -f tests/vm/tcpproxy.py; rm -f /tmp/proxy.log", check=False)

    def start_client(self, *extra: str, wait_scan: bool = True) -> None:
        port = self.proxy_port or self.port
        args = " ".join(shlex.quote(a) for a in extra)
        self.g.run(
            f"{self.client_exec}nohup {BIN}/bdr_client --control-device /dev/{self.chardev}"
            f" --source-device {self.mapper} --address {self.address} --port {port} --verbose"
            f" {self.client_args} {args} >> {self.client_log} 2>&1 &"
        )
        if wait_scan:
            self.wait_log(self.client_log, r"scan .* done|quick resume|streaming", 180)

    def wait_log(self, log: str, pattern: str, timeout: float = 60) -> None:
        tries = int(timeout / 0.2)
        self.g.run(
            f"for i in $(seq {tries}); do grep -Eq {shlex.quote(pattern)} {log} && exit 0; sleep 0.2; done;"
            f" echo 'no line matching {pattern} in {log}:'; tail -30 {log}; exit 1",
            timeout=timeout + 30,
        )

    # -- state

    def status(self) -> dict[str, str]:
        fields = self.g.run(f"dmsetup status {self.name}").output.split()[3:]
        return dict(kv.split("=", 1) for kv in fields)

    def client_in_sync(self) -> bool:
        """The client's own word (bdr status): connected, no scan running, everything captured durable."""
        out = self.g.run(f"{BIN}/bdr status --json", check=False).output
        try:
            targets = json.loads(out)["targets"]
        except (ValueError, KeyError):
            return False
        client = next((t["client"] for t in targets if t["name"] == self.name), None) or {}
        return bool(client.get("in_sync")) and not client.get("resync", {}).get("active", True)

    def wait_synced(self, timeout: float = 300) -> dict[str, str]:
        """Until the ring is empty and stays so: every captured write is acknowledged durable by the server
        (the client releases a slot only then), no resync is pending or running (a scan of a quiet device
        leaves the ring empty too: the client must say it is in sync)."""
        deadline = time.monotonic() + timeout
        stable, last = 0, ""
        st: dict[str, str] = {}
        while time.monotonic() < deadline:
            st = self.status()
            if st["fill"].split("/")[0] == "0" and st["state"] == "capturing" and st["records"] == last:
                stable += 1
                # the client is asked once the ring has stayed empty (each `bdr status` starts an interpreter)
                if stable >= 3 and self.client_in_sync():
                    return st
            else:
                stable = 0
            last = st["records"]
            time.sleep(1)
        raise AssertionError(
            f"replication did not catch up within {timeout:.0f}s: {st}\n"
            f"--- client log ---\n{self.tail(self.client_log)}\n--- server log ---\n{self.tail(self.server_log)}"
        )

    def tail(self, log: str, lines: int = 40) -> str:
        return self.g.run(f"tail -n {lines} {log}", check=False).output

    def same_on_disk(self) -> bool:
        """Source and replica disks hold the same bytes, read past the page cache (O_DIRECT)."""
        out = self.g.run(
            f"n=$(blockdev --getsize64 {self.src}); for d in {self.src} {self.dst};"
            " do dd if=$d iflag=direct,count_bytes bs=1M count=$n status=none | sha256sum; done"
        ).output.split()
        return out[0] == out[2]

    def identical(self) -> bool:
        res = self.g.run(f"cmp -n $(blockdev --getsize64 {self.src}) {self.mapper} {self.dst}", check=False)
        return res.rc == 0

    # -- teardown

    def stop(self, signal: str = "TERM") -> None:
        self.g.run(
            f"pkill -{signal} -f {self._client}; pkill -{signal} -f 'bin/bdr_server .*{self.port}';"
            " for i in $(seq 100); do pgrep -f 'bin/bdr_(client|server)' >/dev/null || exit 0; sleep 0.1; done; exit 1",
            check=False,
        )

    def stop_server(self, signal: str = "TERM") -> None:
        self.g.run(f"pkill -{signal} -f 'bin/bdr_server .*{self.port}'")
        self.wait_server_exit(10)

    def signal_client(self, signal: str) -> None:
        """Send the client a signal (STOP holds it, CONT lets it go on); an error if it is not running."""
        self.g.run(f"pkill -{signal} -f {self._client}")

    def stop_client(self, signal: str = "TERM") -> None:
        self.g.run(f"pkill -{signal} -f {self._client}; while pgrep -f bin/bdr_client; do sleep 0.2; done")

    def wait_server_exit(self, seconds: float = 60) -> None:
        """Until bdr_server has exited (by itself, or after a signal); its log tail if it does not."""
        self.g.run(
            f"for i in $(seq {int(seconds * 10)}); do pgrep -f bin/bdr_server >/dev/null || exit 0; sleep 0.1; done;"
            f" tail -20 {self.server_log}; exit 1",
            timeout=seconds + 60,
        )

    def remove(self) -> None:
        self.stop()
        self.stop_proxy()
        self.g.run(f"{BIN}/bdr remove {self.name}", check=False)
