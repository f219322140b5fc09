"""One-shot mode: bdr_client without --control-device syncs an image file by scan and exits 0."""

from __future__ import annotations

import os
import random
import re

import pytest

from .conftest import DEV, Daemon, Lab

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def oneshot(lab: Lab, *extra: str) -> Daemon:
    argv = ["bdr.client", "--address", "127.0.0.1", "--port", str(lab.port)]
    argv += ["--source-device", str(lab.src), "--verbose", *extra]
    d = Daemon("client", argv, lab.tmp)
    lab.daemons.append(d)
    return d.start()


def test_oneshot_sync_of_an_image_file_ends_identical(lab: Lab) -> None:
    lab.images(src_random=True, seed=11)
    data = bytearray(lab.src.read_bytes())
    rnd = random.Random(12)
    blocks = sorted(rnd.sample(range(DEV // 65536), 20))
    for b in blocks:  # one changed 4 KiB page in each of 20 blocks of 64 KiB
        at = b * 65536 + rnd.randrange(16) * 4096
        data[at : at + 4096] = os.urandom(4096)
    lab.replica.write_bytes(bytes(data))
    srv = lab.server()
    srv.wait_log("listening on")
    cli = oneshot(lab)
    assert cli.wait(60) == 0, cli.log()
    assert lab.identical()
    m = re.search(
        r"scan 1 done .*: (\d+) blocks compared, (\d+) differed, \d+ sent with data \((\d+) bytes\)",
        cli.log(),
    )
    assert m, cli.log()
    assert int(m.group(2)) == len(blocks)
    assert int(m.group(3)) == len(blocks) * 4096  # the changed pages only (4 KiB scan blocks)
    assert "one-shot sync of" in cli.log()
    # again: nothing differs, nothing is sent
    cli2 = oneshot(lab)
    assert cli2.wait(60) == 0
    assert re.findall(r"scan 1 done .*: \d+ blocks compared, (\d+) differed", cli2.log())[-1] == "0"
    assert srv.stop() == 0


def test_oneshot_refuses_no_replication(lab: Lab) -> None:
    lab.images()
    cli = oneshot(lab, "--no-replication")
    assert cli.wait(20) == 2
    assert "--no-replication needs --control-device" in cli.log()
