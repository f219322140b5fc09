"""Point-in-time history of a replica: what each applied write overwrote, checkpoints at the source's
durability points, gaps where the replica was rewritten without it; restore and rollback to a checkpoint."""

from .format import HistoryFormatError, Meta
from .index import At, History, PointRefused, fmt_point, fmt_time, parse_at
from .writer import HistoryError, HistoryWriter

__all__ = [
    "At",
    "History",
    "HistoryError",
    "HistoryFormatError",
    "HistoryWriter",
    "Meta",
    "PointRefused",
    "fmt_point",
    "fmt_time",
    "parse_at",
]
