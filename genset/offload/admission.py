"""Which evicted KV blocks a worker ships to the offload store: an admission rule.

Write-behind of every evicted block (the store's first design) also ships the blocks of
generated tokens, which a later request's prompt almost never continues in the serving
benchmarks (a new request's prompt is its own text; in the shared-prefix aiperf profile of
docs/benchmarks.md, Issue 15, the store had received 1,294 blocks and served 153). Each
shipped block is a copy out of the engine, part of a NATS put and its reply, the store's work
and a store event batch every router follows.

The rule, `admit_block`: ship a block unless it holds generated tokens and was never taken
again while it was cached. So every prompt block goes (shared prefixes, a conversation's
history, a document: what the store's lookups serve), and a generated block goes once
something reused it on the worker (a later turn that hit it there). LMCache makes the same
call by default (`save_decode_cache`, off: the KV computed while decoding is not stored).

The cost: a conversation's latest reply, evicted before the next turn reaches the worker
that holds it, is computed again as part of that turn's prompt (then it is a prompt block,
and shipped when evicted). `mode="all"` ships every block, as before.

Stateless: the pool marks each cached block (`genset.kv.block_pool.REUSED`, `GENERATED`)
and the engine's core asks `admit(hash, marks)` before it reads a block's KV.
"""

from __future__ import annotations

from genset.kv.block_pool import GENERATED, REUSED

ADMIT_MODES = ("prompt", "all")


def admit_block(marks: int) -> bool:
    """The rule (pure): ship a block unless it holds generated tokens (GENERATED) and was
    never taken again while cached (no REUSED)."""
    return bool(marks & REUSED) or not marks & GENERATED


def admit_prompt(block_hash: int, marks: int) -> bool:
    """`admit_block` in the eviction sink's signature (`admit(hash, marks)`)."""
    return admit_block(marks)


def admission(mode: str):
    """The sink's `admit` for `mode` ("prompt": `admit_prompt`; "all": None, every block)."""
    if mode not in ADMIT_MODES:
        raise ValueError(f"offload admission must be one of {ADMIT_MODES}, got {mode!r}")
    return admit_prompt if mode == "prompt" else None
