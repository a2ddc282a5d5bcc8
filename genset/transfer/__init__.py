"""KV-cache transfer between workers (disaggregated prefill): NATS chunks or direct TCP,
credit-windowed, checksummed, every wait under a deadline; and the sender's pin table.

Protocol: proto/transfer.py. Endpoint and sessions: hub.py. Pure parts: assembly.py
(chunking, reassembly, checks), pins.py (PinTable).
"""

from genset.transfer.assembly import BlockRun
from genset.transfer.errors import TransferError
from genset.transfer.hub import BlockSource, KvReceiver, KvTransferHub, OnBlocks, TransferResult
from genset.transfer.pins import PinEntry, PinTable, PinTableFull

__all__ = [
    "BlockRun",
    "BlockSource",
    "KvReceiver",
    "KvTransferHub",
    "OnBlocks",
    "PinEntry",
    "PinTable",
    "PinTableFull",
    "TransferError",
    "TransferResult",
]
