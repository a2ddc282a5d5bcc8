"""Prefill here or remotely? One decision per request, from a cost model.

Dynamo decides with fixed thresholds (on the prompt's length and its cached share), whatever
the workers' state. Here the two ways a request can start are priced with the same timing
profile the router uses, for this request on these workers right now:

- **local**: the decode worker prefills the prompt itself. The request waits for the
  prefill backlog already queued there, then for its own uncached tokens (the decode
  worker's cached prefix is not recomputed). Meanwhile every sequence that worker is
  decoding stalls for that prefill's duration: the *decode slow-down*, summed over the
  running sequences and weighted by `slowdown_weight`.
- **remote**: the best prefill worker (the one where this is cheapest) prefills it: its queue,
  its uncached tokens (its own cached prefix counts there), then the KV of the blocks the
  decode worker lacks crosses at the measured bandwidth, then the decode worker imports it
  (which stalls its running sequences for the import) and computes the prompt's trailing
  partial block itself, unless it travelled with the first token (`tail_shipped`). A peer that decodes for its own clients
  (role `both`, lending its prefill) stalls those sequences for the prefill's duration: that
  slow-down is priced like the local one.

The cheaper one wins (remote must win by `remote_margin_ms`). With SLO targets and the
decode worker's per-sequence ITL slack (`CostModel.ttft_target_ms`, `DecodeState.slack_ms`)
the price is goodput instead: remote only when it is predicted to cause fewer SLO misses
(running sequences pushed past their ITL target, the request's own TTFT) than local; with as
many either way the request stays where the router put it. Against a prefill-only worker,
which takes the prefill off the decode pool, the decode worker's side also counts the share
of each running sequence's remaining slack the stall uses up (what it leaves the prefills
after it), and the request's own ITL miss (the transfer gap) is a priced miss, not a veto.
Requests always have a way to run: with no prefill worker, or every one saturated, or
nothing to ship, the answer is local (never an error, never a wait on an empty pool). Every
decision carries a reason label from `REASONS` for a metric, and the predicted times of both
paths.

Pure: no I/O, no clock; the same code decides live (decode worker), in tests and in the
offline replay.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

# ms to prefill T uncached tokens in a step batch where `running` other sequences decode
# (e.g. the mocker's polynomial ignoring `running`, or a profile fitted by the planner).
PrefillTimeFn = Callable[[int, int], float]

LOCAL = "local"
REMOTE = "remote"
Mode = Literal["local", "remote"]

NO_PREFILL_WORKERS = "no_prefill_workers"
PREFILL_SATURATED = "prefill_saturated"
SHORT_PROMPT_CACHED = "short_prompt_cached"
REMOTE_CHEAPER = "remote_cheaper"
LOCAL_CHEAPER = "local_cheaper"
DISABLED = "disabled"  # policy "never" (`--disagg never`)
FORCED = "forced"  # policy "always": remote whenever a prefill worker can take it
SINGLE_TOKEN = "single_token"  # max_tokens 1: nothing would be decoded after the transfer
# every prefill worker would make the request's own first inter-token gap (transfer, the
# decode worker's queue) alone exceed the ITL target over its max_tokens
ITL_TARGET = "itl_target"
# remote though not cheaper: moving it costs nobody anything (a tie), its first token is
# predicted within `CostModel.spare_budget_ms`, and the prefill pool has room to spare
# (`SpareGate`): `always`'s choice where the pool keeps up
REMOTE_SPARE = "remote_spare"
# Every reason label a decision can carry (a bounded label set for the metric).
REASONS = (NO_PREFILL_WORKERS, PREFILL_SATURATED, SHORT_PROMPT_CACHED, REMOTE_CHEAPER,
           LOCAL_CHEAPER, DISABLED, FORCED, SINGLE_TOKEN, ITL_TARGET, REMOTE_SPARE)
# How a worker (or the replay) applies the cost model: `auto` compares both paths, `always`
# prefills remotely whenever a prefill worker can take the request (A/B runs, tests), `never`
# keeps every request aggregated.
POLICY_AUTO = "auto"
POLICY_ALWAYS = "always"
POLICY_NEVER = "never"
POLICIES = (POLICY_AUTO, POLICY_ALWAYS, POLICY_NEVER)


@dataclass(frozen=True, slots=True)
class DecodeState:
    """The decode worker the router picked, as it stands for this request."""

    worker_id: int
    cached_blocks: int = 0  # leading prompt blocks it already holds
    running: int = 0  # sequences it is decoding (they stall while it prefills)
    queued_prefill_tokens: int = 0  # uncached prompt tokens already queued there
    step_ms: float = 0.0  # its recent engine step time (the load report's EWMA; 0: unknown)
    # each decoding sequence's ITL slack, ascending: ms of stall it can still take before its
    # own mean inter-token latency passes the target (negative: past it already, whatever
    # happens); None: not known (the decision prices stall in ms instead, see CostModel)
    slack_ms: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True)
class PrefillState:
    """A registered prefill worker."""

    worker_id: int
    cached_blocks: int = 0  # leading prompt blocks it holds (from the router's index)
    queued_prefill_tokens: int = 0  # uncached prompt tokens queued ahead of this request
    running: int = 0  # sequences in its batch
    saturated: bool = False  # it says it takes no more (its queue is full)
    # sequences it is decoding for its own clients, which stall while it prefills this one:
    # 0 for a prefill-role worker; a worker of role `both` lending its prefill to a peer
    # makes its own decoders pay, priced like the decode worker's local slow-down
    decoding: int = 0
    step_ms: float = 0.0  # its recent engine step time (0: unknown)
    slack_ms: tuple[float, ...] | None = None  # its own decoders' ITL slack, as DecodeState's
    # role `both`, lending its prefill (even with nobody decoding right now): a prefill sent
    # here stays in the decode pool, it only moves between batches
    lends: bool = False


@dataclass(frozen=True, slots=True)
class CostModel:
    """What the decision is priced with.

    prefill_ms(T, running): the prefill timing profile (shared by both paths: one model
    family; pass per-pool profiles by wrapping). bandwidth_bytes_per_s: measured KV
    transfer bandwidth (`BandwidthEstimator.bytes_per_s`). import_ms_per_block: what
    importing one block costs the decode worker (its running sequences stall for it).
    transfer_setup_ms: fixed cost of a transfer (header round trip, first chunk).
    slowdown_weight: how many ms of this request's time one ms of stall of one running
    sequence is worth (1.0: total latency over all users; a starting point to be fitted from
    replays, not a measured optimum). max_prefill_queue_ms: a prefill worker whose queue
    alone predicts more than this is saturated. remote_margin_ms: how much cheaper remote
    must be (hysteresis against flapping on noise). itl_target_ms: the mean inter-token
    latency a request is held to (0: none); a remote prefill whose first inter-token gap
    (first token to the decode worker's resume: transfer, import, the decode worker's
    prefill backlog) plus its later gaps at the decode worker's step time, over the
    request's max_tokens - 1 gaps, exceeds it is not taken: a short answer to a long prompt
    would miss its ITL target on the transfer alone. With a target, a running sequence's
    stall is priced only past it: a prefill of `c` ms in a step of `s` ms costs each
    stalled sequence max(0, c + s - itl_target_ms) (a stall that keeps its gap within the
    target costs the SLA nothing); without one, the whole `c`.

    ttft_target_ms (0: none): with both targets and the decode worker's ITL slacks known
    (`DecodeState.slack_ms`), the paths are priced in SLO misses, what goodput counts: the
    running sequences a prefill's stall pushes past their ITL target (slack in [0, stall)),
    on the decode worker and on a lending peer, plus the request itself when its predicted
    first token is past the TTFT target. Remote only when it misses fewer; with as many
    either way the request stays local (the costs reported: misses x `ttft_target_ms` + the
    request's own time, remote: when the decode worker can go on). `slowdown_weight` is not
    used then. Against a prefill-only worker (not `PrefillState.lends`) the decode worker's
    side is priced beyond the misses of this one stall: each running sequence with more
    slack than the stall adds stall / slack of a miss (the share of its slack used up, which
    the prefills after this one no longer have), and the request's own first gap (transfer,
    import, tail: not the decode worker's backlog, which the local path waits for too)
    breaking the ITL target is one more miss, not a veto. Counting only the sequences pushed
    past now was myopic: no single prefill broke anyone, every one used up slack and added
    to the decode worker's backlog, the backlog made every remote path break its ITL, and
    4P+4D `auto` at 3x collapsed to 2.8% SLA attainment (docs/benchmarks.md, replay). A
    lending peer only moves a prefill between two batches of the same pool: there the
    myopic count was measured best (8 peers at 3x, first 2,000 requests: 99.2%; with the
    share on both sides 98.5% when a move had to save a whole miss, 95.0% a quarter).
    """

    block_size: int
    kv_bytes_per_token: float
    prefill_ms: PrefillTimeFn
    bandwidth_bytes_per_s: float
    import_ms_per_block: float = 0.0
    transfer_setup_ms: float = 1.0
    slowdown_weight: float = 1.0
    max_prefill_queue_ms: float = 2000.0
    remote_margin_ms: float = 0.0
    itl_target_ms: float = 0.0
    ttft_target_ms: float = 0.0
    # True: price a remote prefill without the decode worker computing the prompt's last
    # partial block, which now travels with the first token (`KvImport.tail`). Off (live and
    # in the replay) although the tail is shipped: the replay measured it worse (2026-12-06,
    # engine tail on, simulated time: 1x 2P+6D auto 99.2 % -> 98.9 %, 1x 4P+4D 98.0 -> 97.4,
    # 3x 2P+6D 87.8 -> 86.6 %; at 1x about one point more of the prompts went remote, to a
    # pool that was not freer for them): the term keeps the bias towards local that those
    # figures were reached with (docs/benchmarks.md, issue 11, session 9).
    tail_shipped: bool = False
    # ms pricing only (no ITL slacks known: a live decode worker): a path's own time (local:
    # its first token; remote: when the decode worker can go on) counts only past this
    # budget, as the stall counts only past `itl_target_ms`. 0: every ms counts. With both
    # under it and nobody stalled past the ITL target either way the request stays local;
    # prefill workers tie-break on time. Counting every ms of the request's TTFT against
    # every ms of stall past the ITL target kept long prompts on a decode worker with a few
    # streams whenever the prefill pool had a queue: 1,100 ms of queue against 8 x 97 ms of
    # stall, while the 2 s TTFT target had room for the queue (docs/benchmarks.md, issue 11).
    ttft_budget_ms: float = 0.0
    # ... and a path past the budget pays this once more (a first token past the TTFT target
    # loses the request, not just ms: the SLO pricing's one miss). Without it a decode worker
    # with 24 streams stalled 97 ms each (2.3 s) let the prefill pool's queue grow 2.3 s past
    # the budget before a prompt stayed local.
    over_budget_ms: float = 0.0
    # ms pricing: a tie (e.g. both paths within both budgets) goes to the prefill worker
    # instead of staying local: the decode worker keeps decoding, the pool's free time does
    # the prefill (live default; docs/benchmarks.md, issue 11, session 6)
    remote_on_tie: bool = False
    # A tie goes to the prefill pool when the pool has room to spare (`decide`'s `pool_spare`,
    # from a `SpareGate`) and the prefill worker's first token is predicted within this
    # (0: off). A tie: remote stalls the decode worker's sequences no more than local (in
    # SLO pricing: misses no more), e.g. a short prompt whose 17 ms prefill keeps every step
    # within the ITL target either way. Unlike `remote_on_tie` it does not fill a pool that
    # is short of capacity: with the gate closed (a prompt that would have gained from the
    # pool was kept local for its queue, within the last `max_prefill_queue_ms`) ties stay
    # local, so they never crowd out the prompts the pool is for (1P+3D with
    # `remote_on_tie`: goodput 0.25, docs/benchmarks.md, issue 11, session 7).
    spare_budget_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_bytes_per_token < 0:
            raise ValueError(f"kv_bytes_per_token must be >= 0, got {self.kv_bytes_per_token}")
        if self.bandwidth_bytes_per_s <= 0:
            raise ValueError(
                f"bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s}"
            )
        for name in ("import_ms_per_block", "transfer_setup_ms", "slowdown_weight",
                     "max_prefill_queue_ms", "remote_margin_ms", "itl_target_ms",
                     "ttft_target_ms", "ttft_budget_ms", "over_budget_ms", "spare_budget_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict and what it was based on (ms unless named otherwise).

    local_ttft_ms: first token if prefilled locally. remote_ttft_ms: first token from the
    prefill worker (streamed as soon as it is produced); remote_ready_ms: when the decode
    worker can go on (transfer and import done). *_slowdown_ms: stall summed over the decode
    worker's running sequences (and, remote, over a lending peer's own decoders). cost_*: what was compared (None: not priced).
    """

    mode: Mode
    reason: str
    prefill_worker_id: int | None = None
    local_ttft_ms: float = 0.0
    local_slowdown_ms: float = 0.0
    cost_local: float = 0.0
    remote_ttft_ms: float | None = None
    remote_ready_ms: float | None = None
    remote_slowdown_ms: float | None = None
    cost_remote: float | None = None
    transfer_blocks: int = 0
    transfer_bytes: int = 0
    transfer_ms: float | None = None

    @property
    def remote(self) -> bool:
        return self.mode == REMOTE


@dataclass(frozen=True, slots=True)
class _Remote:
    worker_id: int
    ttft_ms: float
    ready_ms: float
    slowdown_ms: float
    cost: float
    transfer_ms: float
    misses: float = 0.0  # SLO misses predicted (SLO pricing only)
    local_misses: float = 0.0  # local's, priced on the same basis


def _queue_ms(model: CostModel, queued_tokens: int, running: int) -> float:
    return model.prefill_ms(queued_tokens, running) if queued_tokens > 0 else 0.0


def _stall_ms(model: CostModel, prefill_ms: float, step_ms: float) -> float:
    """What one running sequence pays for sharing a step with `prefill_ms` of prefill."""
    if model.itl_target_ms > 0:
        return max(0.0, prefill_ms + step_ms - model.itl_target_ms)
    return prefill_ms


def _time_ms(model: CostModel, ms: float) -> float:
    """A path's own time as the ms pricing counts it: past `ttft_budget_ms` only (if set)."""
    if model.ttft_budget_ms <= 0:
        return ms
    over = ms - model.ttft_budget_ms
    return over + model.over_budget_ms if over > 0 else 0.0


def _misses(slack_ms: tuple[float, ...] | None, stall_ms: float, share: bool) -> float:
    """SLO misses a stall of `stall_ms` causes among sequences with these ITL slacks: one for
    each it pushes past its target (slack in [0, stall)); with `share`, also stall / slack of
    one for each with more slack (the share of its remaining slack the stall uses up: what
    it leaves the prefills after it)."""
    if not slack_ms or stall_ms <= 0:
        return 0.0
    lo = bisect_left(slack_ms, 0.0)
    hi = bisect_left(slack_ms, stall_ms)
    return (hi - lo) + (sum(stall_ms / s for s in slack_ms[hi:]) if share else 0.0)


def decide(prompt_tokens: int, decode: DecodeState, prefills: Sequence[PrefillState],
           model: CostModel, policy: str = POLICY_AUTO,
           max_tokens: int | None = None, pool_spare: bool = False) -> Decision:
    """Local or remote prefill for a prompt of `prompt_tokens` tokens (see the module doc);
    `policy`: one of POLICIES; `max_tokens`: the request's output limit (None: unknown, no
    ITL check); `pool_spare`: the prefill pool has room for ties (`SpareGate.spare`; used
    only with `CostModel.spare_budget_ms`)."""
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    bs = model.block_size
    full_blocks = prompt_tokens // bs
    # the last prompt token is always computed (its logits give the first output token)
    local_cached = min(decode.cached_blocks * bs, prompt_tokens - 1)
    local_compute = model.prefill_ms(prompt_tokens - local_cached, decode.running)
    local_queue = _queue_ms(model, decode.queued_prefill_tokens, decode.running)
    local_ttft = local_queue + local_compute
    local_slowdown = decode.running * _stall_ms(model, local_compute, decode.step_ms)
    slo = model.itl_target_ms > 0 and model.ttft_target_ms > 0 and decode.slack_ms is not None
    # local misses as a peer's path is priced (sequences pushed past now), and as a prefill-only
    # worker's is (with the slack each one's stall uses up): see `_Remote.local_misses`
    local_misses = local_misses_share = 0.0
    if slo:  # priced in SLO misses (CostModel)
        own = float(local_ttft > model.ttft_target_ms)
        local_misses = _misses(decode.slack_ms, local_compute, False) + own
        local_misses_share = _misses(decode.slack_ms, local_compute, True) + own
        cost_local = local_misses * model.ttft_target_ms + local_ttft
    else:
        cost_local = _time_ms(model, local_ttft) + model.slowdown_weight * local_slowdown

    def local(reason: str, **remote: object) -> Decision:
        return Decision(mode=LOCAL, reason=reason, local_ttft_ms=local_ttft,
                        local_slowdown_ms=local_slowdown, cost_local=cost_local,
                        **remote)  # type: ignore[arg-type]

    if policy == POLICY_NEVER:
        return local(DISABLED)
    if not prefills:
        return local(NO_PREFILL_WORKERS)
    transfer_blocks = max(0, full_blocks - decode.cached_blocks)
    if transfer_blocks == 0:
        # nothing a prefill worker could ship: the decode worker holds every full block
        # (or the prompt is shorter than one block)
        return local(SHORT_PROMPT_CACHED)
    transfer_bytes = int(transfer_blocks * bs * model.kv_bytes_per_token)
    transfer_ms = model.transfer_setup_ms + transfer_bytes / model.bandwidth_bytes_per_s * 1e3
    import_ms = transfer_blocks * model.import_ms_per_block
    tail = prompt_tokens - full_blocks * bs  # recomputed on the decode worker, unless shipped
    tail_ms = model.prefill_ms(tail, decode.running) if tail and not model.tail_shipped else 0.0
    remote_slowdown = decode.running * _stall_ms(model, import_ms + tail_ms, decode.step_ms)

    itl_gaps = (max_tokens - 1 if model.itl_target_ms > 0 and max_tokens is not None
                and policy == POLICY_AUTO else 0)
    best: _Remote | None = None
    breaks_itl = False
    for p in prefills:
        if p.saturated:
            continue
        queue = _queue_ms(model, p.queued_prefill_tokens, p.running)
        if queue > model.max_prefill_queue_ms:
            continue
        cached = min(p.cached_blocks * bs, prompt_tokens - 1)
        compute = model.prefill_ms(prompt_tokens - cached, p.running)
        ttft = queue + compute
        # the resumed request queues behind the decode worker's prefill backlog (first come,
        # first served): its KV arriving early does not let it jump that queue
        ready = max(ttft + transfer_ms, local_queue) + import_ms + tail_ms
        # a prefill-only worker takes the prefill off the decode pool: priced with the slack
        # share (see below); a lending peer only moves it between two batches
        off_pool = slo and not p.lends
        # the request's own first gap (first token to the resume). Priced against a
        # prefill-only worker, without the wait for the decode worker's backlog: that wait
        # delays the local path's first token just as much (the same queue), and refusing
        # remote for it kept every prefill on a backlogged decode worker, which grew the
        # backlog (4P+4D at 3x: 75.1% with it, 79.1% without)
        gap = transfer_ms + import_ms + tail_ms if off_pool else ready - ttft
        own_itl_miss = itl_gaps > 0 and ((gap + (itl_gaps - 1) * decode.step_ms)
                                         / itl_gaps > model.itl_target_ms)
        if own_itl_miss and not off_pool:
            breaks_itl = True
            continue
        slowdown = remote_slowdown + p.decoding * _stall_ms(model, compute, p.step_ms)
        misses = base = 0.0
        if slo:
            misses = (_misses(decode.slack_ms, import_ms + tail_ms, off_pool)
                      + _misses(p.slack_ms, compute, False) + (ttft > model.ttft_target_ms)
                      + own_itl_miss)
            base = local_misses_share if off_pool else local_misses
            # ranked by what it saves over local on its own basis, then by time
            cost = (misses - base) * model.ttft_target_ms + ready
        else:
            cost = _time_ms(model, ready) + model.slowdown_weight * slowdown
        # equal costs (e.g. all within the TTFT budget): the earliest ready
        if best is None or (cost, ready, p.worker_id) < (best.cost, best.ready_ms,
                                                          best.worker_id):
            best = _Remote(p.worker_id, ttft, ready, slowdown, cost, transfer_ms, misses,
                           base)
    if best is None:
        return local(ITL_TARGET if breaks_itl else PREFILL_SATURATED,
                     transfer_blocks=transfer_blocks, transfer_bytes=transfer_bytes, transfer_ms=transfer_ms)
    if slo:  # reported on one scale: misses x the TTFT target + the request's own time
        cost_local = best.local_misses * model.ttft_target_ms + local_ttft
    priced = {
        "remote_ttft_ms": best.ttft_ms,
        "remote_ready_ms": best.ready_ms,
        "remote_slowdown_ms": best.slowdown_ms,
        "cost_remote": (best.misses * model.ttft_target_ms + best.ready_ms if slo
                        else best.cost),
        "transfer_blocks": transfer_blocks,
        "transfer_bytes": transfer_bytes,
        "transfer_ms": best.transfer_ms,
    }
    if slo:
        # SLO misses first; with as many either way the request stays where the router put
        # it (its cache reach, no transfer): moving it for a faster first token alone was
        # measured to cost more ITL misses than it saved (docs/benchmarks.md, replay)
        cheaper = best.misses < best.local_misses
    else:
        cheaper = (best.cost + model.remote_margin_ms <= cost_local if model.remote_on_tie
                   else best.cost + model.remote_margin_ms < cost_local)
    spare = (not cheaper and pool_spare and policy == POLICY_AUTO and model.spare_budget_ms > 0
             and best.ttft_ms <= model.spare_budget_ms
             and (best.misses <= best.local_misses if slo
                  else best.slowdown_ms <= local_slowdown))
    if policy == POLICY_ALWAYS or cheaper or spare:
        reason = (FORCED if policy == POLICY_ALWAYS else REMOTE_CHEAPER if cheaper
                  else REMOTE_SPARE)
        return Decision(mode=REMOTE, reason=reason, prefill_worker_id=best.worker_id,
                        local_ttft_ms=local_ttft,
                        local_slowdown_ms=local_slowdown, cost_local=cost_local,
                        **priced)  # type: ignore[arg-type]
    return local(LOCAL_CHEAPER, **priced)


class SpareGate:
    """Whether the prefill pool has room to spare for ties (`decide`'s `pool_spare`).

    Closed for `hold_ms` after a decision kept a prompt local that stalls the decode
    worker's sequences (past the ITL target: `Decision.local_slowdown_ms` > 0) while a prefill
    worker could have taken it (saturated, or its queue priced remote dearer): the pool is then
    short of capacity for the prompts it is for, and a tie sent there would only lengthen the
    queue those wait in. `hold_ms`: how long a prompt queued there now may hold it (the
    saturation limit, `CostModel.max_prefill_queue_ms`). A pool's queue length alone does not
    say this: under a closed-loop load (a fixed number of prompts in flight) the queue fills to
    any threshold set on it (1P+3D with a 1.5 s TTFT budget for ties: goodput 0.31,
    docs/benchmarks.md, issue 11, session 6). Closed for `hold_ms` too after a remote
    prefill's first token took longer than `budget_ms` to come back (`first_token`): what the
    pool's queue really is, where the decode worker's view of it lags what the other decode
    workers sent (1P+3D with the first rule alone, session 7: decode-stream TTFT p50 2.0 s
    against a 1 s budget, goodput 0.56 and 0.64). And closed until a remote first token has
    come back within the budget at all: a burst's first prompts are all decided before any
    first token returns, and there the gate would know nothing (the same 1P+3D runs with
    the second rule: 49 ties sent at the start, 20 decode streams over the TTFT SLO).
    Pure: the caller passes the time (ms, any monotonic origin); one gate per decode worker
    (the replay: one per simulated worker).
    """

    def __init__(self, hold_ms: float, budget_ms: float = float("inf")) -> None:
        if not hold_ms >= 0:
            raise ValueError(f"hold_ms must be >= 0, got {hold_ms}")
        if not budget_ms >= 0:
            raise ValueError(f"budget_ms must be >= 0, got {budget_ms}")
        self.hold_ms = hold_ms
        self.budget_ms = budget_ms
        self._closed_until = float("-inf")
        self._seen_room = False  # a remote first token came back within the budget

    def first_token(self, latency_ms: float, now_ms: float) -> None:
        """A remote prefill's first token came back `latency_ms` after it was asked for."""
        if latency_ms > self.budget_ms:
            self._closed_until = max(self._closed_until, now_ms + self.hold_ms)
        else:
            self._seen_room = True

    def spare(self, now_ms: float) -> bool:
        return self._seen_room and now_ms >= self._closed_until

    def note(self, decision: Decision, now_ms: float) -> None:
        """Account one decision made at `now_ms`."""
        if (decision.mode == LOCAL and decision.reason in (LOCAL_CHEAPER, PREFILL_SATURATED)
                and decision.local_slowdown_ms > 0 and decision.transfer_blocks > 0):
            self._closed_until = max(self._closed_until, now_ms + self.hold_ms)
