"""Replication across a lossy, slow and interrupted link: two network namespaces made by the test in the
guest, joined by a veth pair with netem (5 % loss, 50 ms delay each way), the daemons on mutual TLS (made
by `bdr certs` in the guest) and a shared secret, as on a real network.  Addresses are from the
documentation range, inside the guest only.

TCP over 5 % loss and a 100 ms round trip carries well under 100 KB/s, so the workloads are small (a few
MiB): enough to be mid-stream when the link drops, small enough to keep the suite fast."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.lab import Guest
from tests.vm.pair import BIN, Pair

VM_DISKS = {"src": "64M", "dst": "64M", "jnl": "32M"}
VM_MEMORY = "2048M"
SERVER_IP = "192.0.2.2"


@pytest.fixture(scope="module")
def pair(guest: Guest, bdr_ko: Path) -> Iterator[Pair]:
    guest.run(
        f"""set -e
        modprobe dm-mod && insmod {bdr_ko}
        modprobe veth && modprobe sch_netem
        ip netns add bsrc && ip netns add bdst
        ip link add vsrc type veth peer name vdst
        ip link set vsrc netns bsrc && ip link set vdst netns bdst
        ip -n bsrc addr add 192.0.2.1/24 dev vsrc && ip -n bdst addr add {SERVER_IP}/24 dev vdst
        for ns in bsrc bdst; do ip -n $ns link set lo up; done
        ip -n bsrc link set vsrc up && ip -n bdst link set vdst up
        tc -n bsrc qdisc add dev vsrc root netem loss 5% delay 50ms
        tc -n bdst qdisc add dev vdst root netem loss 5% delay 50ms
        {BIN}/bdr secret --force /tmp/secret
        {BIN}/bdr certs --force --out /tmp/pki --server-name {SERVER_IP}
        """
    )
    p = Pair(
        guest,
        guest.disk("src"),
        guest.disk("dst"),
        guest.disk("jnl"),
        address=SERVER_IP,
        server_ns="bdst",
        client_ns="bsrc",
        server_args="--secret-file /tmp/secret --tls-cert /tmp/pki/server.pem --tls-key /tmp/pki/server.key"
        " --tls-ca /tmp/pki/ca.pem",
        client_args="--secret-file /tmp/secret --tls-ca /tmp/pki/ca.pem --tls-cert /tmp/pki/client.pem"
        " --tls-key /tmp/pki/client.key",
    )
    p.setup()
    p.start_server()
    p.start_client()
    yield p
    p.remove()
    guest.run("ip netns del bsrc; ip netns del bdst; rmmod bdr", check=False)


def test_lossy_slow_link_ends_identical(pair: Pair) -> None:
    pair.g.run(
        f"""set -e
        dd if=/dev/urandom of={pair.mapper} bs=64K count=24 seek=100 oflag=direct status=none
        dd if=/dev/urandom of={pair.mapper} bs=4K count=100 seek=12000 status=none
        sync
        """,
        timeout=300,
    )
    pair.wait_synced(timeout=400)
    assert pair.identical(), "replica differs after replication over the lossy link"
    log = pair.g.run(f"cat {pair.server_log}").output
    assert "security: TLS, client certificates checked" in log and "+ shared secret" in log
    assert re.search(r"client 192\.0\.2\.1:\d+: TLS TLSv1\.3, client certificate 'bdr-client'", log), log


def test_link_cut_for_ten_seconds_mid_replication(pair: Pair) -> None:
    g = pair.g
    g.run(
        f"(dd if=/dev/urandom of={pair.mapper} bs=64K count=40 seek=700 oflag=direct status=none; sync;"
        " touch /tmp/cut.done) > /dev/null 2>&1 &"
    )
    g.run("sleep 1; ip -n bsrc link set vsrc down; sleep 10; ip -n bsrc link set vsrc up")
    g.run("for i in $(seq 900); do test -e /tmp/cut.done && exit 0; sleep 0.2; done; exit 1", timeout=240)
    pair.wait_synced(timeout=400)
    assert pair.identical(), "replica differs after the link was cut for 10 s"
