"""Tokenizer loading, chat templates and incremental detokenization (genset.tokenizer), and
the frontend's text assembler on top of it (services.frontend.text)."""

from __future__ import annotations

import random

import pytest

from genset.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from services.frontend.text import TextAssembler
from tests.test_frontend_helpers import make_tokenizer_dir

TEXT = ("Grüße aus München! 你好\uff0c世界。 Emoji 🙂🚀👍🏽 — ∑ ≈ ∞. こんにちは世界。"
        " The quick brown fox. ¿dónde está?")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(str(make_tokenizer_dir(tmp_path_factory.mktemp("tok"))))


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        out.append(ids[i:i + n])
        i += n
    return out


def test_multibyte_characters_never_split(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    # The tiny vocabulary splits CJK and emoji characters over several byte tokens.
    assert len(ids) > len(TEXT) // 2
    for seed in range(5):
        detok = tok.detokenizer()
        pieces = [detok.feed(chunk) for chunk in _chunks(ids, random.Random(seed))]
        pieces.append(detok.flush())
        assert "".join(pieces) == TEXT == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)
    # one token at a time: some steps must hold text back (a partial character)
    detok = tok.detokenizer()
    single = [detok.feed([t]) for t in ids]
    assert "".join(single) == TEXT
    assert "" in single


@pytest.mark.parametrize("stop", ["世界。", "brown", "🚀👍", "est"])
def test_stop_string_across_chunks(tok, stop):
    ids = tok.encode(TEXT, add_special_tokens=False)
    expected = TEXT[:TEXT.find(stop)]
    for seed in range(5):
        detok = tok.detokenizer(stop=[stop, "never-there"])
        out = []
        for chunk in _chunks(ids, random.Random(seed)):
            out.append(detok.feed(chunk))
            # nothing emitted so far may end with the start of the stop string
            so_far = "".join(out)
            assert stop not in so_far
            if detok.stopped:
                break
        assert detok.stopped
        assert detok.flush() == ""
        assert "".join(out) == expected
        assert detok.feed(ids[:3]) == ""  # after a stop nothing more comes out


def test_partial_stop_is_held_then_released(tok):
    detok = tok.detokenizer(stop=["fox jumps"])
    shown = detok.feed(tok.encode("The quick brown fox", add_special_tokens=False))
    assert shown == "The quick brown "  # "fox" could begin the stop string
    shown += detok.feed(tok.encode(" runs", add_special_tokens=False))
    assert not detok.stopped
    assert shown + detok.flush() == "The quick brown fox runs"


def test_special_tokens_skipped(tok):
    eos = tok.eos_token_ids[0]
    assert tok.rust.id_to_token(eos) == "<|im_end|>"
    ids = [*tok.encode("Hello world", add_special_tokens=False), eos]
    detok = tok.detokenizer()
    assert detok.feed(ids) + detok.flush() == "Hello world"


def test_chat_template_and_encode(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    text = tok.render_chat(messages)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.rust.token_to_id("<|im_start|>")
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_template_errors_are_clear(tmp_path):
    d = make_tokenizer_dir(tmp_path / "t")
    import json
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_directory(d)
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TokenizerError, match="first must be user"):
        tok.render_chat([{"role": "system", "content": "x"}])


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer.from_directory(tmp_path)
    with pytest.raises(TokenizerError, match="no such directory"):
        load_tokenizer(str(tmp_path / "missing" / "dir"))


def test_segment_cache_matches_plain_encoding(tok):
    rng = random.Random(0)
    words = [*TEXT.split(), "alpha", "beta", "\n", "  ", "<|im_start", "|>"]
    systems = [" ".join(rng.choice(words) for _ in range(300)) for _ in range(3)]
    assert tok.segments is not None
    for i in range(60):
        user = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        messages = [{"role": "system", "content": systems[i % 3]},
                    {"role": "user", "content": user}]
        plain = tok.rust.encode(tok.render_chat(messages), add_special_tokens=False).ids
        assert tok.encode_chat(messages) == plain
    assert tok.segments.enabled and len(tok.segments.cache) == 3  # the system prompts


def test_a_batch_ending_inside_a_character_keeps_its_words(tok):
    """A stream cut off (e.g. max_tokens) in the middle of a multi-byte character: the words
    of its last multi-token batch still come out; only the partial character is dropped."""
    ids = tok.encode(TEXT, add_special_tokens=False)
    cuts = [n for n in range(4, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "the test text must split a character across tokens"
    for n in cuts[:10]:
        one_by_one = tok.detokenizer()
        expected = "".join(one_by_one.feed([i]) for i in ids[:n]) + one_by_one.flush()
        # whole tokens up to the one that holds the partial character
        assert expected and TEXT.startswith(expected)
        detok = tok.detokenizer()
        text = detok.feed(ids[: n - 3]) + detok.feed(ids[n - 3 : n]) + detok.flush()
        assert text == expected, n


def _assemble(text: TextAssembler, chunks: list[list[int]]) -> list[tuple[str, list[int]]]:
    out = []
    for chunk in chunks:
        delta = text.feed(chunk)
        if delta is not None:
            out.append((delta.text, delta.token_ids))
        if text.stopped:
            return out
    tail = text.flush()
    if tail is not None:
        out.append((tail.text, tail.token_ids))
    return out


def test_text_assembler_keeps_every_id_with_its_text(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    for seed in range(5):
        deltas = _assemble(TextAssembler(tok), _chunks(ids, random.Random(seed)))
        assert "".join(t for t, _ in deltas) == TEXT
        assert [i for _, d in deltas for i in d] == ids  # every id once, in order
        # ids whose text is not out yet wait for the text that completes them: no delta
        # without text before the end
        assert all(text for text, _ in deltas[:-1])


def test_text_assembler_stop_token_has_no_text_and_stop_string_ends(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    bang = tok.encode("!", add_special_tokens=False)
    assert len(bang) == 1 and tok.decode(bang) == "!"
    # a stop token id ends the sequence: its id is reported, its text is not
    deltas = _assemble(TextAssembler(tok, stop_token_ids=bang), [ids, bang])
    assert "".join(t for t, _ in deltas) == "Hello world"
    assert [i for _, d in deltas for i in d] == [*ids, *bang]
    # a stop string: the delta that reaches it is the last, without the stop string
    text = TextAssembler(tok, stop_strings=["wor"])
    deltas = _assemble(text, [[i] for i in ids])
    assert text.stopped and "".join(t for t, _ in deltas) == "Hello "
    # detokenize off (or no tokenizer): ids only, stop strings do not apply
    plain = TextAssembler(tok, detokenize=False, stop_strings=["wor"])
    assert _assemble(plain, [ids[:2], ids[2:]]) == [("", ids[:2]), ("", ids[2:])]
    assert not plain.stopped and TextAssembler(None).flush() is None
