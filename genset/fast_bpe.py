"""Byte-level BPE encoding through tiktoken, used only where it gives the tokenizer.json's ids.

Why: tokenizing is the frontend's largest single cost. On a ~950-token prompt (the aiperf
profile) `tokenizers`' fastest call (`encode_batch_fast`) takes 1.05 ms of CPU and tiktoken
0.26 ms (same machine, same vocabulary, measured 2026-12-06); in a py-spy profile of the
frontend at concurrency 16 encoding was 26 % of its samples. Both are maintained Rust
libraries; tiktoken does less per call (no normalized string with per-byte alignments, no
offsets) and releases the GIL while it works, as `encode_batch_fast` does.

When the two agree. `tokenizers`' BPE merges the adjacent pair with the lowest merge rank
until no listed pair is left; tiktoken merges the adjacent pair whose concatenation has the
lowest id in the vocabulary, and returns a pre-token that is itself a token without merging.
They give the same ids when:

- the model is plain byte-level BPE (no normalizer, no dropout, no byte fallback, no
  word prefixes/suffixes) with a pre-tokenizer tiktoken can run: GPT-2's `ByteLevel` regex,
  or one `Split` regex followed by a regex-free `ByteLevel`;
- each merge creates a new token, and the created tokens' ids grow with the merges' ranks
  (so "lowest merge rank" and "lowest id" pick the same pair among listed pairs);
- every token of the vocabulary encodes to itself through the merges (so tiktoken's
  whole-token shortcut changes nothing), unless the model sets `ignore_merges`, which is
  that shortcut;
- added tokens (`<|im_start|>`, ...) are cut out verbatim (no lstrip/rstrip/single_word,
  none a prefix of another, since tiktoken's alternation need not prefer the longest).

One case is not decided by these checks: a pair that concatenates to a token but is not that
token's merge ("a" + "bc" where "abc" was made from "ab" + "c"). For vocabularies trained by
BPE such pairs do not become adjacent where the merges would not already have merged them (the
training applied the same order); this is checked, not proved: at build on a built-in sample
of prose, code, digits, whitespace and non-Latin text, and afterwards in the background on a
sample of real prompts (the first `CHECK_FIRST` encodes, then one in `CHECK_EVERY`), where
a difference turns the fast path off for good and is logged. Measured on the benchmarks'
tokenizer: the same ids as `tokenizers` on 332,051 texts (2,051 Python stdlib sources,
100,000 random concatenations of vocabulary tokens, 230,000 random strings over small
alphabets, 50,000 over the vocabulary's characters).

tiktoken's regex engine gives up on some inputs (e.g. a million spaces: "Max stack size
exceeded for backtracking"); `encode` then returns None and the caller uses `tokenizers`.
`GENSET_FAST_TOKENIZER=0` turns the fast path off.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from genset.runtime.logging import get_logger

log = get_logger("genset.tokenizer")

# tokenizers' ByteLevel pre-tokenizer regex (GPT-2's), as `use_regex: true` applies it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Checked at build: a little of everything a prompt carries.
SAMPLE = (
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; they've said 'no', we'll see!\n"
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\t\tindented\r\n"
    "1234567890 3.14159 -42 1e10 0x1F  multiple   spaces    here     \n\n\n"
    "Ünïcödé çàfé naïve — \u201cquotes\u201d \u2018single\u2019 \u2026 日本語のテキスト 中文文本 한국어 Ελληνικά русский "
    "עברית العربية हिन्दी 🎉👍🏽 e\u0301 \u200b zero-width\u00a0nbsp "
    "https://example.com/path?q=1&r=2 user@example.org C:\\Windows\\path ~/.bashrc "
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ' s 't 'RE 'Ve ''' \"\"\" ``` <html></html>"
)

CHECK_FIRST = 8
CHECK_EVERY = 512


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _pattern(pre: Any) -> str | None:
    """The regex tiktoken should split with, or None where the pre-tokenizer is not one it
    reproduces."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
            return GPT2_PATTERN
        return None
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if len(steps) != 2:
            return None
        split, level = steps
        if not (isinstance(split, dict) and isinstance(level, dict)):
            return None
        regex = (split.get("pattern") or {}).get("Regex")
        if (split.get("type") == "Split" and isinstance(regex, str)
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and level.get("type") == "ByteLevel" and not level.get("use_regex", True)
                and not level.get("add_prefix_space", False)):
            return regex
    return None


def _merges(model: dict) -> list[tuple[str, str]] | None:
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str) and " " in m:
            a, b = m.split(" ", 1)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            a, b = m
        else:
            return None
        out.append((a, b))
    return out


def why_not(spec: dict, rust: Any) -> str | None:
    """Why this tokenizer.json cannot be encoded through tiktoken (None: it can). The checks
    the module docstring lists, except the sample, which `FastBpe.build` runs."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r} is not BPE"
    if spec.get("normalizer") is not None:
        return "has a normalizer"
    if spec.get("truncation") is not None or spec.get("padding") is not None:
        return "truncates or pads"
    if model.get("dropout") or model.get("byte_fallback") or model.get(
            "continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE with dropout, byte fallback or word prefixes/suffixes"
    if _pattern(spec.get("pre_tokenizer")) is None:
        return "pre-tokenizer is not byte-level with one regex"
    if getattr(rust, "encode_special_tokens", False):
        return "encodes special tokens as text"
    added = spec.get("added_tokens") or []
    contents = [a.get("content") for a in added]
    if any(a.get("lstrip") or a.get("rstrip") or a.get("single_word") or not a.get("content")
           for a in added):
        return "added tokens with lstrip/rstrip/single_word"
    if any(x != y and y.startswith(x) for x in contents for y in contents):
        return "an added token is a prefix of another"
    vocab: dict[str, int] = model.get("vocab") or {}
    to_byte = byte_decoder()
    if any(ch not in vocab for ch in to_byte):
        return "a byte has no token"
    merges = _merges(model)
    if merges is None:
        return "merges not in a known format"
    last = -1
    for a, b in merges:
        tid = vocab.get(a + b)
        if tid is None or tid <= last:
            return f"merge {a!r} {b!r}: its token's id does not grow with the merges"
        last = tid
    if not model.get("ignore_merges"):
        bpe = rust.model
        added_set = set(contents)
        for s, tid in vocab.items():
            if s in added_set:
                continue
            if [t.id for t in bpe.tokenize(s)] != [tid]:
                return f"token {s!r} does not encode to itself"
    return None


class FastBpe:
    """`encode(text)`: the ids `tokenizers` gives with `add_special_tokens=False` (or with it,
    when `specials_free`), or None where tiktoken could not encode the text."""

    def __init__(self, encoding: Any, reference: Callable[[str], list[int]],
                 specials_free: bool) -> None:
        self._encoding = encoding
        self._reference = reference  # tokenizers' encode, for the sampled checks
        self.specials_free = specials_free  # the post-processor adds no tokens
        self.enabled = True
        self.encodes = 0
        self.mismatches = 0
        self._checks: queue.Queue[tuple[str, list[int]]] = queue.Queue(maxsize=4)
        self._checker: threading.Thread | None = None

    @classmethod
    def build(cls, spec: dict, rust: Any, reference: Callable[[str], list[int]]
              ) -> tuple[FastBpe | None, str | None]:
        """(encoder, None), or (None, why not)."""
        if os.environ.get("GENSET_FAST_TOKENIZER", "1") == "0":
            return None, "turned off (GENSET_FAST_TOKENIZER=0)"
        reason = why_not(spec, rust)
        if reason is not None:
            return None, reason
        try:
            import tiktoken
        except ImportError:
            return None, "tiktoken is not installed"
        model = spec["model"]
        added = {a["content"]: a["id"] for a in spec.get("added_tokens") or []}
        to_byte = byte_decoder()
        try:
            ranks = {bytes(to_byte[ch] for ch in s): tid
                     for s, tid in model["vocab"].items() if s not in added}
        except KeyError:
            return None, "a token has characters outside the byte-level alphabet"
        if len(ranks) != len(model["vocab"]) - sum(s in model["vocab"] for s in added):
            return None, "two tokens stand for the same bytes"
        try:
            encoding = tiktoken.Encoding(
                "genset", pat_str=_pattern(spec["pre_tokenizer"]), mergeable_ranks=ranks,
                special_tokens=added)
        except Exception as exc:  # tiktoken refuses what it cannot hold (id collisions)
            return None, f"tiktoken refused it: {exc}"
        post = spec.get("post_processor")
        specials_free = post is None or (isinstance(post, dict)
                                         and post.get("type") == "ByteLevel")
        fast = cls(encoding, reference, specials_free)
        for text in (SAMPLE, SAMPLE + "<|im_start|>" * ("<|im_start|>" in added)):
            if fast._encode(text) != reference(text):
                return None, "differs from tokenizers on the built-in sample"
        return fast, None

    def _encode(self, text: str) -> list[int] | None:
        try:
            return self._encoding.encode(text, allowed_special="all")
        except ValueError:  # the regex engine gave up (see the module docstring)
            return None

    def encode(self, text: str) -> list[int] | None:
        if not self.enabled:
            return None
        ids = self._encode(text)
        if ids is not None:
            n = self.encodes = self.encodes + 1
            if n <= CHECK_FIRST or n % CHECK_EVERY == 0:
                self._check_later(text, ids)
        return ids

    # -- the sampled check, in the background ----------------------------------------------

    def _check_later(self, text: str, ids: list[int]) -> None:
        try:
            self._checks.put_nowait((text, ids))
        except queue.Full:  # checks are a sample: skipping one under load is fine
            return
        if self._checker is None:
            self._checker = threading.Thread(target=self._check_loop, name="tokenizer-check",
                                             daemon=True)
            self._checker.start()

    def _check_loop(self) -> None:
        while True:
            text, ids = self._checks.get()
            try:
                same = self._reference(text) == ids
            except Exception:  # e.g. the reference ran out of memory: no verdict
                same = True
            finally:
                self._checks.task_done()
            if not same:
                self.mismatches += 1
                self.enabled = False
                log.error("fast tokenizer gave other ids than tokenizers: turned off",
                          chars=len(text))

    def wait_checked(self, timeout: float) -> bool:
        """Block until the queued checks are done (tests); False if `timeout` s passed."""
        done = threading.Event()

        def join() -> None:
            self._checks.join()
            done.set()
        threading.Thread(target=join, daemon=True).start()
        return done.wait(timeout)
