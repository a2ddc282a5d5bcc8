"""The tokenizer's caches stay within their bounds whatever text comes in (genset.tokenizer)."""

from __future__ import annotations

import random
import sys
from array import array

import pytest

import genset.tokenizer as tokmod
from genset.tokenizer import SegmentCache, Tokenizer, load_tokenizer
from tests.test_frontend_helpers import make_tokenizer_dir

WORDS = ("alpha beta gamma Grüße München 你好 世界 quick brown fox 12345 zz <|im_start "
         "|> \n").split(" ")


@pytest.fixture
def tok(tmp_path) -> Tokenizer:
    # A fresh Tokenizer (not load_tokenizer's shared one): these tests shrink its cache.
    return Tokenizer.from_directory(make_tokenizer_dir(tmp_path / "tok"))


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        word = rng.choice(WORDS)
        out.append(word)
        n += len(word) + 1
    return " ".join(out)


def _accounted(seg: SegmentCache) -> int:
    return sum(cost for _, cost in seg.cache.values())


def test_distinct_large_prompts_leave_nothing_cached(tok):
    # Issue 14: every distinct 4 MB prompt used to stay cached (+50-110 MB each, for good).
    seg = tok.segments
    assert seg is not None
    rng = random.Random(1)
    for _ in range(5):
        doc = _text(rng, SegmentCache.MAX_CHARS + 1000)
        messages = [{"role": "user", "content": doc}]
        assert tok.encode_chat(messages) == tok.encode(tok.render_chat(messages),
                                                       add_special_tokens=False)
    assert seg.enabled and seg.cache == {} and seg.bytes == 0


def test_many_distinct_segments_stay_under_the_byte_bound(tok):
    seg = tok.segments
    seg.MAX_BYTES = 2_000_000  # small: a few of these segments (up to ~1 MB each) fill it
    rng = random.Random(2)
    system = _text(rng, 3000)
    for i in range(60):
        doc = _text(rng, rng.randint(SegmentCache.MIN_CHARS, 12_000))
        messages = [{"role": "system", "content": system}, {"role": "user", "content": doc}]
        tok.encode_chat(messages)  # a piece is cached the second time it is seen
        ids = tok.encode_chat(messages)
        if i % 10 == 0:  # the plain encode is the reference (the cache must not change ids)
            assert ids == tok.encode(tok.render_chat(messages), add_special_tokens=False)
        assert seg.bytes == _accounted(seg) <= seg.MAX_BYTES
        for piece, (cached, cost) in seg.cache.items():  # and each entry's cost is no guess
            assert isinstance(cached, array)  # packed: no int objects, nothing for the GC
            assert cost >= sys.getsizeof(piece) + sys.getsizeof(cached)
    assert seg.enabled and len(seg.cache) < 60  # it did evict
    assert "system\n" + system in seg.cache  # used every time: the least recent went first


def test_a_segment_larger_than_the_whole_bound_is_not_cached(tok):
    seg = tok.segments
    seg.MAX_BYTES = 10_000
    text = _text(random.Random(3), 8000)  # under MAX_CHARS, over MAX_BYTES once encoded
    for _ in range(2):
        assert seg._lookup(text) == tok.encode(text, add_special_tokens=False)
    assert seg.cache == {} and seg.bytes == 0


def test_a_piece_is_cached_only_once_it_recurs(tok):
    seg = tok.segments
    text = _text(random.Random(4), 3000)
    plain = tok.encode(text, add_special_tokens=False)
    assert seg._lookup(text) == plain and seg.cache == {}  # seen once: remembered, not kept
    assert seg._lookup(text) == plain and text in seg.cache  # recurs: kept
    assert seg._lookup(text) == plain  # served from the cache, the same ids
    seg.SEEN_MAX = 16
    for i in range(seg.SEEN_MAX + 10):  # the set of pieces seen once is bounded
        seg._lookup(f"{i} " + text)
    assert len(seg.seen) <= seg.SEEN_MAX


def test_loaded_tokenizers_are_capped_in_number(tmp_path, monkeypatch):
    monkeypatch.setattr(tokmod, "_cache", {})
    monkeypatch.setattr(tokmod, "MAX_TOKENIZERS", 2)
    dirs = [str(make_tokenizer_dir(tmp_path / f"t{i}", vocab_size=300)) for i in range(3)]
    first = load_tokenizer(dirs[0])
    load_tokenizer(dirs[1])
    assert load_tokenizer(dirs[0]) is first  # a hit makes it the most recently used
    load_tokenizer(dirs[2])
    assert list(tokmod._cache) == [dirs[0], dirs[2]]


def test_a_text_with_no_known_piece_is_encoded_whole_and_remembered(tok):
    seg = tok.segments
    calls: list[str] = []
    real = seg.encode_plain
    seg.encode_plain = lambda text: calls.append(text) or real(text)
    messages = [{"role": "user", "content": _text(random.Random(5), 3000)}]
    text = tok.render_chat(messages)
    plain = tok.encode(text, add_special_tokens=False)
    checks = seg.checks_left
    assert seg.encode(text) == plain and calls == [text]  # one call, the whole text
    assert seg.checks_left == checks and seg.cache == {}  # exact already: nothing to check
    calls.clear()
    assert seg.encode(text) == plain and len(calls) > 1  # seen before: by pieces, and kept
    assert seg.checks_left == checks - 1 and len(seg.cache) == 1
