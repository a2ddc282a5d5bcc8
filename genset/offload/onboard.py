"""How much of a store run to onboard when its copy runs beside the prompt's compute (pure).

An engine that copies onboarded blocks in on a side stream, layer by layer (the mocker's
`kv_copy_overlap`, vLLM's offloading connector), overlaps the copy with the compute of the
prompt's uncached rest: the prompt's first step takes max(copy, compute) plus the first
layer's copy. When the run is long and the rest short, the copy is what the prompt waits
for: 351 blocks of 8 MiB at 32 GB/s are 92 ms against ~25 ms for the rest (Mooncake replay,
2026-12-06). Computing the run's last blocks instead moves time from the copy to the
compute, and the two meet: one block is ~0.27 ms of copy against ~1.1-1.4 ms of compute, so
the balance point trims ~1/5 of the excess. `onboard_split` finds it.

Blocks are always trimmed from the run's tail: a block can only be used after its parents,
so the onboarded part stays a prefix of the run.

Only for overlapped copies: a copy the step waits for (genset's torch engine today, a fetch
over the bus) adds to the compute, and a block that copies faster than it computes is then
always worth onboarding in full (`genset.worker.offload_hook.onboard_tiers` drops tiers that
copy slower than they compute).
"""

from __future__ import annotations

from collections.abc import Callable


def onboard_split(run_blocks: int, copy_ms_per_block: float,
                  compute_ms: Callable[[int], tuple[float, float]], *, layers: int = 32,
                  out_ms: Callable[[int], float] | None = None) -> int:
    """The number of the run's leading blocks to onboard (0..`run_blocks`) that minimises
    the time to the prompt's first token when the rest is computed:

        T(m) = max(lane(m), beside(m)) + lane(m) / layers + after(m)
        lane(m) = max(copy(m), out(m)),  copy(m) = m x copy_ms

    where `compute_ms(m)` = (beside, after): the compute the copy runs beside (the prompt's
    first step) and the compute after it (later chunks), with the run's last `run_blocks - m`
    blocks computed too; `out_ms(m)` (None: 0) the copies out the prompt's first step waits
    for when m blocks are onboarded (the cached blocks its new blocks evict, copied out on
    the other lane before their memory is written again). The copy grows with m and the
    compute shrinks, so T falls until the two cross, or until the first step is full and the
    compute moves to later steps; both points are found by bisection (O(log run_blocks)
    calls) and compared with onboarding all and nothing. The copy out hardly depends on m
    (an onboarded block and a computed one both take a block), so where it outlasts the
    rest, T is flat up to where the copy in overtakes it: the largest such m (bisection
    again) is a candidate too, as ties go to the larger m (more served from the store, less
    computed for nothing).
    `copy_ms_per_block` <= 0 (a free copy) or `run_blocks` <= 0: `run_blocks`."""
    n = int(run_blocks)
    if n <= 0 or copy_ms_per_block <= 0:
        return max(0, n)
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    a = copy_ms_per_block
    memo: dict[int, float] = {}

    def total(m: int) -> float:
        if m not in memo:
            beside, after = compute_ms(m)
            lane = a * m
            if out_ms is not None:
                lane = max(lane, out_ms(m))
            memo[m] = max(lane, beside) + lane / layers + after
        return memo[m]

    # the smallest m whose copy outlasts its compute (n + 1: none does)
    lo, hi = 0, n + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if a * mid >= compute_ms(mid)[0]:
            hi = mid
        else:
            lo = mid + 1
    # The compute the copy runs beside stops growing once the first step is full (a chunked
    # prompt): from there, computing more of the run only adds later steps. The smallest m
    # whose first step is no longer full is the other candidate.
    first_full = compute_ms(0)[0]
    s, hi = 0, n + 1
    while s < hi:
        mid = (s + hi) // 2
        if compute_ms(mid)[0] < first_full:
            hi = mid
        else:
            s = mid + 1
    candidates = [n, lo, lo - 1, s, s - 1, 0]
    if out_ms is not None:
        # the largest m whose copy in stays within the copies out (-1: none)
        o, hi = 0, n + 1
        while o < hi:
            mid = (o + hi) // 2
            if a * mid > out_ms(mid):
                hi = mid
            else:
                o = mid + 1
        candidates += [o - 1, o]
    best = n
    for m in candidates:
        if 0 <= m <= n and total(m) < total(best):
            best = m
    # ties go to the larger m: among candidates as good as the best, the largest
    return max(m for m in candidates if 0 <= m <= n and total(m) <= total(best))


def chunked_compute(tokens: int, chunk_tokens: int,
                    prefill_ms: Callable[[int], float]) -> tuple[float, float]:
    """(first step, later steps) of computing `tokens` in chunks of at most `chunk_tokens`
    with `prefill_ms(tokens of one step)`: the shape `onboard_split`'s `compute_ms` returns
    for an engine whose copy is fenced by the prompt's first step."""
    if tokens <= 0:
        return 0.0, 0.0
    chunk = max(1, chunk_tokens)
    first = min(tokens, chunk)
    full, rest = divmod(tokens - first, chunk)
    after = full * prefill_ms(chunk) + (prefill_ms(rest) if rest else 0.0)
    return prefill_ms(first), after


def overlapped_copy_ms(core) -> float:
    """A block's copy-in time (ms) on an engine core that copies beside its compute (a mocker
    with `kv_copy_overlap`, a KV size and an H2D bandwidth); 0 for any other (the torch
    engine copies on its compute stream: the step waits, and a split cannot win)."""
    cfg = getattr(core, "config", None)
    if not getattr(cfg, "kv_copy_overlap", False):
        return 0.0
    gbps = getattr(cfg, "offload_h2d_gbps", 0.0)
    nbytes = getattr(cfg, "kv_block_bytes", 0)
    return nbytes / (gbps * 1e6) if gbps > 0 and nbytes > 0 else 0.0


def split_for_core(core, run_blocks: int, copy_ms_per_block: float, rest_tokens: int,
                   block_size: int, known: Callable[[int], bool] | None = None) -> int:
    """`onboard_split` for a mocker core: its prefill polynomial, chunked at its step budget
    (the copy is fenced by the prompt's first step), its KV layers, and the copies out its
    first step waits for: the cached blocks its new blocks (the run's head onboarded, the
    first chunk computed) evict next, less those `known` to the store already (not copied;
    the hook's and the replay's skip list). `rest_tokens`: what the prompt computes after
    the whole run."""
    timing = core.timing
    chunk = core.config.max_batch_tokens

    def compute(m: int) -> tuple[float, float]:
        return chunked_compute(rest_tokens + (run_blocks - m) * block_size, chunk,
                               timing.prefill_ms)

    out = eviction_copies_ms(core, run_blocks + -(-chunk // block_size), known)
    out_ms = None
    if out is not None:
        def out_ms(m: int) -> float:
            first = min(chunk, rest_tokens + (run_blocks - m) * block_size)
            return out[min(len(out) - 1, m + -(-first // block_size))]

    return onboard_split(run_blocks, copy_ms_per_block, compute, layers=core.config.kv_layers,
                         out_ms=out_ms)


def eviction_copies_ms(core, blocks: int, known: Callable[[int], bool] | None = None
                       ) -> list[float] | None:
    """[k] = the copy-out time (ms) of what allocating k more blocks on `core` evicts: the
    cached blocks among the next k its pool would take, less those `known` (k = 0..`blocks`).
    None when the core copies out for free or its pool cannot say (the split then weighs
    the copy in alone). Reads the pool without changing it; from another thread a hint
    (a pool changed meanwhile answers None)."""
    cfg = getattr(core, "config", None)
    gbps = getattr(cfg, "offload_d2h_gbps", 0.0)
    nbytes = getattr(cfg, "kv_block_bytes", 0)
    pool = getattr(core, "pool", None)
    if gbps <= 0 or nbytes <= 0 or pool is None or not hasattr(pool, "eviction_order"):
        return None
    per = nbytes / (gbps * 1e6)
    try:
        order = pool.eviction_order(blocks)
    except RuntimeError:  # changed by the engine's thread while read
        return None
    ahead = getattr(core, "copied_ahead_of", None)  # copied out ahead: evicted for free
    out = [0.0]
    acc = 0.0
    for h in order:
        if (h is not None and (known is None or not known(h))
                and (ahead is None or not ahead(h))):
            acc += per
        out.append(acc)
    return out
