"""The two checksummed copies shared by the journal header and the record area's state block."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from bdr.journal.copies import BLOCK, BothCopiesCorrupt, TwoCopies, intact, seal

MAGIC = b"TESTBLK\x00"


@dataclass(frozen=True)
class Block:
    generation: int

    def pack(self) -> bytes:
        return seal(MAGIC + self.generation.to_bytes(8, "little"))

    @classmethod
    def parse(cls, data: bytes) -> Block | None:
        return cls(int.from_bytes(data[8:16], "little")) if intact(data, MAGIC) else None


@pytest.fixture
def copies(tmp_path: Path) -> TwoCopies[Block]:
    fd = os.open(tmp_path / "meta", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 16 * BLOCK)
    return TwoCopies(fd, 4 * BLOCK, MAGIC, Block.parse)


def store(c: TwoCopies[Block], gen: int) -> None:
    b = Block(gen)
    c.store(b, b.pack())


def test_never_written_is_none(copies: TwoCopies[Block]) -> None:
    assert copies.load() is None


def test_generation_selects_the_copy_and_the_newest_wins(copies: TwoCopies[Block]) -> None:
    store(copies, 1)
    assert os.pread(copies.fd, BLOCK, 5 * BLOCK).startswith(MAGIC)  # odd: the second copy
    assert not os.pread(copies.fd, BLOCK, 4 * BLOCK).strip(b"\0")
    store(copies, 2)
    store(copies, 3)
    assert copies.load() == Block(3)


def test_a_torn_copy_falls_back_to_the_other(copies: TwoCopies[Block]) -> None:
    store(copies, 6)
    store(copies, 7)
    os.pwrite(copies.fd, b"\xff" * 100, 5 * BLOCK + 200)  # generation 7's copy torn
    assert copies.load() == Block(6)


def test_both_copies_corrupt_is_refused(copies: TwoCopies[Block]) -> None:
    store(copies, 1)
    store(copies, 2)
    os.pwrite(copies.fd, b"\xff", 4 * BLOCK + 4000)
    os.pwrite(copies.fd, b"\xff", 5 * BLOCK + 4000)
    with pytest.raises(BothCopiesCorrupt):
        copies.load()
