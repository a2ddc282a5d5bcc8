"""SLO accounting of a replay, shared by every kind of replay (aggregated, with a planner,
disaggregated): which requests met their latency targets, and the goodput that makes.

Definitions follow Dynamo's replay (peers/dynamo/replay_wave2.py) so the numbers compare:
a request is *good* when its TTFT <= `sla_ttft_ms` AND its own mean inter-token latency
((last token - first token) / (output tokens - 1)) <= `sla_itl_ms`; a request with one
output token passes the ITL test. `sla_attainment` = good / completed; goodput = output tokens
(requests) of good requests per second of the replay's duration.
"""

from __future__ import annotations

DEFAULT_SLA_TTFT_MS = 2000.0
DEFAULT_SLA_ITL_MS = 50.0


def request_ok(arrival_ms: float, first_ms: float | None, last_ms: float | None,
               outputs: int, sla_ttft_ms: float, sla_itl_ms: float) -> tuple[bool, bool]:
    """(TTFT met, ITL met) for one request; (False, False) for one that never started."""
    if first_ms is None:
        return False, False
    ttft_ok = first_ms - arrival_ms <= sla_ttft_ms
    if outputs <= 1 or last_ms is None:
        return ttft_ok, True
    return ttft_ok, (last_ms - first_ms) / (outputs - 1) <= sla_itl_ms


def sla_summary(reqs, sla_ttft_ms: float, sla_itl_ms: float, duration_s: float) -> dict:
    """SLO fields of a replay result. `reqs` have `arrival_ms`, `first_token_ms`,
    `last_token_ms` and `trace.output_length`."""
    completed = good = ttft_ok = itl_ok = good_tokens = 0
    for r in reqs:
        if r.first_token_ms is None:
            continue
        completed += 1
        t_ok, i_ok = request_ok(r.arrival_ms, r.first_token_ms, r.last_token_ms,
                                r.trace.output_length, sla_ttft_ms, sla_itl_ms)
        ttft_ok += t_ok
        itl_ok += i_ok
        if t_ok and i_ok:
            good += 1
            good_tokens += r.trace.output_length
    dur = duration_s if duration_s > 0 else float("nan")
    return {
        "sla_ttft_ms": sla_ttft_ms,
        "sla_itl_ms": sla_itl_ms,
        "sla_attainment": good / completed if completed else 0.0,
        "ttft_sla_attainment": ttft_ok / completed if completed else 0.0,
        "itl_sla_attainment": itl_ok / completed if completed else 0.0,
        "goodput_requests": good,
        "goodput_rps": good / dur if duration_s > 0 else 0.0,
        "goodput_out_tok_s": good_tokens / dur if duration_s > 0 else 0.0,
    }
