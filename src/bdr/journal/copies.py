"""A metadata block kept as two checksummed copies: the journal header and the record area's state block.

Each write goes to the copy the block's new generation selects (even -> the first, odd -> the second), followed by
fdatasync, so a torn write can only damage the copy being written; at load, the valid copy with the highest
generation wins.  A copy is ``BLOCK`` bytes: the fixed fields, zeros, and an xxh3-64 of everything before it in
the last 8 bytes (little-endian)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import xxhash

BLOCK = 4096
_CSUM_AT = BLOCK - 8


def seal(fixed: bytes) -> bytes:
    """One copy: ``fixed``, zeros up to the checksum, and the checksum."""
    body = fixed + bytes(_CSUM_AT - len(fixed))
    return body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")


def intact(block: bytes, magic: bytes) -> bool:
    """``block`` is a whole copy that starts with ``magic`` and whose checksum matches."""
    return (
        len(block) >= BLOCK
        and block[: len(magic)] == magic
        and xxhash.xxh3_64_intdigest(block[:_CSUM_AT]) == int.from_bytes(block[_CSUM_AT:BLOCK], "little")
    )


class Generational(Protocol):
    @property
    def generation(self) -> int: ...


T = TypeVar("T", bound=Generational)


class BothCopiesCorrupt(Exception):
    """Both copies carry the magic and neither is intact: refusing to guess (the caller says what to do)."""


class TwoCopies(Generic[T]):
    """The two copies of one block at ``at`` and ``at + BLOCK`` on ``fd``."""

    def __init__(self, fd: int, at: int, magic: bytes, parse: Callable[[bytes], T | None]) -> None:
        self.fd = fd
        self.at = at
        self.magic = magic
        self.parse = parse

    def load(self) -> T | None:
        """The newest valid copy, or None if neither was ever written.  Raises BothCopiesCorrupt."""
        a = os.pread(self.fd, BLOCK, self.at)
        b = os.pread(self.fd, BLOCK, self.at + BLOCK)
        valid = [v for v in (self.parse(a), self.parse(b)) if v is not None]
        if valid:
            return max(valid, key=lambda v: v.generation)
        if a.startswith(self.magic) or b.startswith(self.magic):
            raise BothCopiesCorrupt()
        return None

    def store(self, value: T, data: bytes) -> None:
        """Write ``data`` (``value`` packed) to the copy its generation selects, and make it durable.
        Raises OSError."""
        n = os.pwrite(self.fd, data, self.at + (value.generation % 2) * BLOCK)
        if n != len(data):
            raise OSError(errno.EIO, f"short write ({n} of {len(data)} bytes)")
        os.fdatasync(self.fd)
