"""Workloads for planner experiments, as Mooncake-format records (`timestamp` ms,
`input_length`, `output_length`, `hash_ids`): what `genset replay` reads.

- `modulate`: a trace's arrivals re-timed so the rate follows a slow sinusoid between
  `low` x peak and peak (the planner's test: pools should follow it up and down). Each
  request keeps its content and its place in the order; only the clock is warped.
- `read_azure`: the Azure LLM inference traces (CSV `TIMESTAMP,ContextTokens,GeneratedTokens`,
  no content) as records with fresh hash ids per request (no prefix reuse is claimed: the
  trace does not say).

Pure functions over lists; file reading is line by line with errors naming file and line.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections.abc import Iterable, Iterator

TRACE_BLOCK = 512  # tokens per Mooncake hash id
# a prompt gets one hash id per 512 tokens, held in a list: a row claiming 10^12 tokens asked
# for two billion of them. No model's context comes near this bound (2^24, 16.7 M tokens).
MAX_CONTEXT_TOKENS = 1 << 24


class WorkloadError(ValueError):
    """A trace that cannot be used; the message names the file, line and field."""


def _modulation(low: float, period_s: float):
    """m(t) = a - b cos(2 pi t / P): `low` at t = 0, 1 at P / 2; and its integral."""
    a, b = (1 + low) / 2, (1 - low) / 2
    w = 2 * math.pi / period_s

    def m(t: float) -> float:
        return a - b * math.cos(w * t)

    def integral(t: float) -> float:
        return a * t - b * math.sin(w * t) / w

    return m, integral, a


def modulate(records: list[dict], *, period_s: float = 300.0, low: float = 0.25,
             peak_rate: float | None = None) -> list[dict]:
    """Re-time `records` (sorted by timestamp) so the arrival rate is peak x m(t), m between
    `low` and 1 with period `period_s`, starting at the low point.

    The original timeline is warped: new time T is where the integral of s x m up to T equals
    the original time, s = peak / (mean original rate). Bursts and gaps in the original stay
    (scaled). Default peak keeps the trace's duration: s = 1 / mean(m)."""
    if not records:
        return []
    if not 0 < low <= 1:
        raise WorkloadError(f"low must be in (0, 1], got {low}")
    if period_s <= 0:
        raise WorkloadError(f"period_s must be > 0, got {period_s}")
    m, integral, mean_m = _modulation(low, period_s)
    t0 = records[0]["timestamp"]
    span_s = max(1e-9, (records[-1]["timestamp"] - t0) / 1000.0)
    rate0 = len(records) / span_s if len(records) > 1 else 1.0
    s = (peak_rate / rate0) if peak_rate else 1.0 / mean_m
    if s <= 0:
        raise WorkloadError(f"peak_rate must be > 0, got {peak_rate}")
    out = []
    tau = 0.0
    for rec in records:
        target = (rec["timestamp"] - t0) / 1000.0  # original seconds consumed
        # Newton on W(tau) = s * integral(tau) = target; W is increasing (m >= low > 0) and
        # convex enough that starting from the previous answer converges in a few steps
        for _ in range(50):
            f = s * integral(tau) - target
            if abs(f) < 1e-9:
                break
            tau = max(0.0, tau - f / (s * m(tau)))
        out.append({**rec, "timestamp": round(tau * 1000.0, 3)})
    return out


def rate_profile(records: list[dict], bucket_s: float = 10.0) -> list[float]:
    """Arrivals per second in consecutive buckets (for checks and plots)."""
    if not records:
        return []
    end = records[-1]["timestamp"] / 1000.0
    counts = [0] * (int(end // bucket_s) + 1)
    for r in records:
        counts[int(r["timestamp"] / 1000.0 // bucket_s)] += 1
    return [c / bucket_s for c in counts]


def _parse_time(text: str) -> float:
    """'2023-11-16 18:15:46.6805900' -> POSIX seconds (the fraction may have 7 digits, which
    datetime does not take)."""
    whole, _, frac = text.strip().partition(".")
    if frac and not frac.isdecimal():  # float() would take '1e5' (+10000 s) or ' 5'
        raise ValueError(f"bad fraction {frac!r}")
    base = dt.datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def read_azure(path: str, *, limit: int | None = None, time_scale: float = 1.0,
               first_hash_id: int = 0) -> list[dict]:
    """The Azure trace at `path` as Mooncake records; `time_scale` > 1 stretches time (a
    lighter load), < 1 compresses it."""
    if time_scale <= 0:
        raise WorkloadError(f"time_scale must be > 0, got {time_scale}")
    try:
        f = open(path, "rb")  # decoded line by line, so that bad bytes name their line
    except OSError as exc:
        raise WorkloadError(f"cannot read trace {path}: {exc.strerror}") from None
    with f:
        return list(_azure_records(_utf8_lines(f, path), path, limit, time_scale,
                                   first_hash_id))


def _utf8_lines(f, path: str) -> Iterator[str]:
    for lineno, raw in enumerate(f, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WorkloadError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the "
                                "line)") from None


def _azure_records(lines: Iterable[str], path: str, limit: int | None, time_scale: float,
                   next_id: int) -> Iterator[dict]:
    reader = csv.reader(lines)
    header = next(reader, None)
    want = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    if header is None or [h.strip() for h in header[:3]] != want:
        raise WorkloadError(f"{path}:1: expected the header {','.join(want)}, got {header}")
    t0 = None
    n = 0
    for lineno, row in enumerate(reader, 2):
        if not row or not "".join(row).strip():
            continue
        if limit is not None and n >= limit:
            return
        where = f"{path}:{lineno}"
        if len(row) < 3:
            raise WorkloadError(f"{where}: expected 3 fields, got {len(row)}")
        try:
            ts = _parse_time(row[0])
        except ValueError:
            raise WorkloadError(f"{where}: TIMESTAMP {row[0]!r} is not 'YYYY-MM-DD "
                                "HH:MM:SS[.fraction]'") from None
        try:
            n_in, n_out = int(row[1]), int(row[2])
        except ValueError:
            raise WorkloadError(f"{where}: ContextTokens and GeneratedTokens must be "
                                f"integers, got {row[1]!r}, {row[2]!r}") from None
        if n_in < 1 or n_out < 1:
            raise WorkloadError(f"{where}: token counts must be >= 1, got {n_in}, {n_out}")
        if n_in > MAX_CONTEXT_TOKENS:
            raise WorkloadError(f"{where}: ContextTokens {n_in} is more than "
                                f"{MAX_CONTEXT_TOKENS} (no model takes such a prompt)")
        t0 = ts if t0 is None else t0
        if ts < t0:
            raise WorkloadError(f"{where}: TIMESTAMP goes back in time")
        blocks = -(-n_in // TRACE_BLOCK)
        yield {"timestamp": round((ts - t0) * 1000.0 * time_scale, 3), "input_length": n_in,
               "output_length": n_out, "hash_ids": list(range(next_id, next_id + blocks))}
        next_id += blocks
        n += 1
