"""Tokenizers, chat templates and incremental detokenization, without torch or transformers.

A model directory in Hugging Face layout (tokenizer.json + tokenizer_config.json) is read with
the `tokenizers` package (Rust) and the chat template is rendered with jinja2, the way
transformers renders it (sandboxed, trim_blocks/lstrip_blocks, `raise_exception`, `tojson`).
Keeping transformers out keeps the frontend light: importing it costs seconds and hundreds
of MB.

Detokenization runs per chunk, not per token: `Detokenizer.feed(ids)` turns a whole chunk of
token ids into text with one call into Rust (`tokenizers.decoders.DecodeStream`), which never
returns a partial UTF-8 character; stop strings are then matched on the text, holding back
any tail that could still grow into a stop string.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.decoders import DecodeStream

from genset.fast_bpe import FastBpe

# Prompts shorter than this (characters) are tokenized on the event loop. Not lower: a prompt
# tokenized in a thread waits for the GIL at each of its Python steps (template, segment split,
# each Rust call's return) while the loop thread holds it, up to the 5 ms switch interval each
# time; with ~4,500-character prompts on a busy frontend (threshold 2,048, measured with
# --timeline) that made tokenizing take 25 ms p50 / 69 ms p90 instead of 7 / 16 inline.
OFFLOAD_CHARS = 16384

# Texts at least this long are encoded through `encode_batch_fast`, which releases the GIL
# while Rust works and skips the character offsets nobody here uses. The plain `encode` holds
# the GIL for the whole call: a 4M-character prompt encoded in a thread still froze the
# event loop for 11.6 s of its 12.5 s (measured, tiny tokenizer, loaded 2-core machine);
# through `encode_batch_fast` the loop's longest stall at 1M characters was 0.26 s (building
# the id list), and the encode took 2.2 s instead of 3.3 s with 141 instead of 183 MB peak.
RELEASE_GIL_CHARS = 4096
# Peak memory of the Rust tokenizer while it encodes, per input character (normalized
# string with per-byte alignments, pre-token splits, the encoding): ~140 bytes measured
# with `encode_batch_fast` at 1M characters. Callers size their tokenization budget by it.
ENCODE_BYTES_PER_CHAR = 140


def encode_ids(rust: _RustTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """`rust.encode(text).ids`, through `encode_batch_fast` on one text where the tokenizers
    package has it (0.20+): the same ids without the character offsets `encode` computes,
    which cost ~20 % of the time (1.17 vs 1.47 ms on ~1,000-token prompts, measured), and
    with the GIL released, so a long prompt tokenized in a thread does not hold the event
    loop (see RELEASE_GIL_CHARS)."""
    fast = getattr(rust, "encode_batch_fast", None)
    if fast is not None:
        return fast([text], add_special_tokens=add_special_tokens)[0].ids
    if len(text) >= RELEASE_GIL_CHARS:  # tokenizers < 0.20: encode_batch releases the GIL too
        return rust.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    return rust.encode(text, add_special_tokens=add_special_tokens).ids


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or a chat template that cannot be rendered."""


def _special_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as a string or {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _resolve_directory(source: str) -> Path:
    """`source` is a model/tokenizer directory, a tokenizer.json file, or a built-in name."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    if "/" not in source and not path.suffix:
        try:
            # Imported only for built-in names; tiny.resolve_model writes/locates the files
            # and must not import torch (the frontend never loads torch).
            from genset.engines.torch.tiny import resolve_model
        except ImportError as exc:
            raise TokenizerError(f"built-in tokenizer {source!r} is not available: {exc}") from None
        return Path(resolve_model(source))
    raise TokenizerError(f"tokenizer {source!r}: no such directory or tokenizer.json file")


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template refused the messages: {message}")


@functools.lru_cache(maxsize=32)
def _compile_template(source: str):
    # Imported here so that `import genset.tokenizer` stays cheap for pure token users.
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"chat template does not compile: {exc}") from None


# ChatML, for tokenizers that ship no template (the caller gets a working default, not a 500).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """One model's tokenizer: encode, decode, chat template, end-of-sequence ids."""

    def __init__(self, rust: _RustTokenizer, config: dict[str, Any], source: str,
                 generation_config: dict[str, Any] | None = None,
                 spec: dict[str, Any] | None = None) -> None:
        """`spec`: the tokenizer.json as read, which says whether tiktoken may encode for
        `rust` (genset.fast_bpe); without it every encode goes through `rust`."""
        self.rust = rust
        self.source = source
        self.config = config
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str = template if isinstance(template, str) else DEFAULT_CHAT_TEMPLATE
        self.bos_token = _special_content(config.get("bos_token"))
        self.eos_token = _special_content(config.get("eos_token"))
        eos_ids: list[int] = []
        if self.eos_token is not None and (eid := rust.token_to_id(self.eos_token)) is not None:
            eos_ids.append(eid)
        gen_eos = (generation_config or {}).get("eos_token_id")
        for eid in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(eid, int) and eid not in eos_ids:
                eos_ids.append(eid)
        self.eos_token_ids: list[int] = eos_ids
        self.vocab_size = rust.get_vocab_size(with_added_tokens=True)
        self.fast: FastBpe | None = None
        self.fast_off_reason: str | None = "no tokenizer.json spec given"
        if spec is not None:
            self.fast, self.fast_off_reason = FastBpe.build(
                spec, rust, lambda text: encode_ids(rust, text, False))
        self.segments = SegmentCache.build(rust, self._encode_plain)

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_directory(cls, directory: str | Path, *, source: str | None = None) -> Tokenizer:
        directory = Path(directory)
        tok_file = directory / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json")
        try:
            rust = _RustTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises plain Exception
            raise TokenizerError(f"{tok_file}: cannot load: {exc}") from None
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        spec = _read_json(tok_file)  # valid: the Rust side just parsed it
        return cls(rust, config, source or str(directory), generation, spec)

    # -- text <-> ids -------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        fast = self.fast
        if fast is not None and (not add_special_tokens or fast.specials_free):
            ids = fast.encode(text)
            if ids is not None:
                return ids
        return encode_ids(self.rust, text, add_special_tokens)

    def _encode_plain(self, text: str) -> list[int]:
        # looked up at each call (not bound once), so a wrapped `encode` sees the segment
        # cache's encodes too
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.rust.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    **extra: Any) -> str:
        """The prompt text of a conversation, as transformers' apply_chat_template renders it."""
        import jinja2

        template = _compile_template(self.chat_template)
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except TokenizerError:
            raise
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise TokenizerError(f"chat template failed on these messages: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        return self.encode_rendered(self.render_chat(messages, **kwargs))

    def encode_rendered(self, text: str) -> list[int]:
        """The ids of a rendered chat prompt (`render_chat`'s text)."""
        # The template already writes BOS/special tokens itself; adding them again would double them.
        if self.segments is not None:
            return self.segments.encode(text)
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self, *, stop: Iterable[str] = (), skip_special_tokens: bool = True) -> Detokenizer:
        return Detokenizer(self, stop=stop, skip_special_tokens=skip_special_tokens)


class SegmentCache:
    """Tokenization that reuses the ids of long text segments seen before (system prompts).

    The tokenizer cuts its input at added tokens (`<|im_start|>`, ...) before normalizing and
    pre-tokenizing, and encodes the pieces independently; so a chat prompt's ids are the
    concatenation of its pieces' ids, and a long piece that recurs (the shared system prompt
    of a deployment) need not be encoded again. Used only when the added tokens match
    verbatim (no lstrip/rstrip/single_word/normalized) and only for `add_special_tokens=False`;
    a text with no piece cached or seen before is encoded whole (nothing to reuse or keep);
    the first encodes by pieces are checked against a plain encode, and any difference turns
    it off.

    Bounded in bytes, least recently used out first: only pieces of MIN_CHARS..MAX_CHARS
    characters are cached (a system prompt, not a pasted document), and the accounted size
    of texts plus id lists stays under MAX_BYTES. Without the piece cap one distinct 4 MB
    prompt (~1M ids at ~36 bytes of Python list slot and int each) stayed cached for good.
    """

    MIN_CHARS = 512  # shorter pieces are cheaper to encode than to look up
    MAX_CHARS = 64 * 1024  # longer pieces are encoded every time, never cached
    MAX_BYTES = 32 * 1024 * 1024
    MAX_ENTRIES = 512
    CHECKS = 32
    # Texts longer than this are not used for the checks: a check encodes the text a second
    # time, which for a prompt of megabytes doubles its cost (and its peak memory).
    CHECK_MAX_CHARS = 256 * 1024
    # A piece is cached the second time it is seen (its hash is remembered the first time,
    # in a bounded set): a prompt that never recurs (every aiperf synthetic prompt, most user
    # turns) costs no copy of its ids, no cache churn and no garbage-collector work. Its ids
    # are kept packed (array, not a list of ints): a list of 1,000 ids is one more container
    # for every full collection to walk (512 of them: ~0.5 M references per collection).
    SEEN_MAX = 8192

    def __init__(self, encode_plain: Callable[[str], list[int]], added: dict[str, int]) -> None:
        self.encode_plain = encode_plain  # text -> ids, add_special_tokens=False
        self.added = added
        alternatives = "|".join(re.escape(c) for c in sorted(added, key=len, reverse=True))
        self.split = re.compile(f"({alternatives})").split
        # piece -> (packed ids, accounted bytes), in use order, least recent first
        self.cache: dict[str, tuple[array, int]] = {}
        self.seen: dict[int, None] = {}  # hashes of pieces seen once, oldest first
        self.bytes = 0  # the sum of the accounted bytes
        self.checks_left = self.CHECKS
        self.enabled = True
        self.lock = threading.Lock()

    @classmethod
    def build(cls, rust: _RustTokenizer, encode_plain: Callable[[str], list[int]]
              ) -> SegmentCache | None:
        try:
            decoder = rust.get_added_tokens_decoder()
        except AttributeError:  # older tokenizers
            return None
        added: dict[str, int] = {}
        for tid, tok in decoder.items():
            if tok.lstrip or tok.rstrip or tok.single_word or tok.normalized or not tok.content:
                return None
            added[tok.content] = tid
        return cls(encode_plain, added) if added else None

    def _encode_plain(self, text: str) -> list[int]:
        return self.encode_plain(text)

    @staticmethod
    def _cost(piece: str, packed: array) -> int:
        # The str object (with the UTF-8 copy the Rust call may have left in it) and the
        # packed ids. Computed once, at insertion: the size of an equal str varies with that
        # UTF-8 copy.
        return sys.getsizeof(piece) + sys.getsizeof(packed)

    def _lookup(self, piece: str) -> list[int]:
        cache = self.cache
        key = hash(piece)
        with self.lock:
            entry = cache.pop(piece, None)
            if entry is not None:
                cache[piece] = entry  # now the most recently used
                return entry[0].tolist()
            seen = self.seen
            first = key not in seen
            if first:
                seen[key] = None
                if len(seen) > self.SEEN_MAX:
                    del seen[next(iter(seen))]
        ids = self._encode_plain(piece)
        if first:
            return ids
        packed = array("i", ids)
        cost = self._cost(piece, packed)
        if cost > self.MAX_BYTES:
            return ids
        with self.lock:
            self.seen.pop(key, None)
            if piece in cache:  # another thread got there first
                return ids
            while cache and (self.bytes + cost > self.MAX_BYTES
                             or len(cache) >= self.MAX_ENTRIES):
                self.bytes -= cache.pop(next(iter(cache)))[1]
            cache[piece] = (packed, cost)
            self.bytes += cost
        return ids

    def clear(self) -> None:
        with self.lock:
            self.cache.clear()
            self.seen.clear()
            self.bytes = 0

    def _none_known(self, pieces: list[str]) -> bool:
        """True when no cacheable piece is cached or was seen before; the pieces are then
        remembered as seen once (what `_lookup` does at a first sighting)."""
        lo, hi = self.MIN_CHARS, self.MAX_CHARS
        cacheable = [p for p in pieces[::2] if lo <= len(p) <= hi]
        cache, seen = self.cache, self.seen
        with self.lock:
            if any(p in cache or hash(p) in seen for p in cacheable):
                return False
            for p in cacheable:
                seen[hash(p)] = None
            while len(seen) > self.SEEN_MAX:
                del seen[next(iter(seen))]
        return True

    def encode(self, text: str) -> list[int]:
        if not self.enabled or len(text) < self.MIN_CHARS:
            return self._encode_plain(text)
        pieces = self.split(text)
        if self._none_known(pieces):
            # Nothing to reuse and nothing to keep yet (a prompt that never recurs, every
            # aiperf prompt): one plain encode of the whole text, exact by definition, so no
            # check either. Per piece it was three encode calls, plus a second encode of the
            # whole text for the first CHECKS prompts, which are a c=64 run's opening burst
            # (those took 0.44-0.53 ms per ~1,000-token prompt, now 0.26-0.30, measured).
            return self._encode_plain(text)
        ids: list[int] = []
        pending: list[str] = []  # other pieces (and added tokens) encoded together in one call
        for i, piece in enumerate(pieces):
            if i % 2 == 0 and self.MIN_CHARS <= len(piece) <= self.MAX_CHARS:
                if pending:
                    ids += self._encode_plain("".join(pending))
                    pending.clear()
                ids += self._lookup(piece)
            else:
                pending.append(piece)
        if pending:
            ids += self._encode_plain("".join(pending))
        if self.checks_left > 0 and len(text) <= self.CHECK_MAX_CHARS:
            self.checks_left -= 1
            if ids != self._encode_plain(text):
                self.enabled = False  # this tokenizer does not split as assumed: stay exact
                self.clear()
                return self._encode_plain(text)
        return ids


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: not valid JSON: {exc}") from None
    return value if isinstance(value, dict) else {}


# Loaded tokenizers by source, least recently used first. Sources come from model cards on
# the bus, so the count is capped: a tokenizer is ~5-50 MB (its vocabulary and merges in Rust
# plus the segment cache above), a size Python cannot see, so whole tokenizers are counted.
# A deployment serves a handful of models; one evicted while in use stays valid for its users.
MAX_TOKENIZERS = 16
_cache: dict[str, Tokenizer] = {}
_cache_lock = threading.Lock()


def load_tokenizer(source: str) -> Tokenizer:
    """The tokenizer named by a model card's `tokenizer` field (cached per source).

    Blocking (file reads, building the Rust tokenizer): call it from a thread in services.
    """
    with _cache_lock:
        cached = _cache.pop(source, None)
        if cached is not None:
            _cache[source] = cached  # most recently used
            return cached
    tokenizer = Tokenizer.from_directory(_resolve_directory(source), source=source)
    with _cache_lock:
        cached = _cache.setdefault(source, tokenizer)
        while len(_cache) > MAX_TOKENIZERS:
            _cache.pop(next(iter(_cache)))
        return cached


class Detokenizer:
    """Incremental ids -> text for one generated sequence, with stop strings.

    `feed(ids)` returns the text that is safe to show now: never a partial UTF-8 character
    (DecodeStream holds incomplete byte sequences back), never text that could still turn
    out to be the start of a stop string. When a stop string appears, `stopped` becomes True
    and the text before it is the last text returned; the stop string itself is not shown
    (OpenAI semantics). `flush()` returns what was held back once the stream ends without a
    stop.
    """

    __slots__ = ("_held", "_max_stop", "_rust", "_stops", "_stream", "stopped")

    def __init__(self, tokenizer: Tokenizer, *, stop: Iterable[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self._rust = tokenizer.rust
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stops = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, ids: list[int]) -> str:
        if self.stopped or not ids:
            return ""
        if len(ids) > 1:
            # One id per DecodeStream step: given a list that ends inside a UTF-8 character,
            # step() holds back the text of the whole list (not just the partial character),
            # and at the end of the stream nothing releases it. Per id, a batch's text is the
            # same as if its tokens had come one at a time.
            return "".join([self.feed([i]) for i in ids])
        text = self._stream.step(self._rust, ids)
        if not self._stops:
            return text or ""
        if not text:
            return ""
        return self._match_stops(self._held + text)

    def _match_stops(self, buf: str) -> str:
        # A stop string can only start inside the held tail or the new text: anything emitted
        # earlier had no suffix that was a prefix of a stop string.
        first = -1
        for s in self._stops:
            at = buf.find(s)
            if at != -1 and (first == -1 or at < first):
                first = at
        if first != -1:
            self.stopped = True
            self._held = ""
            return buf[:first]
        hold = 0
        tail_window = min(len(buf), self._max_stop - 1)
        for s in self._stops:
            for k in range(min(len(s) - 1, tail_window), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        if hold:
            self._held = buf[-hold:]
            return buf[:-hold]
        self._held = ""
        return buf

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
