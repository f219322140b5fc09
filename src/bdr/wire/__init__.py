"""BDR wire protocol: framing, messages, incremental decoder and connection state machine.

This package has no networking code at all: bytes go in, typed messages come out, and ``Connection.send(msg)``
returns the bytes to put on the wire.  The daemons (``bdr.client``, ``bdr.server``) are the only code that
touches sockets.

Every frame starts with an 8-byte header, all integers little-endian::

    0        4      5       6          8
    +--------+------+-------+----------+---------------------+
    | length | type | flags | reserved |  payload (length)   |
    |  u32   |  u8  |  u8   | u16 = 0  |                     |
    +--------+------+-------+----------+---------------------+

``length`` counts payload bytes only and is capped at ``MAX_PAYLOAD``; anything larger is refused before a
single payload byte is buffered.  Each message type has a fixed payload layout, drawn next to its class (``handshake``, ``stream``, ``scan``, ``messages``).

Conversation (client = source side, server = replica side)::

    client                                  server
    AUTH_BEGIN(nonce_c)  ----------------->                      only with a shared secret (--secret-file)
           <-------------------------------  AUTH_CHALLENGE(nonce_s) | ERROR
    AUTH_PROOF(client MAC) --------------->
           <-------------------------------  AUTH_OK(server MAC) | ERROR(AUTH_FAILED)
    HELLO  ------------------------------->
           <-------------------------------  WELCOME | ERROR
           <-------------------------------  MARKS                   after a WELCOME with MARKED only
    STREAM (resume at seq)  -------------->                      quick resume
    DATA, DATA(SYNC), SYNC  -------------->
           <-------------------------------  ACK(applied, durable)   (when its input is idle, its durable seq moved, or every few MiB)
    SCAN_BEGIN ---------------------------->                      resync (may follow STREAM/DATA)
    SCAN_REQUEST(range) ------------------>  hash mode only, windowed by the client
           <-------------------------------  SCAN_HASHES(range)
    SCAN_DATA(blocks)  ------------------->
    SCAN_END(resume seq) ----------------->
           <-------------------------------  SCAN_DONE
    DATA ... ------------------------------>   ring records captured during the scan win
    RESYNC_PENDING ----------------------->   ring lost writes: server marks the replica, then ACK,
                                               then the client takes the dirty bitmap and scans it
    SCAN_REQUEST(scan 0, range) ---------->   online verify while streaming (bdr verify): the replica's
           <-------------------------------  SCAN_HASHES(scan 0)   blocks after every DATA sent before it
    GOODBYE ------------------------------->   "we closed it", either side

Before the handshake is over (WELCOME sent) frames are capped at ``HANDSHAKE_MAX_PAYLOAD`` bytes, so an
unauthenticated peer cannot make the server buffer more than that.  A server that requires the shared secret
refuses HELLO before AUTH_OK (AUTH_REQUIRED); the MACs themselves are computed in ``bdr.security.auth``.

Sequence numbers are the ring's 64-bit record numbers.  ``NO_SEQ`` (2**64 - 1) means "none yet", so that
``next_seq(NO_SEQ) == 0`` is the first record the kernel ever publishes.
"""

from ..records import OP_DISCARD as OP_DISCARD
from ..records import OP_FLUSH as OP_FLUSH
from ..records import OP_WRITE as OP_WRITE
from ..records import OP_WRITE_ZEROES as OP_WRITE_ZEROES
from ..records import REC_FUA as REC_FUA
from ..records import REC_KNOWN_FLAGS as REC_KNOWN_FLAGS
from ..records import REC_UNZEROED as REC_UNZEROED
from ..records import RECORD as RECORD
from ..records import RECORD_SIZE as RECORD_SIZE
from ..records import RecordFields as RecordFields
from ..records import record_data_len as record_data_len
from ..records import record_fields as record_fields
from ..seq import NO_SEQ as NO_SEQ
from ..seq import SEQ_MASK as SEQ_MASK
from ..seq import next_seq as next_seq
from .connection import Connection as Connection
from .connection import Phase as Phase
from .connection import Role as Role
from .constants import ALL_FEATURES as ALL_FEATURES
from .constants import HANDSHAKE_MAX_PAYLOAD as HANDSHAKE_MAX_PAYLOAD
from .constants import HASH_SIZE as HASH_SIZE
from .constants import HEADER_SIZE as HEADER_SIZE
from .constants import MAC_SIZE as MAC_SIZE
from .constants import MAX_BATCH_RECORDS as MAX_BATCH_RECORDS
from .constants import MAX_ERROR_TEXT as MAX_ERROR_TEXT
from .constants import MAX_PAYLOAD as MAX_PAYLOAD
from .constants import MAX_RECORD_DATA as MAX_RECORD_DATA
from .constants import MAX_SCAN_BLOCK as MAX_SCAN_BLOCK
from .constants import MAX_SCAN_HASHES as MAX_SCAN_HASHES
from .constants import MAX_SCAN_RANGE as MAX_SCAN_RANGE
from .constants import MIN_SCAN_BLOCK as MIN_SCAN_BLOCK
from .constants import NONCE_SIZE as NONCE_SIZE
from .constants import PROTOCOL_VERSION as PROTOCOL_VERSION
from .constants import SECTOR as SECTOR
from .constants import VERIFY_BLOCK_SIZE as VERIFY_BLOCK_SIZE
from .constants import VERIFY_SCAN_ID as VERIFY_SCAN_ID
from .constants import ErrorCode as ErrorCode
from .constants import Feature as Feature
from .constants import FrameFlag as FrameFlag
from .constants import MsgType as MsgType
from .errors import LocalProtocolError as LocalProtocolError
from .errors import PeerError as PeerError
from .errors import ProtocolError as ProtocolError
from .errors import RemoteProtocolError as RemoteProtocolError
from .fields import frame_header as frame_header
from .frames import NEED_DATA as NEED_DATA
from .frames import Frame as Frame
from .frames import FrameDecoder as FrameDecoder
from .frames import FrameStart as FrameStart
from .frames import NeedData as NeedData
from .handshake import AuthBegin as AuthBegin
from .handshake import AuthChallenge as AuthChallenge
from .handshake import AuthFlag as AuthFlag
from .handshake import AuthMethod as AuthMethod
from .handshake import AuthOk as AuthOk
from .handshake import AuthProof as AuthProof
from .handshake import Error as Error
from .handshake import Hello as Hello
from .handshake import HelloFlag as HelloFlag
from .handshake import Marks as Marks
from .handshake import Welcome as Welcome
from .handshake import WelcomeFlag as WelcomeFlag
from .messages import Goodbye as Goodbye
from .messages import GoodbyeReason as GoodbyeReason
from .messages import Message as Message
from .messages import encode as encode
from .messages import parse_payload as parse_payload
from .scan import BLOCK as BLOCK
from .scan import SCAN_DATA_HEAD as SCAN_DATA_HEAD
from .scan import BlockFlag as BlockFlag
from .scan import ScanBegin as ScanBegin
from .scan import ScanData as ScanData
from .scan import ScanDone as ScanDone
from .scan import ScanEnd as ScanEnd
from .scan import ScanEndFlag as ScanEndFlag
from .scan import ScanFlag as ScanFlag
from .scan import ScanHashes as ScanHashes
from .scan import ScanMode as ScanMode
from .scan import ScanRequest as ScanRequest
from .scan import scan_data_header as scan_data_header
from .stream import DATA_HEAD as DATA_HEAD
from .stream import Ack as Ack
from .stream import Data as Data
from .stream import ResyncPending as ResyncPending
from .stream import Stream as Stream
from .stream import StreamFlag as StreamFlag
from .stream import Sync as Sync
from .stream import data_frame_header as data_frame_header
from .stream import data_head_size as data_head_size
from .stream import parse_data_head as parse_data_head
from .stream import validate_records as validate_records
