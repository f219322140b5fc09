"""The wire's numbers: protocol version, limits, message types, frame flags, error codes and features."""

from __future__ import annotations

import enum
import sys
from typing import Final

PROTOCOL_VERSION: Final = 1

HEADER_SIZE: Final = 8

MAX_BATCH_RECORDS: Final = 4096

MAX_RECORD_DATA: Final = 1 << 20  # one record's data (the kernel uses 4 KiB slots)

MAX_PAYLOAD: Final = 16 * 1024 * 1024 + 256 * 1024

MAX_ERROR_TEXT: Final = 1024  # bytes of UTF-8 in an ERROR message

MAX_SCAN_BLOCK: Final = 4 * 1024 * 1024

MIN_SCAN_BLOCK: Final = 4096

MAX_SCAN_RANGE: Final = 1 << 40  # one SCAN_REQUEST covers at most this many bytes

MAX_SCAN_HASHES: Final = 65536  # hashes in one SCAN_HASHES frame

# SCAN_REQUEST with this scan id while streaming: hash the replica as it is now (bdr verify), nothing is written
VERIFY_SCAN_ID: Final = 0

VERIFY_BLOCK_SIZE: Final = 64 * 1024  # the block of a verify request (the scans' default block)

SECTOR: Final = 512

NONCE_SIZE: Final = 32  # AUTH_BEGIN / AUTH_CHALLENGE nonces

MAC_SIZE: Final = 32  # HMAC-SHA256 in AUTH_PROOF / AUTH_OK

# Until the handshake is over no frame may be larger than this: the largest handshake frame is an ERROR with
# 1 KiB of text; everything else is under 100 bytes.
HANDSHAKE_MAX_PAYLOAD: Final = 4096

HASH_SIZE: Final = 16  # xxh3_128 digest

_LITTLE = sys.byteorder == "little"


class MsgType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    ERROR = 3
    STREAM = 4
    DATA = 5
    SYNC = 6
    ACK = 7
    SCAN_BEGIN = 8
    SCAN_REQUEST = 9
    SCAN_HASHES = 10
    SCAN_DATA = 11
    SCAN_END = 12
    SCAN_DONE = 13
    GOODBYE = 14
    RESYNC_PENDING = 15
    AUTH_BEGIN = 16
    AUTH_CHALLENGE = 17
    AUTH_PROOF = 18
    AUTH_OK = 19
    MARKS = 20


class FrameFlag(enum.IntFlag):
    """Header flags.  Only DATA may carry SYNC: make everything durable, then acknowledge."""

    SYNC = 1 << 0


class ErrorCode(enum.IntEnum):
    """Why a frame or a connection was refused.  Sent in ERROR messages and carried by ``ProtocolError``."""

    FRAME_TOO_LARGE = 1
    BAD_TYPE = 2
    BAD_LENGTH = 3
    BAD_FIELD = 4
    BAD_VERSION = 5
    UNEXPECTED = 6
    BAD_RECORD = 7
    OUT_OF_RANGE = 8
    SEQ_GAP = 9
    SIZE_MISMATCH = 10
    IDENTITY_MISMATCH = 11
    RESUME_IMPOSSIBLE = 12
    IO_ERROR = 13
    BUSY = 14
    SHUTDOWN = 15
    INTERNAL = 16
    TRUNCATED = 17
    CONNECTION_LOST = 18
    AUTH_REQUIRED = 19  # the server requires authentication the client did not offer
    AUTH_FAILED = 20  # wrong proof, or the two sides are configured differently
    WRONG_SOURCE = (
        21  # the replica mirrors another source: replacing it takes --full-scan / --full-replication
    )
    JOURNAL_FULL = (
        22  # the server's journal cannot stage this resync (the client falls back per --journal-full)
    )
    SPLIT_BRAIN = 23  # both sides were written after they last agreed: the operator names the side that loses
    SOURCE_BEHIND = (
        24  # the replica was promoted after this source's last write it holds: the source is behind
    )


class Feature(enum.IntFlag):
    SCAN_XXH3_128 = 1 << 0  # block hashes are xxh3_128 digests
    DISCARD = 1 << 1  # DISCARD / WRITE_ZEROES records are understood
    GENERATIONS = 1 << 2  # WELCOME may carry the replica's generation history
    WRITTEN = 1 << 3  # generation histories may carry the bytes written in each generation
    MARKS = 1 << 4  # WELCOME MARKED and MARKS are understood (a failback resync of a demoted source's marks)


ALL_FEATURES: Final = (
    Feature.SCAN_XXH3_128 | Feature.DISCARD | Feature.GENERATIONS | Feature.WRITTEN | Feature.MARKS
)
