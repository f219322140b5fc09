"""The server's journal (the ``--journal`` path): the metadata header in two checksummed copies (``header``: which
source the replica mirrors, how far it is durable, whether it is consistent), and the record area where a resync
is staged, committed and applied (``format`` on disk, ``area`` at work), with its crash points for the tests
(``faults``).  The errors of the journal and of the server's storage are ``errors``'."""

from .area import RecordArea as RecordArea
from .area import ReplicaTarget as ReplicaTarget
from .area import StagingTarget as StagingTarget
from .errors import JournalCorrupt as JournalCorrupt
from .errors import JournalError as JournalError
from .errors import JournalFull as JournalFull
from .errors import JournalIOError as JournalIOError
from .errors import ReplicaIOError as ReplicaIOError
from .errors import StorageError as StorageError
from .faults import FaultPlan as FaultPlan
from .header import Header as Header
from .header import JFlag as JFlag
from .header import Journal as Journal
