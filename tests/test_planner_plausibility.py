"""What one message may claim to the planner (genset.planning.observations): pure checks,
no bus. Each bound sits far past what an honest publisher sends; the message past one names
the field that gave it away."""

from __future__ import annotations

import pytest

from genset.planning.observations import (
    MAX_BOUND_WINDOW_MS,
    MAX_FRONTEND_REQUESTS_PER_S,
    MAX_LATENCY_MS,
    MAX_STEP_DECODE_SEQS,
    MAX_STEP_PREFILL_TOKENS,
    MAX_TOKENS_PER_REQUEST,
    MAX_WORKER_REQUESTS,
    MIN_BOUND_WINDOW_MS,
    implausible_load,
    implausible_route,
    implausible_step,
    implausible_traffic,
    max_window_requests,
)
from genset.planning.perf_model import MAX_STEP_MS


def traffic(**kw):
    fields = {"window_ms": 1000, "arrivals": 10, "prompt_tokens": 1000}
    return implausible_traffic(**{**fields, **kw})


def test_an_honest_frontend_window_passes():
    assert traffic() is None
    # a busy window, far beyond any measured frontend, at its limits
    assert traffic(arrivals=5000, prompt_tokens=5000 * 4096, cached_tokens=5000 * 4096,
                   finished=5000, failed=100, output_tokens=5000 * 4096,
                   ttft_ms=[0.0, 12.5, MAX_LATENCY_MS], itl_ms=[3.0] * 4096,
                   max_request_tokens=4096) is None
    assert traffic(arrivals=0, prompt_tokens=0) is None  # an idle window: a heartbeat


def test_the_window_bounds_the_requests_it_may_count():
    per_s = MAX_FRONTEND_REQUESTS_PER_S
    assert max_window_requests(1000) == per_s
    assert max_window_requests(1) == max_window_requests(MIN_BOUND_WINDOW_MS) == per_s // 10
    # a long claimed window does not raise the bound without limit
    assert max_window_requests(2**62) == max_window_requests(MAX_BOUND_WINDOW_MS) == 10 * per_s
    assert traffic(arrivals=per_s, prompt_tokens=per_s) is None
    assert traffic(arrivals=per_s + 1, prompt_tokens=per_s + 1) == "arrivals"
    assert traffic(window_ms=2**62, arrivals=2**62, prompt_tokens=2**62) == "arrivals"
    assert traffic(finished=per_s + 1) == "finished"
    assert traffic(failed=per_s + 1) == "failed"


@pytest.mark.parametrize(("claim", "field"), [
    ({"arrivals": 2**64 - 1}, "arrivals"),
    ({"arrivals": -1}, "arrivals"),
    ({"prompt_tokens": 10 * MAX_TOKENS_PER_REQUEST + 1}, "prompt_tokens"),
    ({"prompt_tokens": 1.5}, "prompt_tokens"),
    ({"cached_tokens": 1001}, "cached_tokens"),  # more cached than the prompts had
    ({"finished": 1, "output_tokens": MAX_TOKENS_PER_REQUEST + 1}, "output_tokens"),
    ({"output_tokens": 5}, "output_tokens"),  # tokens of no finished request
    ({"ttft_ms": [10.0, 1e308]}, "ttft_ms"),
    ({"ttft_ms": [float("inf")]}, "ttft_ms"),
    ({"itl_ms": [float("nan")]}, "itl_ms"),
    ({"itl_ms": [MAX_LATENCY_MS * 1.01]}, "itl_ms"),
])
def test_an_implausible_frontend_window_names_its_field(claim, field):
    assert traffic(**claim) == field


def test_a_model_context_bounds_each_requests_tokens():
    assert traffic(prompt_tokens=10 * 4096, max_request_tokens=4096) is None
    assert traffic(prompt_tokens=10 * 4096 + 1, max_request_tokens=4096) == "prompt_tokens"
    assert traffic(finished=2, output_tokens=8193, max_request_tokens=4096) == "output_tokens"


def test_step_samples():
    assert implausible_step(512, 0, 20.0, MAX_STEP_MS) is None
    assert implausible_step(MAX_STEP_PREFILL_TOKENS, MAX_STEP_DECODE_SEQS, MAX_STEP_MS,
                            MAX_STEP_MS) is None
    assert implausible_step(0, 0, 0.0, MAX_STEP_MS) is None  # idle: the model skips it
    assert implausible_step(MAX_STEP_PREFILL_TOKENS + 1, 0, 20.0, MAX_STEP_MS) == \
        "prefill_tokens"
    assert implausible_step(-1, 0, 20.0, MAX_STEP_MS) == "prefill_tokens"
    assert implausible_step(0, MAX_STEP_DECODE_SEQS + 1, 20.0, MAX_STEP_MS) == "decode_seqs"
    for ms in (MAX_STEP_MS * 1.01, 1e308, float("inf"), float("nan"), -1.0):
        assert implausible_step(512, 0, ms, MAX_STEP_MS) == "ms", ms


def test_route_decisions():
    assert implausible_route(1000, 62) is None
    assert implausible_route(1000, 1000) is None  # blocks of one token: still possible
    assert implausible_route(MAX_TOKENS_PER_REQUEST + 1, 0) == "prompt_tokens"
    assert implausible_route(5000, 0, max_request_tokens=4096) == "prompt_tokens"
    assert implausible_route(-1, 0) == "prompt_tokens"
    assert implausible_route(1000, 1001) == "overlap_blocks"
    assert implausible_route(1000, -1) == "overlap_blocks"


def test_load_reports():
    assert implausible_load(8, 100, 100 * 4096, 4096) is None
    assert implausible_load(0, 0, 4096, 4096) is None  # counts and tokens not one snapshot
    assert implausible_load(MAX_WORKER_REQUESTS + 1, 0, 0) == "running"
    assert implausible_load(-1, 0, 0) == "running"
    assert implausible_load(1, MAX_WORKER_REQUESTS, 0) == "waiting"
    assert implausible_load(1, 1, 2 * 4096 + 1, 4096) == "waiting_prefill_tokens"
    assert implausible_load(1, 1, 2**63) == "waiting_prefill_tokens"
