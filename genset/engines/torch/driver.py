"""A minimal driver for a ModelRunner: continuous batching under a token budget with chunked
prefill, blocks handed out statically (no prefix cache, no preemption).

It exists so the runner can be tested and benchmarked on its own, independent of the shared
scheduler; the real engine (engine.py) drives the runner through genset's scheduler instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from genset.engines.batch import SamplingSpec, ScheduledChunk, StepPlan
from genset.engines.torch.runner import ModelRunner


@dataclass
class _Seq:
    seq_id: str
    tokens: list[int]  # prompt + generated so far
    prompt_len: int
    max_tokens: int
    sampling: SamplingSpec
    blocks: list[int]
    computed: int = 0  # tokens whose KV is in the cache
    output: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_tokens


def generate(
    runner: ModelRunner,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    token_budget: int = 256,
    sampling: SamplingSpec | list[SamplingSpec] | None = None,
    stop_on_eos: bool = False,
    on_step=None,
) -> list[list[int]]:
    """Generate up to `max_tokens` tokens for every prompt; returns the generated ids.

    Each step schedules every running decode first (one token each), then fills the rest of
    `token_budget` with prompt chunks in arrival order. `on_step(plan, tokens)` is called
    after each step (tests use it to observe chunking and timing).
    """
    bs = runner.block_size
    specs = (
        sampling if isinstance(sampling, list) else [sampling or SamplingSpec(0.0)] * len(prompts)
    )
    free = list(range(runner.num_blocks))
    seqs = []
    for i, p in enumerate(prompts):
        need = math.ceil((len(p) + max_tokens) / bs)
        if need > len(free):
            raise ValueError(f"not enough KV blocks for prompt {i}: need {need}, have {len(free)}")
        blocks, free = free[:need], free[need:]
        seqs.append(_Seq(f"s{i}", list(p), len(p), max_tokens, specs[i], blocks))

    while True:
        active = [s for s in seqs if not s.done]
        if not active:
            break
        chunks: list[ScheduledChunk] = []
        owners: list[_Seq] = []
        budget = token_budget
        for s in active:
            if s.computed >= s.prompt_len and budget > 0:
                chunks.append(_chunk(s, [s.tokens[-1]], s.computed, True))
                owners.append(s)
                budget -= 1
        for s in active:
            if s.computed < s.prompt_len and budget > 0:
                n = min(budget, s.prompt_len - s.computed)
                last = s.computed + n == s.prompt_len
                chunks.append(_chunk(s, s.tokens[s.computed : s.computed + n], s.computed, last))
                owners.append(s)
                budget -= n
        plan = StepPlan(chunks)
        out = runner.execute(plan)
        for s, c, t in zip(owners, chunks, out, strict=True):
            s.computed += len(c.token_ids)
            if t is not None:
                s.output.append(t)
                s.tokens.append(t)
                if stop_on_eos and t in runner.eos_token_ids:
                    s.max_tokens = len(s.output)
            elif c.sample:  # its logits gave no token (runner.step_errors): it ends here
                s.max_tokens = len(s.output)
        if on_step is not None:
            on_step(plan, out)
    return [s.output for s in seqs]


def _chunk(s: _Seq, ids: list[int], start: int, sample: bool) -> ScheduledChunk:
    return ScheduledChunk(
        seq_id=s.seq_id,
        token_ids=ids,
        start_pos=start,
        block_table=s.blocks,
        sample=sample,
        sampling=s.sampling,
        output_index=len(s.output),
    )
