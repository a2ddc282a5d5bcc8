"""The text side of a generation: token ids in, deltas (text + the ids it came from) out.

Incremental detokenizing and stop strings (both in `genset.tokenizer.Detokenizer`), plus the
frontend's own bookkeeping around them: a stop token id produces no text, and ids whose text
is not out yet (half a character, a possible start of a stop string) are held back and go out
with the text that completes them, so every delta's ids and text belong together. Pure logic
(no I/O): one instance per request, kept across the workers the request moves between.
"""

from __future__ import annotations

from genset.tokenizer import Tokenizer


class Delta:
    """Generated text (and its token ids) since the previous delta."""

    __slots__ = ("logprobs", "text", "token_ids")

    def __init__(self, text: str, token_ids: list[int], logprobs: list | None = None) -> None:
        self.text = text
        self.token_ids = token_ids
        # with sampling.logprobs: one (id, logprob, [(alt id, logprob), ...]) per token id
        self.logprobs = logprobs


class TextAssembler:
    """`feed(ids)` per worker chunk, `flush()` at the end. Without a tokenizer (or with
    detokenize off) every chunk is a delta with empty text and stop strings do not apply."""

    __slots__ = ("_detok", "_held", "_stop_ids", "stopped")

    def __init__(self, tokenizer: Tokenizer | None, *, detokenize: bool = True,
                 stop_strings: list[str] | None = None,
                 stop_token_ids: list[int] | None = None) -> None:
        self._detok = (tokenizer.detokenizer(stop=stop_strings or ())
                       if detokenize and tokenizer is not None else None)
        self._stop_ids = frozenset(stop_token_ids or ())
        self._held: list[int] = []  # ids received whose text is not out yet
        self.stopped = False  # a stop string matched: the delta that feed returned is the last

    def feed(self, ids: list[int]) -> Delta | None:
        """The delta these ids complete, or None while their text is held back."""
        detok = self._detok
        if detok is None:
            return Delta("", ids)
        stop_ids = self._stop_ids
        # The engine's stop token ends the sequence; it has no text of its own.
        text = detok.feed(ids[:-1] if stop_ids and ids[-1] in stop_ids else ids)
        if self._held:
            ids = self._held + ids
            self._held = []
        if detok.stopped:
            self.stopped = True
            return Delta(text, ids)
        if text:
            return Delta(text, ids)
        self._held = ids
        return None

    def flush(self) -> Delta | None:
        """The text and ids still held back, at the end of the generation."""
        detok = self._detok
        if detok is None:
            return None
        tail = detok.flush()
        held = self._held
        if not tail and not held:
            return None
        self._held = []
        return Delta(tail, held)
