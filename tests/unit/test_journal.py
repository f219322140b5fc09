"""Server metadata header: fresh, commit and reopen, torn writes, corruption, newer versions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bdr.journal import Header, JFlag, Journal, JournalError
from bdr.journal import header as jr
from bdr.seq import NO_SEQ


def test_fresh_file_is_created_with_defaults(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    assert j.created and j.header == Header()
    assert j.header.durable_seq == NO_SEQ
    j.close()


def test_commit_and_reopen(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.commit(flags=JFlag.SEQ_VALID | JFlag.CONSISTENT, source_id=b"s" * 16, ring_id=b"r" * 16, durable_seq=41)
    j.commit(durable_seq=42)
    j.close()
    k = Journal(tmp_path / "j")
    assert not k.created
    h = k.header
    assert (h.generation, h.durable_seq, h.source_id, h.ring_id) == (2, 42, b"s" * 16, b"r" * 16)
    assert h.flags == JFlag.SEQ_VALID | JFlag.CONSISTENT
    k.close()


def test_torn_write_of_the_newer_copy_falls_back_to_the_older(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.commit(durable_seq=10)  # generation 1 -> copy B
    j.commit(durable_seq=11)  # generation 2 -> copy A
    j.close()
    with open(tmp_path / "j", "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 10)  # copy A torn
    k = Journal(tmp_path / "j")
    assert (k.header.generation, k.header.durable_seq) == (1, 10)
    k.commit(durable_seq=12)  # generation 2 goes to copy A again
    k.close()
    assert Journal(tmp_path / "j").header.durable_seq == 12


def test_both_copies_corrupt_is_refused(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.commit(durable_seq=1)
    j.commit(durable_seq=2)
    j.close()
    with open(tmp_path / "j", "r+b") as f:
        for off in (200, jr.HEADER_BLOCK + 200):
            f.seek(off)
            f.write(b"\x01")
    with pytest.raises(JournalError, match="corrupt"):
        Journal(tmp_path / "j")


def test_newer_version_is_refused(tmp_path: Path) -> None:
    block = bytearray(Header(generation=1).pack())
    block[8:12] = (jr.VERSION + 1).to_bytes(4, "little")
    import xxhash

    block[-8:] = xxhash.xxh3_64_intdigest(bytes(block[:-8])).to_bytes(8, "little")
    (tmp_path / "j").write_bytes(bytes(block) + bytes(jr.HEADER_BLOCK))
    with pytest.raises(JournalError, match="newer"):
        Journal(tmp_path / "j")


def test_unwritten_device_area_is_fresh(tmp_path: Path) -> None:
    (tmp_path / "j").write_bytes(os.urandom(3 * jr.HEADER_BLOCK))  # garbage without a magic: never used
    assert Journal(tmp_path / "j").header == Header()


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="cannot create"):
        Journal(tmp_path / "missing-dir" / "j")
    with pytest.raises(JournalError, match="neither"):
        Journal("/dev/null")
