"""The source's metadata (``bdr_client --metadata FILE``): its generation history, which the replica compares
with its own at every connect (``bdr.generations``).

One 4 KiB block: a magic, the encoded history, zeros, and a checksum (the journal header's sealing).  It is
replaced whole: written to a temporary file, synced, renamed over the old one, and the directory synced, so a
crash leaves the old history or the new one, never a torn one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..generations import Generations, GenerationsError
from ..journal.copies import BLOCK, intact, seal

log = logging.getLogger("bdr.client")

MAGIC = b"BDRSMETA"


class MetadataError(Exception):
    """The metadata file cannot be read or written."""


def read_metadata(path: Path) -> Generations | None:
    """The history in ``path``; None if the file does not exist."""
    try:
        block = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MetadataError(f"cannot read source metadata {path}: {exc.strerror}") from exc
    if not intact(block, MAGIC):
        raise MetadataError(
            f"source metadata {path} is damaged or not BDR source metadata (bad magic or checksum); refusing "
            "to guess the source's generation. Restore it, or move it away to start a new generation history"
        )
    try:
        gens = Generations.unpack(memoryview(block)[len(MAGIC) :])
    except GenerationsError as exc:
        raise MetadataError(f"source metadata {path}: {exc}") from None
    if gens is None:
        raise MetadataError(f"source metadata {path} holds no generation")
    return gens


def write_metadata(path: Path, gens: Generations) -> None:
    block = seal(MAGIC + gens.pack())
    assert len(block) == BLOCK
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise MetadataError(f"cannot write source metadata {path}: {exc.strerror}") from exc


def load_or_create(path: Path) -> Generations:
    """The source's history; a first generation when the file does not exist yet (a new source)."""
    gens = read_metadata(path)
    if gens is None:
        gens = Generations.first()
        write_metadata(path, gens)
        log.info("source metadata %s created: %s", path, gens.describe())
    else:
        log.info("source metadata %s: %s", path, gens.describe())
    return gens
