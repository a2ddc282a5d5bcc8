"""Which store instance owns a block: rendezvous (highest random weight) hashing.

Every instance gets a score per block, `mix(block_hash, instance_id)`, and the highest score
owns the block. Any two clients with the same list of live instances agree without talking,
and when an instance joins or leaves only the blocks it wins or held move (about 1/n of them);
a consistent-hash ring needs virtual nodes to get the same balance. Store instances keep
their id across restarts (the disk tier persists it), so a restart moves nothing.

Block hashes are XXH3 outputs, already uniform, but the replay and tests use small
integers; the score is therefore a full 64-bit finaliser (splitmix64's) of both values, not
the block hash itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_MASK = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints with full avalanche."""
    x &= _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def score(block_hash: int, instance_id: int) -> int:
    return mix64(block_hash ^ mix64(instance_id + 0x9E3779B97F4A7C15))


class Placement:
    """The owner of each block among a fixed set of instances (build a new one when the set
    changes; building is O(n))."""

    __slots__ = ("_salts", "instances")

    def __init__(self, instances: Iterable[int]) -> None:
        self.instances: tuple[int, ...] = tuple(sorted(set(instances)))
        self._salts = [(mix64(i + 0x9E3779B97F4A7C15), i) for i in self.instances]

    def __len__(self) -> int:
        return len(self.instances)

    def owner(self, block_hash: int) -> int | None:
        """The instance that owns `block_hash`; None when there is no instance."""
        salts = self._salts
        if not salts:
            return None
        if len(salts) == 1:
            return salts[0][1]
        best = -1
        owner = salts[0][1]
        for salt, inst in salts:
            s = mix64(block_hash ^ salt)
            if s > best:
                best, owner = s, inst
        return owner

    def group(self, hashes: Sequence[int]) -> dict[int, list[int]]:
        """Positions of `hashes` per owner, each list in increasing position order."""
        out: dict[int, list[int]] = {}
        owner = self.owner
        for pos, h in enumerate(hashes):
            o = owner(h)
            if o is None:
                break
            lst = out.get(o)
            if lst is None:
                lst = out[o] = []
            lst.append(pos)
        return out
