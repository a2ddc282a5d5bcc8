"""Which evicted KV blocks a worker ships to the offload store: an admission rule.

Write-behind of every evicted block (the store's first design) ships mostly blocks nobody
reads again: a prompt's unique tail and its generated tokens, used by one request and never
seen again. In the shared-prefix benchmark (docs/benchmarks.md, Issue 15, §5j) the store
had received 1,294 blocks and served 153 of them; each put is a copy out of the engine, a
NATS message and its reply, the store's work, and a store event batch the router follows.

The rule, `admit_block`: a block goes to the store when it was **reused** while cached (a
prefix hit, a pin, an import's held ancestors took it again after it was computed) or when
its hash was **refused before** (its first eviction was refused, it was computed again and is
now evicted a second time). A block used once is refused once. That is frequency-based
admission of the kind caches use against one-hit wonders (TinyLFU's doorkeeper; SGLang's
HiCache writes a node through to host memory only after it was hit a threshold number of
times): a block must show a second use before it costs a copy and a message.

The cost: a block whose only reuse comes after its first eviction (a conversation's earlier
turn back after its blocks were evicted, with no other request sharing them meanwhile) is
computed again once; its second eviction ships it. `mode="all"` ships everything as before.

`OffloadAdmission` keeps the refused hashes, bounded (oldest forgotten first). One caller
thread (the engine's stepping thread) asks it; counters are plain ints read by metrics.
"""

from __future__ import annotations

from collections import OrderedDict

ADMIT_MODES = ("reused", "all")


def admit_block(reused: bool, refused_before: bool) -> bool:
    """The rule (pure): ship a block that was reused while cached, or whose first eviction
    was refused already (its second use is the recompute that cached it again)."""
    return bool(reused) or refused_before


class OffloadAdmission:
    """`admit_block` over a bounded memory of refused hashes (`capacity`, oldest forgotten
    first). `mode="all"`: every block is admitted and nothing is remembered."""

    def __init__(self, mode: str = "reused", capacity: int = 4096) -> None:
        if mode not in ADMIT_MODES:
            raise ValueError(f"offload admission must be one of {ADMIT_MODES}, got {mode!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.mode = mode
        self.capacity = capacity
        self._refused: OrderedDict[int, None] = OrderedDict()
        self.admitted = 0  # counters (monotonic)
        self.refused = 0

    def admit(self, block_hash: int, reused: bool) -> bool:
        """Whether to ship this evicted block; a refusal is remembered (the next eviction of
        the same hash is admitted)."""
        if self.mode == "all":
            self.admitted += 1
            return True
        seen = self._refused
        before = block_hash in seen
        if admit_block(reused, before):
            if before:
                del seen[block_hash]
            self.admitted += 1
            return True
        seen[block_hash] = None
        if len(seen) > self.capacity:
            seen.popitem(last=False)
        self.refused += 1
        return False

    def would_admit(self, block_hash: int, reused: bool) -> bool:
        """`admit`'s answer now, remembering nothing (a block copied out ahead of its
        eviction: it is still cached and may yet be reused)."""
        return self.mode == "all" or admit_block(reused, block_hash in self._refused)

    def __len__(self) -> int:
        return len(self._refused)
