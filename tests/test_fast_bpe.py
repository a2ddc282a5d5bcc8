"""tiktoken as the encoder where it gives tokenizers' ids (genset.fast_bpe), and only there."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer

from genset import fast_bpe
from genset.fast_bpe import FastBpe, why_not
from genset.tokenizer import Tokenizer

TINY = "genset/assets/tiny"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_directory(TINY)


def reference(tok: Tokenizer, text: str, special: bool = False) -> list[int]:
    return tok.rust.encode(text, add_special_tokens=special).ids


def texts() -> list[str]:
    rng = random.Random(5)
    words = fast_bpe.SAMPLE.split()
    prose = " ".join(rng.choice(words) for _ in range(3000))
    return [
        "", " ", "a", "hello world", prose,
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
        "text<|endoftext|>more<|im_end|><|im_start|>",
        "def f(x):\n\treturn x  \n\n\n    # spaces   and\ttabs\r\n",
        "1234567890" * 50 + " 3.14 -2e5",
        "日本語 中文 한국어 🎉👍🏽 e\u0301 naïve café \u00a0\u200b",
        "a" * 5000, " " * 3000 + "x", "\n" * 100,
        "'s 't 're 've 'm 'll 'd 'S 'T ''",
    ]


def test_the_shipped_tokenizer_takes_the_fast_path(tok):
    assert tok.fast is not None, tok.fast_off_reason


def test_fast_ids_equal_tokenizers_ids(tok):
    for text in texts():
        assert tok.encode(text, add_special_tokens=False) == reference(tok, text)
        assert tok.encode(text) == reference(tok, text, special=True)
    chat = [{"role": "user", "content": texts()[4]}]
    assert tok.encode_chat(chat) == reference(tok, tok.render_chat(chat))
    assert tok.fast.encodes > 0  # the fast path did the work


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab c'\n\t1é日🎉<|>_imstartend")), max_size=60))
def test_random_texts_encode_alike(tok, text):
    assert tok.encode(text, add_special_tokens=False) == reference(tok, text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_unicode_encodes_alike(tok, text):
    assert tok.encode(text, add_special_tokens=False) == reference(tok, text)


def test_texts_tiktoken_cannot_split_fall_back_to_tokenizers(tok):
    text = " " * 1_000_000  # tiktoken's regex engine gives up on this (backtracking limit)
    assert tok.fast._encode(text) is None
    assert tok.encode(text, add_special_tokens=False) == reference(tok, text)


def test_a_difference_in_the_sampled_checks_turns_the_fast_path_off(tok):
    """The background check compares a sample of encodes with tokenizers; here a reference
    that disagrees stands for a vocabulary where tiktoken's merge order differs."""
    fast = FastBpe(tok.fast._encoding, reference=lambda text: [-1], specials_free=True)
    assert fast.encode("hello") is not None  # served fast, checked later
    assert fast.wait_checked(30)
    assert fast.mismatches == 1 and not fast.enabled
    assert fast.encode("hello") is None  # the caller now uses tokenizers


def test_agreeing_checks_keep_it_on(tok):
    fast = FastBpe(tok.fast._encoding, reference=lambda text: reference(tok, text),
                   specials_free=True)
    for text in texts()[:fast_bpe.CHECK_FIRST + 2]:
        fast.encode(text)
    assert fast.wait_checked(30)
    assert fast.enabled and fast.mismatches == 0


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("GENSET_FAST_TOKENIZER", "0")
    tok = Tokenizer.from_directory(TINY)
    assert tok.fast is None and "GENSET_FAST_TOKENIZER" in tok.fast_off_reason
    assert tok.encode("hello world") == reference(tok, "hello world", special=True)


# -- what it refuses ------------------------------------------------------------------------


def spec_of(tok: Tokenizer) -> dict:
    return json.loads(tok.rust.to_str())


def refusal(spec: dict) -> str | None:
    rust = RustTokenizer.from_str(json.dumps(spec))
    return why_not(spec, rust)


def test_the_shipped_spec_passes(tok):
    assert refusal(spec_of(tok)) is None


@pytest.mark.parametrize("change, reason", [
    (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda s: s["model"].update(byte_fallback=True), "byte fallback"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer"),
    (lambda s: s["added_tokens"][0].update(lstrip=True), "lstrip"),
    (lambda s: s["added_tokens"].append({**s["added_tokens"][0], "id": 99999,
                                         "content": s["added_tokens"][0]["content"] + "x"}),
     "prefix"),
    (lambda s: s["model"]["merges"].reverse(), "does not grow"),
])
def test_tokenizers_it_cannot_reproduce_are_refused_with_a_reason(tok, change, reason):
    spec = spec_of(tok)
    change(spec)
    why = refusal(spec)
    assert why is not None and reason in why


def test_a_token_the_merges_cannot_reach_is_refused(tok):
    """tiktoken returns a pre-token that is itself a token without merging; tokenizers (without
    ignore_merges) only reaches a token through its merges."""
    spec = spec_of(tok)
    vocab = spec["model"]["vocab"]
    unreachable = "Ġzzqqxx"
    vocab[unreachable] = max(vocab.values()) + 1
    for added in spec["added_tokens"]:  # keep the added tokens' ids above the vocabulary
        added["id"] += 1
    assert "does not encode to itself" in refusal(spec)
    spec["model"]["ignore_merges"] = True  # tokenizers then takes the same shortcut
    assert refusal(spec) is None


def test_a_post_processor_that_adds_tokens_keeps_those_encodes_on_tokenizers(tok, tmp_path):
    spec = spec_of(tok)
    bos = spec["added_tokens"][0]
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos["content"], "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos["content"]: {"id": bos["content"], "ids": [bos["id"]],
                                            "tokens": [bos["content"]]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with_bos = Tokenizer.from_directory(tmp_path)
    assert with_bos.fast is not None and not with_bos.fast.specials_free
    before = with_bos.fast.encodes
    ids = with_bos.encode("hello world")
    assert ids[0] == bos["id"] and ids == reference(with_bos, "hello world", special=True)
    assert with_bos.fast.encodes == before  # tokenizers added the BOS
    assert with_bos.encode("hello world", add_special_tokens=False) == ids[1:]
    assert with_bos.fast.encodes == before + 1
