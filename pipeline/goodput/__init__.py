"""Where a run's hours went: the goodput ledger (``RUN_DIR/goodput/ledger.jsonl``), its account, the tool.

``ledger`` (the append-only file), ``recorder`` (one attempt's records, fed by ``pipeline.phases``),
``account`` (records to kept time and badput by cause), ``interval`` (Young/Daly's checkpoint interval).
"""

from pipeline.goodput.account import BADPUT, CATEGORIES, AttemptAccount, RunAccount, account
from pipeline.goodput.ledger import Ledger, read_records
from pipeline.goodput.recorder import Recorder, end_reason

__all__ = [
    "BADPUT",
    "CATEGORIES",
    "AttemptAccount",
    "Ledger",
    "Recorder",
    "RunAccount",
    "account",
    "end_reason",
    "read_records",
]
