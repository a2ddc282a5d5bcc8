"""Evicted blocks handed over with their KV (genset.engines.core `set_eviction_sink`), before
the engine reuses their memory: what the worker's write-behind to the offload store needs.
Both executors; the driver's bounded hand-over to the event loop."""

from __future__ import annotations

import pytest

import proto
from genset.engines.core import evicted_size
from genset.engines.driver import EvictionHandover
from genset.engines.mocker import MockerConfig, MockerCore, mock_payload, mock_payload_bytes
from genset.engines.types import EvictedBlock, KvImport
from genset.kv.hashing import block_hashes, chain_hash, local_block_hash
from tests.test_engine_core import BS, make_core, prompt_of, req


class Sink:
    """An EvictionSink with a byte budget per hand-over."""

    def __init__(self, room: int = 1 << 30) -> None:
        self._room = room
        self.blocks: list[EvictedBlock] = []
        self.dropped = 0

    def room(self) -> int:
        return self._room

    def put(self, blocks, dropped) -> None:
        self.blocks.extend(blocks)
        self.dropped += dropped


def run(core, rid: str, prompt: list[int], max_tokens: int = 2) -> list[int]:
    """Runs the core until it is idle; the token ids it generated."""
    core.add_request(req(rid, prompt, max_tokens=max_tokens))
    out: list[int] = []
    while core.has_work():
        outs, _ = core.step()
        out += [t for o in outs for t in o.token_ids]
    return out


def check_chain(block: EvictedBlock, prompts: list[list[int]]) -> None:
    assert block.token_ids is not None and len(block.token_ids) == 4 * BS
    local = local_block_hash(proto.unpack_tokens(block.token_ids))
    assert chain_hash(block.parent_hash, local) == block.hash
    assert any(block.hash in block_hashes(p, BS) for p in prompts)


@pytest.mark.parametrize("kind", ["mocker", "torch"])
def test_evicted_blocks_come_with_their_kv_before_reuse(kind):
    core = make_core(kind, num_blocks=16)
    sink = Sink()
    core.set_eviction_sink(sink)
    first = prompt_of(1, 6 * BS + 3)  # 6 full blocks
    run(core, "a", first)
    # what those blocks hold, read while they are still cached
    before = {b.hash: b.data for b in core.export_kv(block_hashes(first, BS))}
    assert len(before) == 6
    others = [prompt_of(10 + i, 6 * BS + 3) for i in range(3)]
    for i, p in enumerate(others):
        run(core, f"o{i}", p)
    assert sink.blocks and sink.dropped == 0
    assert not {b.hash for b in sink.blocks} & core.pool.cached_hashes()
    for b in sink.blocks:
        check_chain(b, [first, *others])
    mine = [b for b in sink.blocks if b.hash in before]
    assert mine, "the first prompt's blocks were evicted"
    for b in mine:
        assert b.data == before[b.hash]  # exactly the KV computed, not what replaced it
    # a block that comes back (onboarded) computes the same output as before
    assert core.evictions_handed == len(sink.blocks)


def test_without_a_sink_nothing_is_recorded_or_kept():
    core = MockerCore(MockerConfig(block_size=BS, num_blocks=8, vocab_size=4096))
    for i in range(4):
        run(core, f"r{i}", prompt_of(i, 5 * BS))
    assert core.pool.evicted is None
    assert all(t is None for t in core.pool._tokens)
    sink = Sink()
    core.set_eviction_sink(sink)
    core.set_eviction_sink(None)
    run(core, "x", prompt_of(99, 5 * BS))
    assert not sink.blocks and core.pool.evicted is None


def test_room_bounds_what_is_read_and_the_rest_is_counted():
    core = MockerCore(MockerConfig(block_size=BS, num_blocks=8, vocab_size=4096,
                                   kv_bytes_per_token=100))
    per_block = len(mock_payload(0)) + 4 * BS + 128
    sink = Sink(room=2 * per_block)
    core.set_eviction_sink(sink)
    for i in range(4):
        run(core, f"r{i}", prompt_of(i, 7 * BS + 1))
    assert sink.dropped > 0 and core.evictions_dropped == sink.dropped
    assert sink.blocks
    for b in sink.blocks:
        assert mock_payload_bytes(b.data, 0) == 100 * BS  # the modelled size travels
        assert evicted_size(b) <= per_block


def test_import_evicting_hands_the_victims_over_before_writing():
    core = make_core("mocker", num_blocks=8)
    sink = Sink()
    core.set_eviction_sink(sink)
    run(core, "a", prompt_of(1, 7 * BS + 1))  # 7 blocks cached, free
    other = prompt_of(2, 5 * BS)
    hashes = block_hashes(other, BS)
    blocks = core.export_kv(hashes)  # nothing: not held
    assert blocks == []
    from genset.engines.types import KvBlockData

    n = core.import_kv(KvImport([KvBlockData(h, mock_payload(0)) for h in hashes]))
    assert n == 5
    assert len(sink.blocks) >= 4  # 8 blocks, 7 cached: 4+ of them made room


def test_handover_is_bounded_in_bytes_and_thread_safe_to_take():
    h = EvictionHandover(max_bytes=1000)
    blk = EvictedBlock(1, None, b"\0" * 64, b"x" * 300)
    assert h.room() == 1000
    h.put([blk], dropped=0)
    assert h.pending == 1 and h.pending_bytes == evicted_size(blk) == 492
    assert h.room() == 1000 - 492
    h.put([], dropped=3)
    assert h.dropped == 3
    assert h.take() == [blk] and h.pending == 0 and h.room() == 1000


def _greedy(core, rid, prompt, kv=None, max_tokens=6):
    core.add_request(req(rid, prompt, kv=kv, max_tokens=max_tokens))
    tokens, cached = [], None
    while core.has_work():
        for out in core.step()[0]:
            if out.request_id == rid:
                tokens.extend(out.token_ids)
                cached = out.cached_tokens
    return tokens, cached


def _finish_all(core, max_steps: int = 500) -> dict[str, int]:
    """Steps `core` until idle (a bound on steps, not a timing: a stall fails); each finished
    request's cached prompt tokens."""
    cached = {}
    for _ in range(max_steps):
        if not core.has_work():
            return cached
        for out in core.step()[0]:
            if out.finish_reason:
                cached[out.request_id] = out.cached_tokens
    raise AssertionError(f"still working after {max_steps} steps")


def test_torch_blocks_evicted_then_imported_give_the_computed_output():
    pytest.importorskip("torch")
    from genset.engines.types import KvBlockData

    prompt = prompt_of(5, 5 * BS + 3)
    want, _ = _greedy(make_core("torch"), "ref", prompt)
    core = make_core("torch", num_blocks=12)
    sink = Sink()
    core.set_eviction_sink(sink)
    _greedy(core, "a", prompt)
    for i in range(3):
        _greedy(core, f"o{i}", prompt_of(20 + i, 7 * BS))
    hashes = block_hashes(prompt, BS)
    assert core.cached_prefix(hashes) == 0  # all gone from the engine
    by_hash = {b.hash: b for b in sink.blocks}
    run_ = [by_hash[h] for h in hashes]
    kv = KvImport([KvBlockData(b.hash, b.data) for b in run_])
    for name, target in (("same", core), ("other", make_core("torch", num_blocks=12))):
        got, cached = _greedy(target, f"back-{name}", prompt, kv=kv)
        assert cached == 5 * BS, name
        assert got == want, name


def test_queued_imports_never_stall_the_request_ahead_of_them():
    """Onboarded blocks are pinned until their request runs; a queue of such requests could
    hold the whole pool while the head waits for blocks. The scheduler releases the pins of
    later requests (newest first) instead, and every request finishes."""
    from genset.engines.types import KvBlockData

    core = MockerCore(MockerConfig(block_size=BS, num_blocks=16, vocab_size=4096,
                                   max_batch_tokens=4 * BS))
    prompts = [prompt_of(40 + i, 6 * BS + 1) for i in range(4)]
    for i, p in enumerate(prompts):
        kv = KvImport([KvBlockData(h, mock_payload(0)) for h in block_hashes(p, BS)[:5]])
        core.add_request(req(f"q{i}", p, kv=kv, max_tokens=3))
    done = set()
    for _ in range(500):  # a bound, not a timing: a stall would spin without finishing
        if not core.has_work():
            break
        for out in core.step()[0]:
            if out.finish_reason:
                done.add(out.request_id)
    assert done == {f"q{i}" for i in range(4)}
    assert not core.scheduler._pins
    core.pool.check_invariants()


@pytest.mark.parametrize("kind", ["mocker", "torch"])
def test_an_import_queued_behind_a_head_that_cannot_fit_is_kept_and_used(kind):
    """Both engines (one scheduler): the head of the queue cannot fit beside the running
    request even with the pins behind it, so it leaves them alone, and the import queued
    behind it is used when its turn comes, with the output of computing the prompt. Before,
    the head released them at every step it waited and its admission evicted them."""
    from tests.test_engine_core import exported

    prompt = prompt_of(60, 8 * BS + 1)
    want, _ = _greedy(make_core(kind), "computed", prompt)
    kv = KvImport(exported(kind, prompt), token_ids=prompt)  # (a transfer's: not optional)
    core = make_core(kind, num_blocks=24)
    core.add_request(req("a", prompt_of(61, 12 * BS), max_tokens=6))
    core.step()  # a holds 12 blocks
    core.add_request(req("h", prompt_of(62, 13 * BS)))  # 13 blocks: 12 free, it waits
    got, cached = _greedy(core, "r", prompt, kv=kv)  # 8 pinned: h cannot fit with them
    assert cached == 8 * BS
    assert got == want
    assert core.pool.num_imports_evicted_unused == 0
    assert core.scheduler.num_pinned_blocks == 0
    core.pool.check_invariants()


def test_an_optional_import_takes_only_the_room_the_queue_ahead_leaves():
    """An offload hit (`KvImport.optional`) is imported only as far as the blocks the
    requests ahead of it still need leave room (`Scheduler.import_room`); the rest is
    dropped and counted, and what is imported is used. A transfer's KV (not optional) is
    imported as far as the pool takes it, as before (and yields to the queue ahead)."""
    from genset.engines.types import KvBlockData

    core = MockerCore(MockerConfig(block_size=BS, num_blocks=32, vocab_size=4096,
                                   max_batch_tokens=64 * BS))
    core.add_request(req("a", prompt_of(50, 12 * BS), max_tokens=4))
    core.step()  # a holds 12 blocks: 20 free
    core.add_request(req("h", prompt_of(51, 14 * BS)))  # fits beside a
    core.step()
    # the free blocks less the block h's first decode will take (a has its next one)
    assert core.scheduler.import_room() == core.pool.num_free - 1 == 4

    def hit(seed: int, n: int, optional: bool) -> tuple[list[int], KvImport]:
        p = prompt_of(seed, n * BS + 1)
        return p, KvImport([KvBlockData(h, mock_payload(0)) for h in block_hashes(p, BS)],
                           token_ids=p, optional=optional)

    core.add_request(req("w", prompt_of(52, 4 * BS)))  # queued: 4 blocks ahead of r
    assert core.scheduler.import_room() == 4 - 4
    core.add_request(req("w2", prompt_of(55, 1 * BS)))  # (the largest need ahead counts)
    assert core.scheduler.import_room() == 0
    p, kv = hit(53, 6, optional=True)
    core.add_request(req("r", p, kv=kv))
    assert core.import_blocks_no_room == 6
    assert core.scheduler.num_pinned_blocks == 0
    p2, kv2 = hit(54, 3, optional=False)  # a transfer's: what the pool takes
    core.add_request(req("t", p2, kv=kv2))
    assert core.import_blocks_no_room == 6
    assert core.scheduler.num_pinned_blocks == 3
    cached = _finish_all(core)
    assert cached["r"] == 0  # nothing imported for it: computed
    # the transfer's blocks were taken by the requests ahead when they needed the room
    # (a pin never stalls them): pinned beyond the room, they went unused
    assert cached["t"] == 0 and core.pool.num_imports_evicted_unused == 3
    assert core.scheduler.num_pinned_blocks == 0
    core.pool.check_invariants()


def test_blocks_the_sink_already_has_are_not_read():
    core = MockerCore(MockerConfig(block_size=BS, num_blocks=8, vocab_size=4096))
    first = prompt_of(1, 7 * BS + 1)
    skip = set(block_hashes(first, BS)[:3])  # e.g. onboarded from the store
    sink = Sink()
    sink.known = skip.__contains__
    core.set_eviction_sink(sink)
    run(core, "a", first)
    run(core, "b", prompt_of(2, 7 * BS + 1))
    handed = {b.hash for b in sink.blocks}
    assert handed and not handed & skip
    assert core.evictions_known == 3


@pytest.mark.parametrize("first", [0, 2])
def test_imported_blocks_with_their_tokens_are_evicted_with_them(first):
    """`KvImport.token_ids` (an offload hit's or a remote prefill's prompt): the imported
    blocks keep their slices of it, and their eviction hands them over with them, checkable
    against their hashes (the offload store verifies the put); from `first_block` on."""
    from genset.engines.types import KvBlockData

    core = make_core("mocker", num_blocks=8)
    sink = Sink()
    core.set_eviction_sink(sink)
    prompt = prompt_of(3, 6 * BS + 1)
    hashes = block_hashes(prompt, BS)
    parent = hashes[first - 1] if first else None
    blocks = [KvBlockData(h, mock_payload(0)) for h in hashes[first:]]
    n = core.import_kv(KvImport(blocks, parent, token_ids=prompt, first_block=first))
    assert n == 6 - first
    for i in range(3):  # pushes every imported block out
        run(core, f"o{i}", prompt_of(20 + i, 7 * BS + 1))
    mine = [b for b in sink.blocks if b.hash in set(hashes[first:])]
    assert len(mine) == 6 - first
    for b in mine:
        check_chain(b, [prompt])


def test_imported_blocks_without_tokens_or_short_tokens_are_evicted_without():
    """No tokens given (the TensorRT-LLM path, an old importer) or too few for a block:
    nothing is kept for that block, as before (the store counts it unverified)."""
    from genset.engines.types import KvBlockData

    core = make_core("mocker", num_blocks=8)
    sink = Sink()
    core.set_eviction_sink(sink)
    prompt = prompt_of(4, 4 * BS)
    hashes = block_hashes(prompt, BS)
    core.import_kv(KvImport([KvBlockData(h, mock_payload(0)) for h in hashes[:2]]))
    # tokens that cover the third block but not the fourth
    core.import_kv(KvImport([KvBlockData(h, mock_payload(0)) for h in hashes[2:]], hashes[1],
                            token_ids=prompt[: 3 * BS + 5], first_block=2))
    for i in range(3):
        run(core, f"o{i}", prompt_of(30 + i, 7 * BS + 1))
    got = {b.hash: b.token_ids for b in sink.blocks if b.hash in set(hashes)}
    assert set(got) == set(hashes)
    assert got[hashes[0]] is None and got[hashes[1]] is None and got[hashes[3]] is None
    assert got[hashes[2]] == proto.pack_tokens(prompt[2 * BS : 3 * BS])


def test_imported_tokens_are_not_kept_without_a_sink_that_wants_them():
    from genset.engines.types import KvBlockData

    core = make_core("mocker", num_blocks=8)
    prompt = prompt_of(5, 3 * BS)
    hashes = block_hashes(prompt, BS)
    core.import_kv(KvImport([KvBlockData(h, mock_payload(0)) for h in hashes],
                            token_ids=prompt))
    assert all(t is None for t in core.pool._tokens)


def _held_case(kind: str, seed: int, a_tokens: int):
    """A prompt of 8 full blocks (+1 token), its output computed, its blocks exported from
    another core; and a 24-block core that holds onboarded blocks, with request "a" (12
    blocks, `a_tokens` out) submitted."""
    from tests.test_engine_core import exported

    prompt = prompt_of(seed, 8 * BS + 1)
    want, _ = _greedy(make_core(kind), "computed", prompt)
    blocks = exported(kind, prompt)
    core = make_core(kind, num_blocks=24)
    core.scheduler.max_held_bytes = 1 << 20
    core.add_request(req("a", prompt_of(seed + 1, 12 * BS), max_tokens=a_tokens))
    return prompt, want, blocks, core


@pytest.mark.parametrize("kind", ["mocker", "torch"])
def test_an_optional_import_beyond_the_room_waits_in_host_memory_until_admission(kind):
    """Both engines (one scheduler): an offload hit with no room in the cache beside the
    queue ahead is held in host memory (`Scheduler.hold_kv`), not dropped; its admission
    writes it into the blocks it allocates, and the output is the computed one. The held
    bytes are bounded and given back."""
    from genset.kv.block_pool import FOREIGN

    prompt, want, blocks, core = _held_case(kind, 70, a_tokens=6)
    sched = core.scheduler
    core.step()  # a holds 12 blocks
    core.add_request(req("h", prompt_of(72, 13 * BS)))  # 13 blocks: 12 free, it waits
    assert sched.import_room() == 0
    kv = KvImport(blocks, token_ids=prompt, optional=True)
    got, cached = _greedy(core, "r", prompt, kv=kv)
    assert cached == 8 * BS  # every full block from the store, none computed
    assert got == want
    assert core.import_blocks_no_room == 0
    assert sched.num_held_blocks == 8 and sched.num_held_used == 8
    assert sched.held_bytes == 0 and sched.num_pinned_blocks == 0
    # cached under the prompt's hashes, marked as KV that came from outside
    for h in block_hashes(prompt, BS):
        b = core.pool.block_of(h)
        assert b is not None and core.pool.marks[b] & FOREIGN
    core.pool.check_invariants()


def test_held_blocks_are_bounded_in_bytes_and_dropped_when_they_no_longer_continue_the_cache():
    """The budget takes a held run's leading blocks that fit; a request aborted gives its
    bytes back; held blocks after a gap (the head they continue was evicted) are not used,
    and the prompt is computed from there."""
    from genset.engines.core import held_size
    from genset.engines.types import KvBlockData

    core = MockerCore(MockerConfig(block_size=BS, num_blocks=24, vocab_size=4096,
                                   max_batch_tokens=64 * BS))
    sched = core.scheduler
    p = prompt_of(80, 6 * BS + 1)
    hashes = block_hashes(p, BS)
    run_ = [KvBlockData(h, mock_payload(0)) for h in hashes]
    sched.max_held_bytes = 4 * held_size(core.executor, run_[0], 0)  # four of the six
    core.add_request(req("a", prompt_of(81, 12 * BS), max_tokens=6))
    core.step()
    core.add_request(req("h", prompt_of(82, 13 * BS)))
    assert sched.import_room() == 0
    core.add_request(req("r", p, kv=KvImport(run_, token_ids=p, optional=True)))
    assert sched.num_held_blocks == 4 and sched.held_bytes == sched.max_held_bytes
    assert core.import_blocks_no_room == 2
    assert sched.hold_room_bytes() == 0
    core.abort_request("r")
    assert sched.held_bytes == 0

    # a held run that starts after a block the cache does not have: not used
    q = prompt_of(83, 6 * BS + 1)
    qh = block_hashes(q, BS)
    sched.max_held_bytes = 1 << 20
    core.add_request(req("g", q))
    assert sched.hold_kv("g", 1, qh[1:], [0] * 5, [10] * 5) == 5
    assert sched.hold_kv("g", 1, qh[1:], [0] * 5, [10] * 5) == 0  # (one run a request)
    cached = _finish_all(core)
    assert cached["g"] == 0 and sched.num_held_used == 0 and sched.held_bytes == 0
    core.pool.check_invariants()


def test_held_blocks_that_name_other_hashes_than_the_prompts_are_not_used():
    """The scheduler takes a held block only under the prompt's own hash at that position
    (what the worker's hook asked the store for): a run naming other hashes is computed."""
    core = MockerCore(MockerConfig(block_size=BS, num_blocks=24, vocab_size=4096))
    sched = core.scheduler
    sched.max_held_bytes = 1 << 20
    p = prompt_of(90, 4 * BS + 1)
    own = block_hashes(p, BS)
    other = block_hashes(prompt_of(91, 4 * BS + 1), BS)
    core.add_request(req("x", p))
    assert sched.hold_kv("x", 0, own[:2] + other[2:], [0] * 4, [10] * 4) == 4
    assert sched.waiting_prefill_tokens() == max(1, len(p) - 4 * BS)
    out = None
    while core.has_work():
        for o in core.step()[0]:
            out = o
    assert out.cached_tokens == 2 * BS  # the two that match, then computed
    assert sched.num_held_used == 2 and sched.held_bytes == 0


@pytest.mark.parametrize("kind", ["mocker", "torch"])
def test_a_held_run_restores_the_pinned_blocks_a_running_request_took_back(kind):
    """An offload hit pinned up to the room and held whole: the running requests' growth
    takes pinned blocks back from the tail (pins never stall it) and evicts them; the
    request's admission restores them from host memory, so its whole run still comes from
    the store, with the output of computing it."""
    prompt, want, blocks, core = _held_case(kind, 100, a_tokens=6 * BS)  # a grows 6 blocks
    sched = core.scheduler
    core.step()  # a holds 12 blocks (+1 for its first decode): 11 free
    core.add_request(req("h", prompt_of(102, 6 * BS)))  # needs 6: the room is 5
    room = sched.import_room()
    assert 0 < room < len(blocks)
    core.add_request(req("r", prompt, kv=KvImport(blocks, token_ids=prompt, optional=True),
                         max_tokens=6))
    assert sched.num_pinned_blocks >= room and sched.num_held_blocks == len(blocks)
    got, cached = [], None
    for _ in range(2000):  # a bound, not a timing
        if not core.has_work():
            break
        for out in core.step()[0]:
            if out.request_id == "r":
                got.extend(out.token_ids)
                cached = out.cached_tokens
    # a's growth took pinned blocks back before r ran, and they were evicted unused ...
    assert core.pool.num_imports_evicted_unused > 0
    # ... and r's admission wrote them again from what it held
    assert cached == 8 * BS
    assert got == want
    assert sched.num_held_used > 0 and sched.held_bytes == 0
    assert sched.num_pinned_blocks == 0
    core.pool.check_invariants()
