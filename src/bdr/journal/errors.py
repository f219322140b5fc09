"""The journal's errors, and the server's storage errors: an I/O error carries the device and its role (replica
or journal), so that each is reported as what it is."""

from __future__ import annotations

import errno


class JournalError(Exception):
    """The journal path cannot be used: missing directory, too small, corrupt, or from a newer version."""


class StorageError(OSError):
    """An I/O error of one of the server's devices.  ``role`` says which one (replica, journal), ``device`` its
    path; ``strerror`` is the whole message for the log."""

    role = "storage"

    def __init__(self, err: int | None, message: str, device: str = "") -> None:
        super().__init__(err or errno.EIO, message)
        self.device = device


class JournalIOError(StorageError):
    """Writing, reading or syncing the journal failed (device error, file system full)."""

    role = "journal"


class ReplicaIOError(StorageError):
    """Writing, reading or syncing the replica failed."""

    role = "replica"


class JournalFull(JournalError):
    """The record area cannot hold this resync, even with each staged byte kept once."""

    def __init__(self, message: str, needed: int = 0, capacity: int = 0) -> None:
        super().__init__(message)
        self.needed = needed  # bytes of records the resync needs at least (its live records)
        self.capacity = capacity  # bytes the record area holds


class JournalCorrupt(JournalError):
    """A committed journal fails its checksums: refused, nothing applied."""
