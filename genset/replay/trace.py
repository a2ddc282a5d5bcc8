"""Mooncake-format traces: one JSON object a line with `timestamp` (ms from start),
`input_length`, `output_length` (tokens) and `hash_ids` (ids of the prompt's 512-token blocks;
equal ids = equal content, and an id implies the same prefix before it).

Prompts are made of synthetic token ids derived from the hash ids (block id h -> tokens
h*512 .. h*512+511, so equal ids give equal tokens and different ids never collide), with the
last block cut so the prompt is exactly `input_length` tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

TRACE_BLOCK = 512  # tokens per Mooncake hash id


class TraceError(ValueError):
    """A trace line that cannot be used; the message names the file, line and field."""


@dataclass(slots=True)
class TraceRequest:
    index: int
    arrival_ms: float
    input_length: int
    output_length: int
    hash_ids: list[int]

    def token_array(self, block: int = TRACE_BLOCK) -> np.ndarray:
        ids = np.asarray(self.hash_ids, dtype=np.int64)
        toks = (ids[:, None] * block + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)
        # keep ids inside int32 (token ids travel as int32): wrap very large hash ids
        return (toks[: self.input_length] % 2_000_000_000).astype(np.int32)


def _field(obj: dict, name: str, where: str, *, minimum: int) -> int:
    if name not in obj:
        raise TraceError(f"{where}: missing field {name!r}")
    v = obj[name]
    # json reads Infinity and NaN (and 1e400 as inf): not a time or a token count
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise TraceError(f"{where}: field {name!r} must be a finite number, got {v!r}")
    if v < minimum:
        raise TraceError(f"{where}: field {name!r} must be >= {minimum}, got {v!r}")
    return v


def parse_line(line: str, where: str, index: int) -> TraceRequest:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    ts = _field(obj, "timestamp", where, minimum=0)
    n_in = int(_field(obj, "input_length", where, minimum=1))
    n_out = int(_field(obj, "output_length", where, minimum=1))
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or not ids:
        raise TraceError(f"{where}: field 'hash_ids' must be a non-empty list of block ids")
    for h in ids:
        # below 2^63: the prompt's tokens are made from them in int64 (a larger id was an
        # OverflowError out of numpy)
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < 1 << 63:
            raise TraceError(f"{where}: 'hash_ids' must hold non-negative integers below "
                             f"2^63, found {h!r}")
    if n_in > len(ids) * TRACE_BLOCK:
        raise TraceError(f"{where}: input_length {n_in} needs at least {-(-n_in // TRACE_BLOCK)} "
                         f"hash_ids of {TRACE_BLOCK} tokens, got {len(ids)}")
    ids = ids[: -(-n_in // TRACE_BLOCK)]
    return TraceRequest(index, float(ts), n_in, n_out, ids)


def load_trace(path: str, *, limit: int | None = None) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    try:
        f = open(path, "rb")  # decoded line by line, so that bad bytes name their line
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TraceError(f"{where}: not UTF-8 text (byte {exc.start} of the line)") \
                    from None
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            req = parse_line(line, where, len(out))
            # the replay takes requests in file order: one earlier than the one before would
            # arrive before the replay's start (negative times, nonsense results)
            if out and req.arrival_ms < out[-1].arrival_ms:
                raise TraceError(f"{where}: timestamp {req.arrival_ms:g} is before the previous "
                                 f"request's {out[-1].arrival_ms:g} (a trace is in arrival order)")
            out.append(req)
    if not out:
        raise TraceError(f"{path}: no requests in the trace")
    return out
