"""Why a KV transfer failed, in a form both ends (and the request's client) can act on."""

from __future__ import annotations

from proto import ErrorInfo

# Codes (ErrorInfo.code) a transfer fails with. `retryable`: the request can still complete
# elsewhere (recompute locally, another prefill worker) - every transfer failure is, except a
# refusal for a reason that would recur (layout or hash mismatch, bad message).
CHECKSUM = "kv_checksum"  # a chunk's bytes do not match its checksum (torn transfer)
TRUNCATED = "kv_truncated"  # the stream ended before total_bytes, or a gap in offsets
BAD_MESSAGE = "kv_bad_message"  # undecodable or inconsistent message
LAYOUT_MISMATCH = "kv_layout_mismatch"  # the receiver cannot import this payload layout
HASH_MISMATCH = "kv_hash_mismatch"  # the blocks are not the ones the receiver expects
WINDOW_OVERRUN = "kv_window_overrun"  # the sender sent more than its window
PEER_GONE = "kv_peer_gone"  # the other side went silent, closed its connection or left
DEADLINE = "kv_deadline"  # the transfer's deadline passed
CANCELLED = "kv_cancelled"  # one side gave up (client cancel, shutdown)
IMPORT_FAILED = "kv_import_failed"  # the receiver's importer raised
SOURCE_FAILED = "kv_source_failed"  # the sender could not read its blocks
BUSY = "kv_busy"  # too many transfers in progress on the receiver
REFUSED = "kv_refused"  # the receiver said no (its ErrorInfo says why)

# Every code this side raises (a bounded label set for metrics; a peer may send others).
CODES = (CHECKSUM, TRUNCATED, BAD_MESSAGE, LAYOUT_MISMATCH, HASH_MISMATCH, WINDOW_OVERRUN,
         PEER_GONE, DEADLINE, CANCELLED, IMPORT_FAILED, SOURCE_FAILED, BUSY, REFUSED)

_PERMANENT = {BAD_MESSAGE, LAYOUT_MISMATCH, HASH_MISMATCH}


class TransferError(Exception):
    """A KV transfer failed; `code` is one of the constants above (or the remote side's)."""

    def __init__(self, code: str, message: str, *, retryable: bool | None = None) -> None:
        self.code = code
        self.message = message
        self.retryable = code not in _PERMANENT if retryable is None else retryable
        super().__init__(f"{code}: {message}")

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message, retryable=self.retryable)

    @classmethod
    def from_info(cls, info: ErrorInfo, prefix: str = "") -> TransferError:
        return cls(info.code, prefix + info.message, retryable=info.retryable)
