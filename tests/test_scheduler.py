"""The shared continuous-batching scheduler, driven by a fake executor."""

from __future__ import annotations

import random

import pytest

from genset.engines.scheduler import Scheduler, SchedulerConfig
from genset.engines.types import EngineRequest
from genset.kv.hashing import block_hashes
from genset.kv.replica import HashSetReplica
from proto.generate import StopConditions


def make(**kw) -> Scheduler:
    base = dict(
        block_size=4, num_blocks=64, max_batch_tokens=32, max_running=8, context_length=1024
    )
    base.update(kw)
    return Scheduler(SchedulerConfig(**base))


def request(rid: str, tokens: list[int], max_tokens: int = 8, **stop) -> EngineRequest:
    stop.setdefault("ignore_eos", True)
    return EngineRequest(rid, tokens, stop=StopConditions(max_tokens=max_tokens, **stop))


def next_token(chunk) -> int:
    # a deterministic "model": the next token depends on the position only
    return (chunk.start_pos + len(chunk.token_ids)) * 7 % 50 + 3


def run(s: Scheduler, replica: HashSetReplica | None = None, max_steps: int = 10_000):
    """Step to completion; returns {request_id: (tokens, finish_reason, cached_tokens)}."""
    results: dict[str, tuple[list[int], str | None, int]] = {}
    for _ in range(max_steps):
        if not s.has_work():
            break
        plan = s.schedule()
        assert plan.num_tokens <= s.config.max_batch_tokens
        assert len(s.running) <= s.config.max_running
        for c in plan.chunks:
            # the block table covers every position computed this step
            assert len(c.block_table) * s.block_size >= c.start_pos + len(c.token_ids)
        sampled = [next_token(c) if c.sample else None for c in plan.chunks]
        for out in s.update(plan, sampled):
            toks, _, _ = results.get(out.request_id, ([], None, 0))
            results[out.request_id] = (toks + out.token_ids, out.finish_reason, out.cached_tokens)
        s.pool.check_invariants()
        batch = s.pool.take_batch(0)
        if replica is not None and batch is not None:
            assert replica.apply(batch)
    else:
        raise AssertionError("did not finish")
    return results


def test_chunked_prefill_respects_budget():
    s = make(max_batch_tokens=16, num_blocks=128)
    s.add_request(request("long", list(range(100)), max_tokens=3))
    s.add_request(request("short", [1, 2, 3], max_tokens=3))
    plan = s.schedule()
    assert plan.num_tokens == 16
    assert [len(c.token_ids) for c in plan.chunks] == [16]
    assert not plan.chunks[0].sample
    s.update(plan, [None])
    sizes = []
    emitted = {"long": 0, "short": 0}
    while True:
        plan = s.schedule()
        sizes.append([(c.seq_id, len(c.token_ids)) for c in plan.chunks])
        for out in s.update(plan, [next_token(c) if c.sample else None for c in plan.chunks]):
            emitted[out.request_id] += len(out.token_ids)
        if plan.chunks[0].sample:
            break
    # 100 tokens in chunks of at most 16; the short request waits until budget is left
    assert sum(n for step in sizes for rid, n in step if rid == "long") == 84
    assert all(sum(n for _, n in step) <= 16 for step in sizes)
    res = run(s)
    assert len(res["long"][0]) + emitted["long"] == 3
    assert len(res["short"][0]) + emitted["short"] == 3


def test_decodes_and_prefill_share_a_step():
    s = make(max_batch_tokens=10, num_blocks=128)
    s.add_request(request("a", [1, 2, 3], max_tokens=20))
    plan = s.schedule()
    s.update(plan, [5])
    s.add_request(request("b", list(range(30)), max_tokens=2))
    plan = s.schedule()
    assert [(c.seq_id, len(c.token_ids)) for c in plan.chunks] == [("a", 1), ("b", 9)]


def test_preemption_under_small_capacity_still_finishes_everything():
    rng = random.Random(7)
    s = make(num_blocks=24, max_batch_tokens=40, max_running=16)
    replica = HashSetReplica()
    want = {}
    for i in range(24):
        n = rng.randint(2, 40)
        want[f"r{i}"] = rng.randint(1, 30)
        s.add_request(request(f"r{i}", [rng.randint(0, 99) for _ in range(n)], want[f"r{i}"]))
    res = run(s, replica)
    assert s.num_preemptions > 0
    assert {rid: len(t) for rid, (t, _, _) in res.items()} == want
    assert all(reason == "length" for _, reason, _ in res.values())
    assert replica.hashes == s.pool.cached_hashes()
    assert s.pool.num_used == 0


def test_preempted_output_equals_unpreempted_output():
    rng = random.Random(3)
    prompts = {f"r{i}": [rng.randint(0, 99) for _ in range(rng.randint(3, 30))] for i in range(10)}
    outs = []
    for blocks in (400, 20):
        s = make(num_blocks=blocks, max_batch_tokens=64)
        for rid, p in prompts.items():
            s.add_request(request(rid, p, 12))
        outs.append({rid: t for rid, (t, _, _) in run(s).items()})
        if blocks == 20:
            assert s.num_preemptions > 0
    assert outs[0] == outs[1]


def test_prefix_cache_counts_cached_tokens():
    s = make(num_blocks=64)
    prompt = list(range(1, 23))  # 22 tokens: 5 full blocks of 4
    s.add_request(request("a", prompt, 2))
    first = run(s)
    computed = s.num_computed_tokens
    s.add_request(request("b", prompt, 2))
    second = run(s)
    assert first["a"][2] == 0
    assert second["b"][2] == 20  # all 5 full blocks served from the cache
    assert s.num_computed_tokens - computed == 2 + 1  # 2 prompt tokens + 1 decode
    assert first["a"][0] == second["b"][0]


def test_requests_admitted_together_share_the_prefix_computed_in_that_step():
    """A burst with one shared prefix: the first request computes it, the others admitted in
    the same step start after it (their chunks read its blocks in the same forward pass)."""
    s = make(num_blocks=64, max_batch_tokens=64)
    prefix = list(range(1, 17))  # 4 full blocks
    for rid, tail in (("a", [90, 91, 92]), ("b", [93, 94]), ("c", [95])):
        s.add_request(request(rid, prefix + tail, 2))
    plan = s.schedule()
    assert [(c.seq_id, c.start_pos, len(c.token_ids)) for c in plan.chunks] == [
        ("a", 0, 19), ("b", 16, 2), ("c", 16, 1)
    ]
    shared = plan.chunks[0].block_table[:4]
    assert all(c.block_table[:4] == shared for c in plan.chunks)
    assert s.num_computed_tokens == 22
    got = run(s)  # finishes the step planned above and the rest
    assert [got[r][2] for r in "abc"] == [0, 16, 16]
    # A budget that ends inside the first prompt: only the blocks it completes are shared.
    t = make(num_blocks=64, max_batch_tokens=10)
    t.add_request(request("x", [*prefix, 90], 2))
    t.add_request(request("y", [*prefix, 91], 2))
    plan = t.schedule()
    assert [(c.seq_id, c.start_pos, len(c.token_ids)) for c in plan.chunks] == [("x", 0, 10)]


def test_fully_cached_prompt_still_computes_last_token():
    s = make()
    prompt = list(range(16))  # exactly 4 blocks
    s.add_request(request("a", prompt, 1))
    run(s)
    s.add_request(request("b", prompt, 1))
    plan = s.schedule()
    assert len(plan.chunks[0].token_ids) == 4 and plan.chunks[0].start_pos == 12
    s.update(plan, [1])


def test_generated_blocks_are_cached_and_hashed_like_a_prompt():
    s = make()
    s.add_request(request("a", [9, 8, 7], 9))
    res = run(s)
    full = [9, 8, 7] + res["a"][0]
    # the last generated token's KV is never computed, so 11 of 12 tokens: 2 full blocks
    assert s.pool.cached_hashes() == set(block_hashes(full[:8], 4))


def test_abort_frees_blocks():
    s = make()
    s.add_request(request("a", list(range(30)), 50))
    s.add_request(request("b", list(range(100, 110)), 50))
    for _ in range(3):
        plan = s.schedule()
        s.update(plan, [1 if c.sample else None for c in plan.chunks])
    assert s.pool.num_used > 0
    assert s.abort("a") and s.abort("b")
    assert not s.abort("a")
    assert s.pool.num_used == 0 and not s.has_work()
    s.pool.check_invariants()
    # aborting a waiting request
    s.add_request(request("c", [1, 2], 5))
    assert s.abort("c") and not s.has_work()


def test_stop_conditions():
    s = make(eos_token_ids=(3,))
    # next_token at position p is p*7%50+3: prompt of 5 -> first token (5*7)%50+3 = 38
    s.add_request(request("stop-id", [0] * 5, 10, stop_token_ids=[45]))  # 2nd token: 6*7%50+3
    s.add_request(request("eos", [0] * 50, 10, ignore_eos=False))  # 50*7%50+3 = 3 = eos
    s.add_request(request("eos-ignored", [1] * 50, 4, ignore_eos=True))
    s.add_request(request("min-tokens", [2] * 50, 3, ignore_eos=False, min_tokens=2))
    res = run(s)
    assert res["stop-id"] == ([38, 45], "stop", 0)
    assert res["eos"][0:2] == ([3], "stop")
    assert res["eos-ignored"][1] == "length" and len(res["eos-ignored"][0]) == 4
    assert res["min-tokens"][1] == "length" and len(res["min-tokens"][0]) == 3


def test_context_length_limit():
    s = make(context_length=20)
    with pytest.raises(ValueError, match="context length"):
        s.add_request(request("x", list(range(20))))
    s.add_request(request("y", list(range(15)), 100))
    res = run(s)
    assert res["y"][1] == "length" and len(res["y"][0]) == 5


def test_rejects_prompt_bigger_than_cache_and_duplicates():
    s = make(num_blocks=4)
    with pytest.raises(ValueError, match="KV cache"):
        s.add_request(request("x", list(range(16))))
    s.add_request(request("y", [1]))
    with pytest.raises(ValueError, match="already active"):
        s.add_request(request("y", [1]))
    with pytest.raises(ValueError, match="no tokens"):
        s.add_request(request("z", []))


def test_max_running_limits_admission():
    s = make(max_running=2, num_blocks=128)
    for i in range(5):
        s.add_request(request(f"r{i}", [i, i + 1], 4))
    plan = s.schedule()
    assert len(plan.chunks) == 2 and s.num_waiting == 3


def test_export_and_pinned_import():
    src = make()
    prompt = list(range(40))
    src.add_request(request("a", prompt, 1))
    run(src)
    hashes = block_hashes(prompt, 4)
    exported = src.export_kv(hashes)
    assert [h for h, _ in exported] == hashes and len(exported) == 10

    dst = make()
    written = dst.import_kv([h for h, _ in exported], pin_for="b")
    assert len(written) == 10
    assert dst.pool.num_used == 10  # pinned until "b" is admitted
    dst.add_request(request("b", prompt, 1))
    res = run(dst)
    assert res["b"][2] == 36  # the last prompt token is always recomputed
    assert dst.pool.num_used == 0
    assert dst.import_kv(hashes[:2]) == []  # already cached: nothing to write


def test_waiting_prefill_tokens_leave_out_imported_kv():
    """A request whose KV was imported (pinned for it) counts only the tokens admission will
    compute: the ones past the imported blocks, and always the last prompt token. A request
    without an import counts its whole prompt; a partial import counts the rest."""
    prompt = list(range(40))  # 10 full blocks of 4
    hashes = block_hashes(prompt, 4)
    s = make(max_batch_tokens=128)
    s.import_kv(hashes, pin_for="imported")
    s.add_request(request("imported", prompt, 1))
    assert s.waiting_prefill_tokens() == 4  # the last block: its last token is computed
    other = list(range(100, 141))  # 41 tokens
    s.import_kv(block_hashes(other, 4)[:6], pin_for="partial")
    s.add_request(request("partial", other, 1))
    assert s.waiting_prefill_tokens() == 4 + (41 - 24)
    s.add_request(request("plain", [7] * 20, 1))
    assert s.waiting_prefill_tokens() == 4 + 17 + 20
    # and it is what admission really computes
    plan = s.schedule()
    assert sum(len(c.token_ids) for c in plan.chunks) == 4 + 17 + 20
    s.update(plan, [next_token(c) if c.sample else None for c in plan.chunks])
    assert s.waiting_prefill_tokens() == 0


def test_an_import_holds_the_cached_prefix_it_continues():
    """The imported run continues a prefix this worker held unpinned (an offload hit after
    the device prefix, a remote prefill from `first_block` on): the import holds that
    prefix too until admission, so evicting it cannot orphan the run (it did: that prefix
    is often the pool's least recently used, the first blocks an import's allocation
    evicts)."""
    prompt = list(range(40))
    hashes = block_hashes(prompt, 4)
    s = make()
    s.import_kv(hashes[:5])  # cached here, held by nobody
    s.import_kv(hashes[5:], parent_hash=hashes[4], pin_for="r")
    s.add_request(request("r", prompt, 1))
    assert s.waiting_prefill_tokens() == 4
    assert s.pool.evict_cached() == 0  # the prefix is held with the run
    assert s.waiting_prefill_tokens() == 4
    plan = s.schedule()
    assert sum(len(c.token_ids) for c in plan.chunks) == 4  # only the last block computed
    assert s.num_pinned_blocks == 0  # admitted: the request holds its blocks itself


def test_waiting_prefill_tokens_see_a_forgotten_prefix():
    """When the cache forgets the prefix of a waiting import before admission, admission
    will compute it, and the count says so (the remembered lookup is dropped)."""
    prompt = list(range(40))
    hashes = block_hashes(prompt, 4)
    s = make()
    s.import_kv(hashes[:5])
    s.import_kv(hashes[5:], parent_hash=hashes[4], pin_for="r")
    s.add_request(request("r", prompt, 1))
    assert s.waiting_prefill_tokens() == 4
    assert s.waiting_prefill_tokens() == 4  # (remembered)
    s.pool.clear_cache()  # every hash forgotten, held blocks too
    assert s.waiting_prefill_tokens() == 40  # the lookup stops at block 0 now
    plan = s.schedule()
    assert sum(len(c.token_ids) for c in plan.chunks) == 32  # the budget's worth of it


def test_waiting_prefill_tokens_without_prefix_caching_count_the_whole_prompt():
    s = make(enable_prefix_caching=False)
    s.import_kv(block_hashes(list(range(40)), 4), pin_for="a")  # nothing can be cached
    s.add_request(request("a", list(range(40)), 1))
    assert s.waiting_prefill_tokens() == 40


def test_without_prefix_caching_nothing_is_cached_or_published():
    s = make(enable_prefix_caching=False)
    prompt = list(range(20))
    s.add_request(request("a", prompt, 3))
    run(s)
    s.add_request(request("b", prompt, 3))
    res = run(s)
    assert res["b"][2] == 0
    assert s.pool.num_cached == 0 and s.pool.take_batch(0) is None


class PagedFakeModel:
    """An executor that really uses the block tables: it writes each computed token into a
    paged store at the slot its block table names, and samples from the context it reads
    back through the block table. Wrong block tables, a bad prefix-cache hit or a broken
    recompute after preemption all change its output."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.kv: dict[int, int] = {}

    def execute(self, plan) -> list[int | None]:
        bs = self.bs
        out: list[int | None] = []
        for c in plan.chunks:
            for j, tok in enumerate(c.token_ids):
                pos = c.start_pos + j
                self.kv[c.block_table[pos // bs] * bs + pos % bs] = tok
            if not c.sample:
                out.append(None)
                continue
            end = c.start_pos + len(c.token_ids)
            ctx = [self.kv[c.block_table[p // bs] * bs + p % bs] for p in range(end)]
            out.append(reference_next(ctx))
        return out


def reference_next(ctx: list[int]) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(repr(ctx).encode()) % 40


def reference_output(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(reference_next(seq))
    return seq[len(prompt) :]


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(10, 48),
    budget=st.integers(1, 48),
    max_running=st.integers(1, 8),
)
def test_outputs_match_a_dense_reference_under_any_pressure(seed, num_blocks, budget, max_running):
    rng = random.Random(seed)
    s = make(
        num_blocks=num_blocks, max_batch_tokens=budget, max_running=max_running, context_length=4096
    )
    model = PagedFakeModel(s.block_size)
    replica = HashSetReplica()
    shared = [rng.randrange(40) for _ in range(24)]
    want: dict[str, list[int]] = {}
    got: dict[str, list[int]] = {}
    aborted: set[str] = set()
    pending = []
    for i in range(12):
        prompt = shared[: rng.randint(0, 24)] + [
            rng.randrange(40) for _ in range(rng.randint(1, 12))
        ]
        n = rng.randint(1, 10)
        pending.append((f"r{i}", prompt, n))
    for _ in range(2000):
        if pending and rng.random() < 0.3:
            rid, prompt, n = pending.pop()
            if len(prompt) >= s.max_seq_len:  # cannot fit in the whole KV cache
                with pytest.raises(ValueError):
                    s.add_request(request(rid, prompt, n))
                continue
            s.add_request(request(rid, prompt, n))
            # a sequence stops ("length") when it would outgrow the whole KV cache
            want[rid] = reference_output(prompt, min(n, s.max_seq_len - len(prompt)))
        if want and rng.random() < 0.02:
            victim = rng.choice(sorted(want))
            if victim not in aborted and s.abort(victim):
                aborted.add(victim)
        if not s.has_work() and not pending:
            break
        plan = s.schedule()
        for out in s.update(plan, model.execute(plan)):
            got.setdefault(out.request_id, []).extend(out.token_ids)
        batch = s.pool.take_batch(0)
        if batch is not None:
            assert replica.apply(batch)
        s.pool.check_invariants()
    assert not s.has_work() and not pending
    for rid, tokens in want.items():
        if rid not in aborted:
            assert got[rid] == tokens, rid
    assert s.pool.num_used == 0
    assert replica.hashes == s.pool.cached_hashes()


@pytest.mark.parametrize("dynamo_exact", [False, True])
def test_decode_runs_leave_the_state_of_single_steps(dynamo_exact):
    """Taking plain decode steps in bulk (MockerCore.decode_run / commit_decode_run, what the
    replay does) gives the tokens, step times, outputs and KV events of stepping one by one,
    whatever prefix of each run is committed and with a request arriving mid-run."""
    from genset.engines.mocker import MockerConfig, MockerCore, PolynomialTiming

    cfg = MockerConfig(block_size=4, num_blocks=40, max_batch_tokens=16, max_running=4,
                       timing=PolynomialTiming(dynamo_exact=dynamo_exact))
    reqs = [request(f"r{i}", [i % 2 * 50 + j for j in range(5 + 4 * i)], max_tokens=9 + 7 * i)
            for i in range(5)]
    late_at = 12  # r4 arrives before this step (counting steps of either driver)

    def drive(bulk: bool):
        core = MockerCore(cfg)
        rng = random.Random(7)
        seqs, log, n_steps, now = {}, [], 0, 0.0
        for r in reqs[:4]:
            core.add_request(r)
            seqs[r.request_id] = core.scheduler.requests[r.request_id]
        while core.has_work() or n_steps < late_at:
            if n_steps == late_at:
                core.add_request(reqs[4])
                seqs["r4"] = core.scheduler.requests["r4"]
            durs = core.decode_run(100) if bulk else []
            if durs:
                limit = late_at - n_steps if n_steps < late_at else len(durs)
                k = min(len(durs), limit, rng.randint(1, len(durs)))
                for d in durs[:k]:
                    now += d
                ids = core.commit_decode_run(k, now)
                log.append((round(now, 9), sorted(ids), k))
                n_steps += k
            else:
                outs, d = core.step(now)
                now += d
                for o in outs:
                    log.append((round(now, 9), [o.request_id], o.finish_reason))
                n_steps += 1
            batch = core.take_kv_batch()
            if batch is not None:
                log.append(batch.events)
        return {k: s.token_ids for k, s in seqs.items()}, now, n_steps, log

    tokens, end, n_steps, log = drive(bulk=False)
    b_tokens, b_end, b_steps, b_log = drive(bulk=True)
    assert b_tokens == tokens and b_steps == n_steps
    assert b_end == end  # same float sums in the same order
    finishes = [e for e in log if isinstance(e, tuple) and e[2] == "length"]
    assert [e for e in b_log if isinstance(e, tuple) and e[2] == "length"] == finishes
    assert len(finishes) == 5
    events = [e for e in log if isinstance(e, list)]
    assert [e for e in b_log if isinstance(e, list)] == events and events
    assert len(b_log) < len(log)  # runs really were taken in bulk


def test_decode_horizon_stops_before_anything_visible():
    s = make(block_size=4, num_blocks=64)
    s.add_request(request("a", [1, 2, 3, 4, 5, 6], max_tokens=20))
    plan = s.schedule()
    s.update(plan, [9])  # prompt done, first token: 7 tokens, 6 computed, 2 blocks
    # steps compute positions 6, 7 (fills block 2: registered -> stop before it)
    assert s.decode_horizon(100) == 1
    assert s.decode_horizon(0) == 0
    s.add_request(request("b", [7, 8]))
    assert s.decode_horizon(100) == 0  # someone waits: the next step admits it


def test_cache_chain_equals_block_by_block_registration():
    """The scheduler registers a chunk's full blocks with one `cache_chain` call: same
    registrations and events as `cache_block` per block, skips and chain breaks included."""
    from genset.kv.block_pool import BlockPool

    def pool_with_history() -> BlockPool:
        p = BlockPool(16, 4)
        dup = p.allocate(1)
        p.cache_block(dup[0], 103, 102)  # another block already holds hash 103
        p.allocate(5)
        p.cache_block(6, 999, None)  # block 6 already has a hash
        return p

    ids, hashes = [1, 2, 3, 4, 5, 6], [100, 101, 102, 103, 104, 105]
    a, b = pool_with_history(), pool_with_history()
    parent = 77
    for bid, h in zip(ids, hashes, strict=True):
        a.cache_block(bid, h, parent)
        parent = h
    b.cache_chain(ids, hashes, 77)
    assert b.cached_hashes() == a.cached_hashes() == {999, 100, 101, 102, 103, 104}
    assert b.drain_events() == a.drain_events()
    b.check_invariants()


def test_sampling_spec_and_chunks_carry_what_penalties_and_min_tokens_need():
    from proto.generate import SamplingParams

    s = make(eos_token_ids=(3, 9))
    plain = s.add_request(request("plain", [5, 6, 7], 4, min_tokens=2)).sampling  # EOS ignored
    assert not plain.processed and plain.banned_until_min == ()
    spec = s.add_request(EngineRequest(
        "pen", [5, 6, 7], SamplingParams(presence_penalty=0.5, logit_bias={"4": -1.0}),
        StopConditions(max_tokens=4, stop_token_ids=[11], min_tokens=2))).sampling
    assert spec.processed and spec.logit_bias == {4: -1.0} and spec.presence_penalty == 0.5
    assert spec.banned_until_min == (3, 9, 11) and spec.min_tokens == 2
    lp = s.add_request(EngineRequest("lp", [1, 2], SamplingParams(logprobs=2))).sampling
    assert lp.logprobs == 2 and not lp.processed

    plan = s.schedule()
    for c in plan.chunks:
        seq = s.requests[c.seq_id]
        assert c.seq_tokens is seq.token_ids and c.prompt_len == seq.prompt_len


def test_drop_foreign_takes_out_the_import_and_what_was_computed_over_it():
    """A request over imported KV that ends on non-finite values (the torch engine calls
    `drop_foreign` for it): its blocks from the first imported one on leave the cache, with
    every block chained below them (another request's too), and later imports of those
    hashes stop there; the prefix computed here before the import stays cached."""
    from genset.kv.block_pool import FOREIGN

    prompt = list(range(40))  # 10 blocks of 4
    hashes = block_hashes(prompt, 4)
    s = make(max_batch_tokens=128)
    replica = HashSetReplica()
    s.add_request(request("own", prompt[:9], 1))  # blocks 0-1 computed here
    run(s, replica)
    assert s.import_kv(hashes[2:6], parent_hash=hashes[1], pin_for="bad") != []
    s.add_request(request("bad", prompt, 4))
    longer = prompt + list(range(100, 112))  # the same prefix, 3 blocks further
    s.add_request(request("longer", longer, 4))
    plan = s.schedule()
    s.update(plan, [next_token(c) if c.sample else None for c in plan.chunks])
    bad, other = s.requests["bad"], s.requests["longer"]
    assert bad.foreign_from == 2 and other.foreign_from == 2
    pool = s.pool
    # what they computed over the import is marked like it, the own prefix is not
    assert [bool(pool.marks[pool.block_of(h)] & FOREIGN) for h in hashes] == [False] * 2 + [True] * 8

    dropped = s.drop_foreign(bad)
    longer_hashes = block_hashes(longer, 4)
    assert set(dropped) == set(longer_hashes[2:])  # "longer"'s own blocks descend from them
    assert pool.cached_hashes() == set(hashes[:2])
    assert s.num_foreign_dropped == 11 and set(s.distrusted) == set(dropped)
    assert s.drop_foreign(other) == []  # already gone
    assert s.import_kv(hashes[2:6], parent_hash=hashes[1]) == []  # distrusted: not written
    s.abort("bad")
    s.abort("longer")
    s.add_request(request("again", prompt, 1))
    assert run(s, replica)["again"][2] == 8  # only the prefix computed here was a hit
    assert replica.hashes == pool.cached_hashes() >= set(hashes)
    assert s.import_kv(hashes[2:6], parent_hash=hashes[1]) == []  # cached here (computed)
    assert not any(pool.marks[pool.block_of(h)] & FOREIGN for h in hashes)


# ---- pins of queued imports: what they yield, and to whom -------------------------------------


def _step(s: Scheduler) -> list:
    plan = s.schedule()
    outs = s.update(plan, [next_token(c) if c.sample else None for c in plan.chunks])
    s.pool.check_invariants()
    return outs


def test_a_head_that_cannot_fit_leaves_the_pins_behind_it_alone():
    """The head of the queue cannot fit beside the running request even if every pin behind
    it went: it waits, and the import queued behind it keeps its blocks and is used. Before,
    the head released those pins at every step it waited, and its admission then evicted
    them unused (a 128-block mocker cache: thousands of blocks onboarded for 0 cached
    tokens)."""
    s = make(num_blocks=32, max_batch_tokens=256)
    s.add_request(request("a", [1000 + i for i in range(80)], max_tokens=6))  # 20 blocks
    _step(s)
    assert s.pool.num_free == 12
    s.add_request(request("h", [2000 + i for i in range(60)], max_tokens=2))  # 15 blocks
    r_prompt = [3000 + i for i in range(41)]  # 10 full blocks, 8 of them imported
    assert len(s.import_kv(block_hashes(r_prompt, 4)[:8], pin_for="r")) == 8
    s.add_request(request("r", r_prompt, max_tokens=2))
    for _ in range(3):  # h waits (4 free + 8 pinned < 15); r's pins stay
        _step(s)
        assert [q.request_id for q in s.waiting] == ["h", "r"]
        assert s.num_pinned_blocks == 8
    res = run(s)
    assert res["r"][2] == 32  # its 8 imported blocks, used
    assert s.pool.num_imports_evicted_unused == 0
    assert s.num_pinned_blocks == 0


def test_pins_yield_only_the_blocks_that_make_room_newest_first_from_the_tail():
    s = make(num_blocks=32, max_batch_tokens=256)
    s.add_request(request("a", [1000 + i for i in range(60)], max_tokens=2))  # 15 blocks
    _step(s)  # a: 15 blocks (its first decode takes a 16th next step)
    assert s.pool.num_free == 17
    old = block_hashes([3000 + i for i in range(25)], 4)[:6]
    new = block_hashes([4000 + i for i in range(25)], 4)[:6]
    s.import_kv(old, pin_for="old")
    s.import_kv(new, pin_for="new")
    assert s.pool.num_free == 5
    s.add_request(request("h", [2000 + i for i in range(23)], max_tokens=1))  # 6 blocks
    outs = _step(s)  # a's decode takes 1, h needs 6: 4 free + the last 2 of the newest pins
    assert [o.finish_reason for o in outs if o.request_id == "h"] == ["length"]  # admitted
    assert s.num_pinned_blocks == 10
    assert len(s._pins["old"]) == 6
    assert s.pool.lookup(old) == s._pins["old"]
    assert len(s.pool.lookup(new)) == 4  # the chain's head stays, still a prefix
    assert s.pool.num_imports_evicted_unused == 2  # the two h took (nothing else)


def test_a_running_request_growing_takes_pinned_blocks_before_anyone_is_preempted():
    s = make(num_blocks=16, max_batch_tokens=256)
    s.add_request(request("a", [1000 + i for i in range(24)], max_tokens=6))  # 6 blocks
    _step(s)
    pinned = block_hashes([3000 + i for i in range(40)], 4)[:9]
    s.import_kv(pinned, pin_for="r")
    assert s.pool.num_free == 1
    s.add_request(request("r", [3000 + i for i in range(40)], max_tokens=2))
    for _ in range(5):  # a's decodes take the free block, then r's last pinned block
        _step(s)
    assert s.num_preemptions == 0
    assert len(s._pins["r"]) == 8
    res = run(s)
    assert res["r"][2] == 8 * 4  # what r kept pinned it used
    assert s.pool.num_imports_evicted_unused == 1
    assert s.num_pinned_blocks == 0 and s.pool.num_used == 0


def _shared_prefix_prompt(rng: random.Random, prefixes: list[list[int]]) -> list[int]:
    """Part of one of `prefixes` (8-39 tokens) and 1-19 tokens of its own."""
    return prefixes[rng.randrange(len(prefixes))][: rng.randrange(8, 40)] + [
        rng.randrange(3, 50) for _ in range(rng.randrange(1, 20))]


def test_pins_and_running_requests_beyond_the_cache_neither_deadlock_nor_leak():
    """Imports pinned for queued requests plus the running requests' growth exceed a small
    cache again and again; some requests are aborted while waiting: every request finishes
    (a bounded number of steps, never a stall), every pin is released (admitted, aborted,
    or yielded), the pool's books stay balanced."""
    rng = random.Random(5)
    s = make(num_blocks=24, max_batch_tokens=32, max_running=4, context_length=96)
    prefixes = [[rng.randrange(3, 50) for _ in range(40)] for _ in range(3)]
    live: set[str] = set()
    aborted: set[str] = set()
    done: set[str] = set()
    n = 0
    for _ in range(3000):
        if n < 60 and len(live) < 6:
            p = _shared_prefix_prompt(rng, prefixes)
            rid = f"q{n}"
            n += 1
            hashes = block_hashes(p, 4)
            k = rng.randrange(0, len(hashes) + 1)
            if k:
                s.import_kv(hashes[:k], pin_for=rid)
            s.add_request(request(rid, p, max_tokens=rng.randrange(1, 40)))
            live.add(rid)
        if live and rng.random() < 0.03:
            victim = rng.choice(sorted(live))
            if s.requests[victim].status == 0:  # waiting: its pins go with it
                assert s.abort(victim)
                live.discard(victim)
                aborted.add(victim)
                assert victim not in s._pins
        if not s.has_work() and n >= 60:
            break
        for out in _step(s):
            if out.finish_reason is not None:
                live.discard(out.request_id)
                done.add(out.request_id)
    else:
        raise AssertionError("stalled")
    assert done | aborted == {f"q{i}" for i in range(60)} and not live
    # (the edge was there: running requests preempted, pinned blocks yielded and evicted)
    assert s.num_preemptions > 0 and s.pool.num_imports_evicted_unused > 0
    assert s.num_pinned_blocks == 0 and not s._pins
    assert s.pool.num_used == 0


def test_import_room_leaves_the_queue_ahead_its_prompts():
    s = make(num_blocks=32, max_batch_tokens=256)
    s.add_request(request("a", [1000 + i for i in range(40)], max_tokens=4))  # 10 blocks
    _step(s)  # + 1 block for its first decode
    assert s.import_room() == 21
    s.add_request(request("h", [2000 + i for i in range(49)], max_tokens=1))  # 13 blocks
    assert s.import_room() == 21 - 13  # what h needs stays free for h
    s.add_request(request("g", [2500 + i for i in range(20)], max_tokens=1))  # 5: h's counts
    assert s.import_room() == 8
    prompt = [3000 + i for i in range(60)]  # 15 blocks, 8 imported and pinned
    s.import_kv(block_hashes(prompt, 4)[:8], pin_for="r")
    s.add_request(request("r", prompt, max_tokens=1))
    assert s.import_room() == 0  # 13 free, h needs 13


def test_held_and_pinned_imports_under_pressure_always_leave_each_block_the_right_kv():
    """A small cache, running requests growing, imports pinned for queued requests and runs
    held for them in host memory (`hold_kv`: some true, some after a gap, some naming a
    wrong hash), requests aborted while waiting. A model of what each physical block holds
    (computed by a chunk, imported, or written from a held run at admission) checks every
    scheduled chunk: each full block below what it has computed holds the KV of the
    prompt's own hash there. And nothing stalls or leaks: held bytes, pins and blocks all
    come back."""
    rng = random.Random(11)
    bs = 4
    s = make(num_blocks=24, max_batch_tokens=32, max_running=4, context_length=96)
    s.max_held_bytes = 40  # (each held block counts 1 here)
    prefixes = [[rng.randrange(3, 50) for _ in range(40)] for _ in range(3)]
    content: dict[int, int] = {}  # physical block -> the hash whose KV it holds
    live: set[str] = set()
    n = 0
    for _ in range(4000):
        if n < 80 and len(live) < 6:
            p = _shared_prefix_prompt(rng, prefixes)
            rid = f"q{n}"
            n += 1
            hashes = block_hashes(p, bs)[: (len(p) - 1) // bs]
            mode = rng.randrange(4)
            k = rng.randrange(0, len(hashes) + 1)
            if mode == 1 and k:
                for h, b in s.import_kv(hashes[:k], pin_for=rid):
                    content[b] = h
            s.add_request(request(rid, p, max_tokens=rng.randrange(1, 30)))
            if mode >= 2 and hashes:
                first = rng.randrange(0, len(hashes))
                run_ = list(hashes[first:])
                if mode == 3:  # one block claimed under the wrong hash
                    run_[rng.randrange(len(run_))] ^= 1
                s.hold_kv(rid, first, run_, list(run_), [1] * len(run_))
            live.add(rid)
        if live and rng.random() < 0.03:
            victim = rng.choice(sorted(live))
            if s.requests[victim].status == 0:
                assert s.abort(victim)
                live.discard(victim)
        if not s.has_work() and n >= 80:
            break
        plan = s.schedule()
        for b, payload in s.kv_writes:  # what the core writes before the step
            content[b] = payload
        s.kv_writes.clear()
        for c in plan.chunks:  # what the step computes
            true = block_hashes(c.seq_tokens[: c.start_pos + len(c.token_ids)], bs)
            for i in range(c.start_pos // bs, (c.start_pos + len(c.token_ids)) // bs):
                content[c.block_table[i]] = true[i]
        for c in plan.chunks:  # every full block the chunk's sequence attends to is right
            true = block_hashes(c.seq_tokens[: c.start_pos + len(c.token_ids)], bs)
            for i, h in enumerate(true):
                assert content.get(c.block_table[i]) == h, (c.seq_id, i)
        for out in s.update(plan, [next_token(c) if c.sample else None for c in plan.chunks]):
            if out.finish_reason is not None:
                live.discard(out.request_id)
        s.pool.check_invariants()
    else:
        raise AssertionError("stalled")
    assert not live
    # (the edges were there: held blocks used, and some refused for a gap or a wrong hash)
    assert 0 < s.num_held_used < s.num_held_blocks
    assert s.held_bytes == 0 and s.num_pinned_blocks == 0 and not s._pins
    assert s.pool.num_used == 0


def test_waiting_prefill_tokens_count_a_held_run_and_the_pins_it_overlaps_once():
    s = make(num_blocks=64)
    prompt = [4000 + i for i in range(41)]  # 10 full blocks of 4, + 1 token
    hashes = block_hashes(prompt, 4)
    s.import_kv(hashes[:3], pin_for="r")  # the room: 3 blocks pinned
    s.add_request(request("r", prompt, max_tokens=1))
    assert s.waiting_prefill_tokens() == 41 - 3 * 4
    s.max_held_bytes = 100
    assert s.hold_kv("r", 0, hashes[:6], [0] * 6, [1] * 6) == 6  # the run, its head too
    assert s.waiting_prefill_tokens() == 41 - 6 * 4
    res = run(s)
    assert res["r"][2] == 6 * 4 and s.held_bytes == 0 and s.num_held_used == 3
