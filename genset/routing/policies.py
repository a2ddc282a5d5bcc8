"""Routing policies: genset's own (lowest predicted time to first token) and the baselines it
is measured against. A policy sees one `WorkerView` per eligible worker and returns one.

Policies are pure functions of the views (plus a seeded RNG and, for round-robin, a cursor),
so the replay, the embedded router and the router service make identical choices.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from genset.offload.onboard import onboard_split
from genset.routing.api import (
    POLICY_DYNAMO,
    POLICY_GENSET,
    POLICY_LEAST_LOADED,
    POLICY_RANDOM,
    POLICY_ROUND_ROBIN,
    POLICY_SGLANG,
    policy_name,
)


@dataclass(frozen=True, slots=True)
class OnboardCost:
    """What one worker measured of onboarding from the offload store, as its `LoadReport`
    says (`genset.routing.load.reported_onboard_cost` checks it); 0 = not measured, the
    policy's configured value stands. `kv_bytes_per_token` and `ram_gbps` come from the same
    lookups (the payload bytes its onboarded blocks carried, over the time the lookup took),
    so their ratio is the time a block took to fetch, whatever the payload (a mocker's is a
    12-byte placeholder); `disk_gbps` is the store's own disk read rate;
    `prefill_ms_per_token` what the worker weighs onboarding against (`onboard_tiers`)."""

    kv_bytes_per_token: float = 0.0
    ram_gbps: float = 0.0
    disk_gbps: float = 0.0
    prefill_ms_per_token: float = 0.0


@dataclass(slots=True)
class WorkerView:
    worker_id: int
    overlap_blocks: int = 0  # leading prompt blocks cached on this worker
    prefill_tokens: int = 0  # predicted uncached prompt tokens queued for prefill
    decode_tokens: int = 0  # context tokens of sequences being decoded
    decode_blocks: int = 0  # KV blocks of every in-flight request
    inflight: int = 0
    kv_blocks: int = 0  # capacity (0 = unknown)
    cached_blocks: int = 0  # blocks the index says it holds (its "tree size")
    max_batch_tokens: int = 8192
    # blocks right after its cached prefix that the offload store holds (it would onboard
    # them), in the store's RAM and on its disk
    host_blocks: int = 0
    disk_blocks: int = 0
    store: bool = False  # an offload store is in reach (its evicted blocks are kept)
    onboard: OnboardCost | None = None  # its measured onboarding cost (None: unknown)


@dataclass(slots=True)
class RouteContext:
    prompt_tokens: int
    prompt_blocks: int  # full blocks of the prompt (what the index can match)
    block_size: int
    max_tokens: int = 16


class PolynomialProfile:
    """Step time of a worker, ms. Default: Dynamo's published mocker polynomial (the genset
    mocker uses the same), so predictions match the simulated engines; a live deployment can
    pass the profile fitted from observed steps."""

    def __init__(self, prefill=(4.209989e-7, 0.01518344, 16.50142),
                 decode=(-25.74, 54.01, 5.74), speedup: float = 1.0) -> None:
        self.prefill_coef = prefill
        self.decode_coef = decode
        self.speedup = speedup

    def prefill_ms(self, tokens: float) -> float:
        if tokens <= 0:
            return 0.0
        a, b, c = self.prefill_coef
        return (a * tokens * tokens + b * tokens + c) / self.speedup

    def decode_ms(self, utilization: float) -> float:
        a, b, c = self.decode_coef
        u = min(max(utilization, 0.0), 1.0)
        return max(1.0, a * u * u + b * u + c) / self.speedup


class Policy:
    name = "base"

    def choose(self, ctx: RouteContext, views: list[WorkerView], rng: random.Random) -> WorkerView:
        raise NotImplementedError


def _least_loaded_of(views: list[WorkerView], rng: random.Random) -> WorkerView:
    best = min((v.prefill_tokens, v.inflight, v.decode_blocks) for v in views)
    tied = [v for v in views if (v.prefill_tokens, v.inflight, v.decode_blocks) == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


class RoundRobin(Policy):
    name = POLICY_ROUND_ROBIN

    def __init__(self) -> None:
        self._next = 0

    def choose(self, ctx, views, rng):
        v = views[self._next % len(views)]
        self._next += 1
        return v


class RandomPolicy(Policy):
    name = POLICY_RANDOM

    def choose(self, ctx, views, rng):
        return rng.choice(views)


class LeastLoaded(Policy):
    name = POLICY_LEAST_LOADED

    def choose(self, ctx, views, rng):
        return _least_loaded_of(views, rng)


class DynamoCost(Policy):
    """Dynamo's KV router cost: `w * prefill_blocks + decode_blocks`, lowest wins, where
    prefill_blocks counts the worker's queued prefill plus this prompt's uncached blocks and
    decode_blocks the worker's active blocks plus this request's. Defaults as in Dynamo
    (overlap_score_weight 1, temperature 0: ties at random); temperature > 0 samples from
    softmax(-normalized cost / T)."""

    name = POLICY_DYNAMO

    def __init__(self, overlap_score_weight: float = 1.0, temperature: float = 0.0) -> None:
        self.weight = overlap_score_weight
        self.temperature = temperature

    def choose(self, ctx, views, rng):
        bs = ctx.block_size
        new_blocks = -(-ctx.prompt_tokens // bs)
        costs = []
        for v in views:
            prefill_blocks = (v.prefill_tokens / bs) + max(0, new_blocks - v.overlap_blocks)
            decode_blocks = v.decode_blocks + new_blocks
            costs.append(self.weight * prefill_blocks + decode_blocks)
        if self.temperature <= 0:
            lo = min(costs)
            tied = [v for v, c in zip(views, costs, strict=True) if c == lo]
            return tied[0] if len(tied) == 1 else rng.choice(tied)
        lo, hi = min(costs), max(costs)
        span = (hi - lo) or 1.0
        weights = [math.exp(-(c - lo) / span / self.temperature) for c in costs]
        return rng.choices(views, weights=weights)[0]


class SGLangCacheAware(Policy):
    """SGLang router's cache-aware rule: if load is imbalanced (max - min in-flight above
    `balance_abs_threshold` and max above `balance_rel_threshold` x min) take the least loaded;
    else, if the best prefix match covers more than `cache_threshold` of the prompt, take that
    worker; else the worker with the smallest cache tree.

    Defaults as documented for SGLang's model gateway (`smg --policy cache_aware`):
    --cache-threshold 0.3, --balance-abs-threshold 64, --balance-rel-threshold 1.5."""

    name = POLICY_SGLANG

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5) -> None:
        self.cache_threshold = cache_threshold
        self.abs_threshold = balance_abs_threshold
        self.rel_threshold = balance_rel_threshold

    def choose(self, ctx, views, rng):
        loads = [v.inflight for v in views]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.abs_threshold and hi > lo * self.rel_threshold:
            tied = [v for v in views if v.inflight == lo]
            return rng.choice(tied)
        best = max(v.overlap_blocks for v in views)
        match_rate = best * ctx.block_size / max(1, ctx.prompt_tokens)
        if best > 0 and match_rate > self.cache_threshold:
            tied = [v for v in views if v.overlap_blocks == best]
            return tied[0] if len(tied) == 1 else min(tied, key=lambda v: (v.inflight, rng.random()))
        smallest = min(v.cached_blocks for v in views)
        tied = [v for v in views if v.cached_blocks == smallest]
        return tied[0] if len(tied) == 1 else rng.choice(tied)


class PredictedTTFT(Policy):
    """genset's policy: the worker with the lowest predicted time to first token.

    TTFT on worker w = time to prefill what w already has queued plus this prompt's uncached
    tokens, in chunks of w's token budget, each step also paying w's current decode step
    (mixed batches). Added to that prediction:

    - decode load: the extra step time this request's context puts on every sequence w is
      decoding (what it costs everyone else per step), weighted by `decode_weight`;
    - cache affinity: a worker's saving from its cached prefix counts `1 + affinity` times.
      Beyond this request's TTFT, keeping a prefix on the worker that has it avoids a second
      copy elsewhere, which leaves room in the caches for other prefixes (on the Mooncake
      replay, affinity 0.5 raised the hit rate 1-3 points at 0.3M tokens per worker).

    Herding guard: a worker that would hold more than max(`herd_factor` x the fleet's mean
    in-flight, mean + `herd_slack`) requests is passed over while another is eligible, so a hot
    prefix cannot pin every request on one worker while others idle. (A soft per-request
    penalty was tried instead: strong enough to stop a hot prefix, it also overrode the cache
    on many-prefix workloads, where load spreads by itself.)

    Offload store: the blocks after a worker's cached prefix that the store holds
    (`host_blocks` in RAM, `disk_blocks` on disk) are onboarded instead of computed, so they
    leave the prefill and cost their transfer instead: `kv_bytes_per_token` x their tokens
    over the tier's bandwidth (`host_gbps`, `disk_gbps`, GB/s decimal; a disk block pays the
    disk read and then the host copy). These are defaults: a worker that reported what it
    measured (`WorkerView.onboard`: its blocks' bytes, its fetch rate, the store's disk read
    rate) is priced with its own figures, each unknown one falling back to the default. A
    block whose transfer is slower than computing it counts against the worker (it is
    onboarded anyway), unless the worker reported its prefill rate too: it then decides as
    it does (`genset.worker.offload_hook.onboard_tiers`), a tier slower than recomputing its
    blocks (that rate x the block's tokens) is not onboarded, and the price is computing.
    With `copy_overlap` the engine copies beside its compute (layer by layer): the transfer
    costs only its first layer (1/`kv_layers`) and what outlasts the prefill; and with
    `split_runs` (as the workers) a run whose copy would outlast the prefill is priced as the
    worker runs it, its head onboarded and its tail computed beside the copy
    (`genset.offload.onboard`). The store is shared, so there is no affinity credit for it,
    and with a store in reach (`store`: the router tracks one) the affinity credit itself
    changes price. Keeping a prefix on one worker saves cache room elsewhere; without a store
    the prefix a second copy pushes out is computed again, with one it is onboarded again:
    the credit is then `affinity` x the onboarding time of the device prefix (what a device
    hit saves over the store), not its prefill time. A worker without the prefix but next to
    a warm store competes with the loaded worker that holds it on load and transfer time. (Mooncake replay, 2026-12-06, store 10x the GPUs: the
    full prefill credit cost ~4 ms of mean TTFT and a point of hit rate.)

    Near-ties (within `tie_ms`) go to the least loaded, then at random, so equal scores
    spread out.
    """

    name = POLICY_GENSET

    def __init__(self, profile: PolynomialProfile | None = None, *, decode_weight: float = 1.0,
                 affinity: float = 0.5, herd_factor: float = 1.5, herd_slack: float = 2.0,
                 tie_ms: float = 0.5, kv_bytes_per_token: float = 131072.0,
                 host_gbps: float = 32.0, disk_gbps: float = 4.0,
                 copy_overlap: bool = False, kv_layers: int = 32,
                 split_runs: bool = True) -> None:
        if kv_bytes_per_token < 0 or host_gbps <= 0 or disk_gbps <= 0 or kv_layers < 1:
            raise ValueError("need kv_bytes_per_token >= 0, host_gbps > 0, disk_gbps > 0, "
                             "kv_layers >= 1")
        self.profile = profile or PolynomialProfile()
        self.kv_bytes_per_token = kv_bytes_per_token
        self.host_gbps = host_gbps
        self.disk_gbps = disk_gbps
        self.copy_overlap = copy_overlap
        self.split_runs = split_runs
        self.kv_layers = kv_layers
        self.decode_weight = decode_weight
        self.affinity = affinity
        self.herd_factor = herd_factor
        self.herd_slack = herd_slack
        self.tie_ms = tie_ms

    def prefill_time(self, tokens: int, budget: int, decode_ms: float) -> float:
        if tokens <= 0:
            return 0.0
        budget = max(1, budget)
        full, rest = divmod(tokens, budget)
        p = self.profile
        steps = full + (1 if rest else 0)
        return full * p.prefill_ms(budget) + p.prefill_ms(rest) + steps * decode_ms

    def score(self, ctx: RouteContext, v: WorkerView) -> float:
        bs = ctx.block_size
        cached = min(v.overlap_blocks * bs, max(0, ctx.prompt_tokens - 1))
        uncached = ctx.prompt_tokens - cached
        onboard_ms = 0.0
        if v.host_blocks or v.disk_blocks:
            onboard_ms, onboarded = self.onboard(v.host_blocks, v.disk_blocks, bs,
                                                 max(0, uncached - 1), v.onboard)
            uncached -= onboarded
        capacity = max(1, v.kv_blocks * bs) if v.kv_blocks else 1 << 30
        p = self.profile
        decode_now = p.decode_ms(v.decode_tokens / capacity) if v.decode_tokens else 0.0
        if onboard_ms and self.copy_overlap and self.split_runs:
            # the worker onboards only the run's head when its copy would outlast the
            # compute, computing the tail beside it (genset.offload.onboard): price that
            run = onboarded // bs
            base = v.prefill_tokens + uncached

            def compute(m: int) -> tuple[float, float]:
                return self.prefill_time(base + (run - m) * bs, v.max_batch_tokens,
                                         decode_now), 0.0

            keep = onboard_split(run, onboard_ms / run, compute, layers=self.kv_layers)
            uncached += (run - keep) * bs
            onboard_ms *= keep / run
        ttft = self.prefill_time(v.prefill_tokens + uncached, v.max_batch_tokens, decode_now)
        if self.copy_overlap:
            # copied in beside the compute, layer by layer (the mocker's kv_copy_overlap):
            # the prefill waits for the first layer, and for what outlasts its compute
            ttft = max(ttft, onboard_ms) + onboard_ms / self.kv_layers
        else:
            ttft += onboard_ms
        if self.decode_weight and v.inflight:
            after = p.decode_ms((v.decode_tokens + ctx.prompt_tokens) / capacity)
            ttft += self.decode_weight * (after - (decode_now or p.decode_ms(0.0))) * v.inflight
        if self.affinity and cached:
            if v.store:
                # a duplicate's victims go to the store: what the device prefix saves is
                # its onboarding, not its compute
                kvb, host_gbps, c = self.kv_bytes_per_token, self.host_gbps, v.onboard
                if c is not None:
                    kvb, host_gbps = c.kv_bytes_per_token or kvb, c.ram_gbps or host_gbps
                save = kvb * cached / 1e6 / host_gbps
                if self.copy_overlap:
                    save /= self.kv_layers
            else:
                save = p.prefill_ms(uncached + cached) - p.prefill_ms(uncached)
            ttft -= self.affinity * save
        return ttft

    def onboard(self, host_blocks: int, disk_blocks: int, block_size: int,
                max_tokens: int, cost: OnboardCost | None = None) -> tuple[float, int]:
        """(ms, tokens) of onboarding these store blocks (RAM first), at most `max_tokens`,
        at the worker's measured `cost` (each unknown figure: the configured one). Disk
        blocks count only when reading one is faster than computing its tokens (the
        worker's reported prefill rate, else the profile's marginal prefill cost): otherwise
        the worker is expected to compute them. With a reported prefill rate and block
        size, a RAM tier slower than that is not onboarded either (the worker computes the
        whole run: `onboard_tiers` ONBOARD_NONE)."""
        host = min(host_blocks, max_tokens // block_size)
        disk = min(disk_blocks, max_tokens // block_size - host)
        kvb, host_gbps, disk_gbps = self.kv_bytes_per_token, self.host_gbps, self.disk_gbps
        recompute = 0.0
        if cost is not None:
            kvb = cost.kv_bytes_per_token or kvb
            host_gbps = cost.ram_gbps or host_gbps
            disk_gbps = cost.disk_gbps or disk_gbps
            recompute = cost.prefill_ms_per_token * block_size
        per_block = kvb * block_size / 1e6  # bytes / (GB/s) -> ms
        if recompute and cost.kv_bytes_per_token and per_block / host_gbps >= recompute:
            return 0.0, 0
        disk_ms = per_block * (1 / disk_gbps + 1 / host_gbps)
        if not recompute:
            recompute = self.profile.prefill_coef[1] * block_size / self.profile.speedup
        if disk_ms >= recompute:
            disk = 0
        ms = host * per_block / host_gbps + disk * disk_ms
        return ms, (host + disk) * block_size

    def choose(self, ctx, views, rng):
        eligible = views
        if len(views) > 1 and self.herd_factor > 0:
            mean_after = (sum(v.inflight for v in views) + 1) / len(views)
            cap = max(self.herd_factor * mean_after, mean_after + self.herd_slack)
            eligible = [v for v in views if v.inflight + 1 <= cap] or views
        scored = [(self.score(ctx, v), v) for v in eligible]
        lo = min(s for s, _ in scored)
        near = [v for s, v in scored if s <= lo + self.tie_ms]
        if len(near) == 1:
            return near[0]
        return _least_loaded_of(near, rng)


# name -> constructor; the baselines without parameters ignore `options` (as they always did).
_FACTORIES = {
    POLICY_GENSET: PredictedTTFT,
    POLICY_ROUND_ROBIN: lambda **_: RoundRobin(),
    POLICY_RANDOM: lambda **_: RandomPolicy(),
    POLICY_LEAST_LOADED: lambda **_: LeastLoaded(),
    POLICY_DYNAMO: DynamoCost,
    POLICY_SGLANG: SGLangCacheAware,
}


def make_policy(name: str, **options) -> Policy:
    """A fresh policy by name (any accepted spelling, see `genset.routing.api.policy_name`);
    `options` go to its constructor. ValueError naming the choices for an unknown name."""
    return _FACTORIES[policy_name(name)](**options)
