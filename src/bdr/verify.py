"""The former place of the online verify bookkeeping, now ``bdr.scan.verify``: its names stay importable here."""

from .scan.verify import MAX_LOOKS as MAX_LOOKS
from .scan.verify import RECHECK_DELAY as RECHECK_DELAY
from .scan.verify import VerifyJob as VerifyJob
from .scan.verify import coalesce as coalesce
from .scan.verify import overlaps as overlaps
