"""The planner's wire records: the pool sizes it wants (in etcd) and what it measures from.

- `PlannerTargets` is written (not under a lease: targets outlive a planner restart) at
  `proto.keys.planner_targets(ns)` on every change, with the reason for it.
- `FrontendStats` is what a frontend saw over the last window (arrivals, prompt and output
  lengths, TTFT and ITL samples), published every ~1 s on `proto.subjects.frontend_stats(ns)`,
  also when idle: an empty window says "no traffic", silence says "no information", and the
  planner treats the two differently (scale down vs hold).
- `WorkerStepStats` is a sample of a worker's recent engine steps (what was computed and how
  long it took), on `proto.subjects.step_stats(ns, worker_id)`, from which the planner fits
  its performance model. Workers' `LoadReport`s carry only an EWMA of the step time.

Lists are bounded by the schema itself: a larger message fails validation instead of growing
the planner's memory.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from proto.base import Message

MAX_LATENCY_SAMPLES = 1024  # per FrontendStats window (a frontend subsamples beyond this)
MAX_STEP_SAMPLES = 256  # per WorkerStepStats message

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]


class PlannerTargets(Message, kw_only=True):
    """The pool sizes the planner wants, per worker role (decode | prefill | both)."""

    pools: dict[str, NonNegInt] = msgspec.field(default_factory=dict)
    reason: str = ""  # why the last change was made, in words
    ts_ms: int = 0  # wall-clock time of the decision
    decision_id: int = 0  # increases by one per decision that changed a target
    policy: str = ""  # load | slo
    planner_id: int = 0
    ready: dict[str, NonNegInt] = msgspec.field(default_factory=dict)  # pools as seen then
    inputs: dict[str, float] = msgspec.field(default_factory=dict)  # the numbers behind it


class FrontendStats(Message, kw_only=True):
    """What one frontend saw in the `window_ms` before `ts_ms`."""

    frontend_id: int
    ts_ms: int
    window_ms: Annotated[int, msgspec.Meta(gt=0)]
    arrivals: NonNegInt = 0  # requests accepted
    prompt_tokens: NonNegInt = 0  # of the arrivals
    cached_tokens: NonNegInt = 0  # of those prompt tokens, served from a worker's cache
    output_tokens: NonNegInt = 0  # of the requests that finished in the window
    finished: NonNegInt = 0
    failed: NonNegInt = 0
    ttft_ms: Annotated[list[NonNegFloat], msgspec.Meta(max_length=MAX_LATENCY_SAMPLES)] = \
        msgspec.field(default_factory=list)
    itl_ms: Annotated[list[NonNegFloat], msgspec.Meta(max_length=MAX_LATENCY_SAMPLES)] = \
        msgspec.field(default_factory=list)  # one mean inter-token latency per finished request


class StepSample(msgspec.Struct, kw_only=True):
    """One engine step: uncached prompt tokens computed, sequences that produced a token, the
    KV use of those decoding sequences (context tokens / KV capacity in tokens), duration."""

    prefill_tokens: NonNegInt = 0
    decode_seqs: NonNegInt = 0
    kv_usage: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    ms: NonNegFloat = 0.0


class WorkerStepStats(Message, kw_only=True):
    worker_id: int
    ts_ms: int = 0
    role: str = "decode"
    samples: Annotated[list[StepSample], msgspec.Meta(max_length=MAX_STEP_SAMPLES)] = \
        msgspec.field(default_factory=list)
