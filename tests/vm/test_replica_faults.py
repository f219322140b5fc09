"""Storage faults under the server (dm-flakey): a replica device that starts failing writes stops the server
with a clear error and marks the replica inconsistent in its metadata, it does not silently diverge; a journal
device that starts failing writes stops the server too, and once repaired a restart converges; with a
history, a replica whose reads fail stops the server on the replica's error although the history's reader
process reads through a mapping (where a failed read is a SIGBUS)."""

from __future__ import annotations

from pathlib import Path

from tests.vm.lab import Guest
from tests.vm.pair import BIN, Pair

VM_DISKS = {"src": "64M", "dst": "64M", "jnl": "16M"}
UP = "3600 0"  # dm-flakey's up and down intervals: working
FAILING_WRITES = "0 3600 1 error_writes"
FAILING = "0 3600"  # every I/O fails


def flakey(g: Guest, name: str, dev: str, setup: str = "") -> str:
    """Create the dm-flakey device ``name`` over ``dev``, working (after the shell commands ``setup``); returns
    its table without the intervals."""
    table = f"0 $(blockdev --getsz {dev}) flakey {dev} 0"
    g.run(
        f"""set -e
        modprobe dm-mod && modprobe dm-flakey
        {setup}
        echo "{table} {UP}" | dmsetup create {name}
        """
    )
    return table


def set_flakey(g: Guest, name: str, table: str, intervals: str) -> None:
    g.run(
        f'dmsetup suspend {name} && echo "{table} {intervals}" | dmsetup load {name} && dmsetup resume {name}'
    )


def test_failing_replica_stops_the_server_and_marks_it_inconsistent(guest: Guest, bdr_ko: Path) -> None:
    g = guest
    table = flakey(g, "replica", g.disk("dst"), f"insmod {bdr_ko}")
    p = Pair(g, g.disk("src"), "/dev/mapper/replica", g.disk("jnl"))
    p.setup()
    p.start_server()
    p.start_client()
    g.run(f"dd if=/dev/urandom of={p.mapper} bs=64K count=16 oflag=direct status=none && sync")
    p.wait_synced()
    assert p.identical()
    flags = f"{BIN}/python -c 'from bdr.journal import Journal; print(int(Journal(\"{p.journal}\").header.flags))'"
    assert int(g.run(flags).output) & 2, "consistent before the fault"
    set_flakey(g, "replica", table, FAILING_WRITES)
    g.run(f"dd if=/dev/urandom of={p.mapper} bs=64K count=16 seek=100 oflag=direct status=none && sync")
    # the server must stop by itself with a clear message
    p.wait_server_exit()
    log = p.tail(p.server_log, 60)
    assert "Input/output error" in log or "I/O error" in log, log
    assert "replica" in log.lower(), log
    header = int(g.run(flags).output)
    assert not header & 2, f"the replica must be marked inconsistent after a failed write (flags {header:#x})"
    p.stop()
    p.remove()
    g.run("dmsetup remove replica; rmmod bdr", check=False)


def test_failing_journal_stops_the_server_and_a_restart_converges(guest: Guest, bdr_ko: Path) -> None:
    g = guest
    jnl = g.disk("jnl")
    table = flakey(g, "journal", jnl, f"insmod {bdr_ko} && blkdiscard -z {jnl}")
    p = Pair(g, g.disk("src"), g.disk("dst"), "/dev/mapper/journal", name="rep2", chardev="bdr_rep2")
    p.setup()
    p.start_server()
    p.start_client()
    g.run(f"dd if=/dev/urandom of={p.mapper} bs=64K count=16 oflag=direct status=none && sync")
    p.wait_synced()
    # the journal device starts failing writes: the next durability point cannot be recorded
    set_flakey(g, "journal", table, FAILING_WRITES)
    g.run(f"dd if=/dev/urandom of={p.mapper} bs=64K count=16 seek=200 oflag=direct status=none && sync")
    p.wait_server_exit()
    log = p.tail(p.server_log, 60)
    assert "stopped on a storage error" in log and "journal" in log.lower(), log
    # the client keeps its ring and waits for the server; the device is repaired and the server restarted
    set_flakey(g, "journal", table, UP)
    g.run(f": > {p.server_log}; : > {p.client_log}")  # wait for lines of the restarted server only
    p.start_server()
    p.wait_log(p.client_log, "in sync at ring position", 180)
    p.wait_synced()
    assert p.identical()
    p.remove()
    g.run("dmsetup remove journal; rmmod bdr", check=False)


def test_replica_reads_failing_under_the_history_stop_the_server_with_the_replicas_error(
    guest: Guest, bdr_ko: Path
) -> None:
    """With --history, the server's reader process reads what large batches overwrite through a read-only
    mapping of the replica.  A replica whose reads fail (dm-flakey failing all I/O, its pages not cached) ends
    the reader by SIGBUS; the server then reads the batch's before-images itself, meets the replica's I/O error
    and stops on it, before writing anything."""
    g = guest
    # a new journal: the one before belongs to another replica
    table = flakey(g, "replica", g.disk("dst"), f"insmod {bdr_ko} && blkdiscard -z {g.disk('jnl')}")
    g.run("rm -rf /tmp/hist3 && mkdir -p /tmp/hist3")
    p = Pair(
        g,
        g.disk("src"),
        "/dev/mapper/replica",
        g.disk("jnl"),
        name="rep3",
        chardev="bdr_rep3",
        server_args="--history /tmp/hist3 --history-size 16M",
    )
    p.setup()
    p.start_server()
    p.start_client()
    g.run(f"dd if=/dev/urandom of={p.mapper} bs=4M count=2 oflag=direct status=none")
    p.wait_synced()
    p.wait_log(p.server_log, "history: reader process started", 30)
    # the replica's pages leave the page cache, then every read of the device fails
    g.run("sync && echo 3 > /proc/sys/vm/drop_caches")
    set_flakey(g, "replica", table, FAILING)
    # the client is held while the next 8 MiB are written, so that they reach the server as one large batch:
    # the reader process keeps a batch of more than one piece, the server itself a smaller one
    p.signal_client("STOP")
    g.run(f"dd if=/dev/urandom of={p.mapper} bs=4M count=2 seek=4 oflag=direct status=none")
    p.signal_client("CONT")
    p.wait_server_exit()
    log = p.tail(p.server_log, 60)
    assert (
        "the reader process was ended by SIGBUS: a read of the replica through its mapping failed" in log
    ), log
    assert "replica: I/O error reading what byte" in log and "Input/output error" in log, log
    p.remove()
    g.run("dmsetup remove replica; rmmod bdr", check=False)
