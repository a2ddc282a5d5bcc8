"""Chained block hashing: the Dynamo-compatible byte layout and the chain properties."""

from __future__ import annotations

import struct
from array import array

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from genset.kv.hashing import (
    HASH_SEED,
    BlockHasher,
    block_hashes,
    chain_hash,
    extend_block_hashes,
    local_block_hash,
)
from proto.tokens import pack_tokens


def reference_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The documented layout, spelled out byte by byte."""
    out: list[int] = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        local = xxhash.xxh3_64_intdigest(struct.pack(f"<{block_size}I", *block), seed=1337)
        if not out:
            out.append(local)
        else:
            out.append(xxhash.xxh3_64_intdigest(struct.pack("<QQ", out[-1], local), seed=1337))
    return out


def test_seed_and_algorithm_match_dynamo_known_value():
    # Dynamo's kv-router tests pin compute_block_hash(b"test data") to this value
    # (XXH3-64 with seed 1337).
    assert HASH_SEED == 1337
    assert xxhash.xxh3_64_intdigest(b"test data", HASH_SEED) == 13226331709069118873


def test_known_values_from_byte_layout():
    tokens = list(range(1, 10))  # two full blocks of 4 and a partial one
    expected = reference_hashes(tokens, 4)
    assert len(expected) == 2
    assert block_hashes(tokens, 4) == expected
    # pinned so an accidental change of layout is caught even if the reference drifts too
    assert expected == [14643705804678351452, 4945711292740353085]
    assert expected[0] == local_block_hash([1, 2, 3, 4])
    assert expected[1] == chain_hash(expected[0], local_block_hash([5, 6, 7, 8]))


@given(st.lists(st.integers(0, 2**31 - 1), max_size=80), st.integers(1, 9))
def test_matches_reference_for_any_input(tokens, block_size):
    assert block_hashes(tokens, block_size) == reference_hashes(tokens, block_size)


def test_input_forms_agree():
    tokens = [7, 0, 150000, 3, 2**31 - 1, 42, 9, 9] * 5
    want = block_hashes(tokens, 8)
    assert block_hashes(pack_tokens(tokens), 8) == want
    assert block_hashes(array("i", tokens), 8) == want
    assert block_hashes(np.array(tokens, dtype=np.int64), 8) == want
    assert block_hashes(tuple(tokens), 8) == want


def test_partial_blocks_excluded():
    assert block_hashes([1, 2, 3], 4) == []
    assert len(block_hashes(list(range(15)), 4)) == 3
    assert block_hashes(list(range(16)), 4)[:3] == block_hashes(list(range(15)), 4)


@given(
    st.lists(st.integers(0, 1000), min_size=8, max_size=64),
    st.lists(st.integers(0, 1000), min_size=1, max_size=32),
)
def test_same_prefix_same_hashes(prefix, suffix):
    bs = 4
    a = block_hashes(prefix + suffix, bs)
    b = block_hashes(prefix, bs)
    assert a[: len(b)] == b


def test_earlier_change_changes_all_later_hashes():
    tokens = list(range(64))
    base = block_hashes(tokens, 8)
    changed = tokens.copy()
    changed[10] += 1  # inside block 1
    other = block_hashes(changed, 8)
    assert other[0] == base[0]
    assert all(x != y for x, y in zip(other[1:], base[1:], strict=True))
    # a block equal in content but at another place in the chain hashes differently
    assert block_hashes([5] * 8, 4)[0] != block_hashes([5] * 8, 4)[1]


def test_parent_continues_chain():
    tokens = list(range(40))
    full = block_hashes(tokens, 8)
    head = block_hashes(tokens[:16], 8)
    tail = block_hashes(tokens[16:], 8, parent=head[-1])
    assert head + tail == full


def test_incremental_helpers_agree():
    tokens = list(range(100))
    hashes: list[int] = []
    grown: list[int] = []
    for end in range(0, 101, 7):
        grown += extend_block_hashes(hashes, tokens[:end], 6)
    assert hashes == grown == block_hashes(tokens[:98], 6)

    hasher = BlockHasher(6)
    new: list[int] = []
    for i in range(0, 100, 5):
        new += hasher.extend(tokens[i : i + 5])
    assert new == hasher.block_hashes == block_hashes(tokens, 6)

    parent = block_hashes(tokens[:6], 6)[0]
    cont = BlockHasher(6, parent=parent)
    assert cont.extend(tokens[6:18]) == block_hashes(tokens, 6)[1:3]


def test_bad_inputs():
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0)
    with pytest.raises(ValueError):
        block_hashes(b"\x00\x01\x02", 1)
