"""The contract between the shared scheduler and an executor (torch model runner or mocker).

The scheduler (genset/engines/scheduler.py) decides, each step, which slice of which sequence
is computed; an executor turns that plan into sampled tokens (torch) or into a step time
(mocker). Keeping this boundary small is what lets one scheduler and block pool drive both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class SamplingSpec:
    """Per-request sampling settings as the executor needs them (made once per request).

    `processed` is False when no bias, penalty or min_tokens mask applies: the executor's
    plain path, which costs what sampling cost before these existed. `banned_until_min`: the
    token ids that would stop the request (its stop ids, and EOS unless ignored), masked
    while fewer than `min_tokens` tokens are out.
    """

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None = off; k = alternatives per token
    min_tokens: int = 0
    banned_until_min: tuple[int, ...] = ()
    processed: bool = False
    # The executor's per-request cache, made on first use and gone with the request (the
    # torch runner: the prompt's ids as a tensor, for the repetition penalty).
    executor_state: Any = None


@dataclass(slots=True)
class ScheduledChunk:
    """One sequence's share of one engine step.

    `token_ids` are the tokens whose KV is computed this step, at positions
    `start_pos .. start_pos+len(token_ids)-1`; everything before `start_pos` is already in the
    KV cache, in the physical blocks listed by `block_table` (which also covers the new
    positions: block i holds positions [i*block_size, (i+1)*block_size)).
    `sample` is True when the last token of this chunk is the last known token of the
    sequence (prompt fully computed, or a decode step), so a next token must be sampled.
    `output_index` counts tokens generated so far (for per-request seeded sampling).
    `seq_tokens` is the sequence's whole token list (prompt, then `output_index` generated
    tokens from `prompt_len` on; the scheduler's own list, not a copy: read it, never keep
    or change it), for penalties over what was seen so far.
    """

    seq_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    output_index: int = 0
    seq_tokens: list[int] | None = None
    prompt_len: int = 0


@dataclass(slots=True)
class StepPlan:
    """Everything an executor needs for one step, in scheduling order."""

    chunks: list[ScheduledChunk]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)
