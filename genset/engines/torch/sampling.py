"""Next-token sampling: logit processing, greedy, temperature, top-k, top-p, per-request
seeds, log-probabilities.

A seeded request draws token n from a generator seeded by (seed, n) alone, so its text does
not depend on which other requests shared the step, on preemption, or on which engine
instance continued it after a KV transfer.

Logit processing (`process_logits`, only for rows whose spec is `processed`), in this order,
before temperature / top-k / top-p and before greedy's argmax:

1. min_tokens: while fewer than `min_tokens` tokens are out, the ids that would stop the
   request (its stop ids; EOS unless ignored) get -inf, as vLLM does;
2. `logit_bias` is added (OpenAI);
3. `repetition_penalty` p over every token of the prompt and the output so far: a logit
   x > 0 becomes x / p, any other x * p (Hugging Face's `RepetitionPenaltyLogitsProcessor`,
   vLLM's definition);
4. `frequency_penalty` * count + `presence_penalty` * (count > 0) is subtracted, counting the
   generated tokens only (OpenAI's definition, as vLLM applies it).

Each step works from the sequence's token list (no state kept between steps), with one
vectorised update per kind for the whole batch; only requests that use them pay for it.

Log-probabilities (`token_logprobs`): log_softmax of the model's raw logits (float32), before
any of the processing above and before temperature, top-k and top-p. That is what OpenAI
reports (the model's distribution: the same numbers whatever the request's temperature) and
what vLLM returns by default (`logprobs_mode="raw_logprobs"`). The chosen token's entry is
the token actually emitted, which with sampling or penalties need not be the most likely.
"""

from __future__ import annotations

import torch

from genset.engines.batch import SamplingSpec, ScheduledChunk
from genset.engines.types import Logprobs

_MASK64 = (1 << 64) - 1


def _mix(seed: int, index: int) -> int:
    """splitmix64 finaliser over (seed, index): neighbouring indices get unrelated streams."""
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def is_greedy(spec: SamplingSpec) -> bool:
    return spec.temperature <= 0 or spec.top_k == 1


def filtered_probs(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """Probabilities of one row [V] after temperature, top-k and top-p."""
    x = logits.float() / spec.temperature
    vocab = x.shape[-1]
    if 0 < spec.top_k < vocab:
        kth = torch.topk(x, spec.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if spec.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the top token
        # always stays.
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= spec.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum()
    return probs


def sample(
    logits: torch.Tensor,
    specs: list[SamplingSpec],
    output_indices: list[int],
    fallback: torch.Generator,
) -> list[int]:
    """One token per row of `logits` [S, V]; `fallback` drives requests without a seed."""
    out = [0] * len(specs)
    greedy = [i for i, s in enumerate(specs) if is_greedy(s)]
    if greedy:
        rows = logits if len(greedy) == len(specs) else logits[greedy]
        picked = rows.argmax(dim=-1).tolist()
        for i, t in zip(greedy, picked, strict=True):
            out[i] = t
    if len(greedy) == len(specs):
        return out
    # Random draws on the CPU: identical streams whatever device computed the logits.
    rows = logits.float().cpu()
    for i, spec in enumerate(specs):
        if is_greedy(spec):
            continue
        probs = filtered_probs(rows[i], spec)
        if spec.seed is None:
            g = fallback
        else:
            g = torch.Generator().manual_seed(_mix(spec.seed, output_indices[i]))
        out[i] = int(torch.multinomial(probs, 1, generator=g).item())
    return out


def process_logits(logits: torch.Tensor, chunks: list[ScheduledChunk]) -> None:
    """Apply min_tokens masks, logit_bias and penalties (module docstring) in place to the
    rows of `logits` [S, V] (row i is `chunks[i]`'s) whose spec is `processed`."""
    vocab = logits.shape[-1]
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_vals: list[float] = []
    rep_parts: list[torch.Tensor] = []  # flat row * vocab + token ids, prompt and output
    pen_parts: list[torch.Tensor] = []  # the same, output only
    rep = [1.0] * len(chunks)
    freq = [0.0] * len(chunks)
    pres = [0.0] * len(chunks)
    for r, c in enumerate(chunks):
        spec = c.sampling
        if not spec.processed:
            continue
        if c.output_index < spec.min_tokens:
            ids = [t for t in spec.banned_until_min if t < vocab]  # stop ids may lie outside
            ban_rows.extend([r] * len(ids))
            ban_ids.extend(ids)
        if spec.logit_bias:
            bias_rows.extend([r] * len(spec.logit_bias))
            bias_ids.extend(spec.logit_bias)
            bias_vals.extend(spec.logit_bias.values())
        seen = c.seq_tokens or []
        if spec.repetition_penalty != 1.0 and seen:
            rep[r] = spec.repetition_penalty
            rep_parts.append(torch.tensor(seen, dtype=torch.long) + r * vocab)
        if (spec.frequency_penalty != 0.0 or spec.presence_penalty != 0.0) and (
            len(seen) > c.prompt_len
        ):
            freq[r] = spec.frequency_penalty
            pres[r] = spec.presence_penalty
            pen_parts.append(torch.tensor(seen[c.prompt_len :], dtype=torch.long) + r * vocab)
    dev = logits.device
    if ban_ids:
        logits[_t(ban_rows, dev), _t(ban_ids, dev)] = float("-inf")
    if bias_ids:
        logits.index_put_(
            (_t(bias_rows, dev), _t(bias_ids, dev)),
            torch.tensor(bias_vals, dtype=logits.dtype, device=dev),
            accumulate=True,
        )
    if rep_parts:
        # each (row, token) once, however often the token was seen
        flat = torch.unique(torch.cat(rep_parts)).to(dev)
        rows, cols = flat // vocab, flat % vocab
        p = torch.tensor(rep, dtype=logits.dtype, device=dev)[rows]
        x = logits[rows, cols]
        logits[rows, cols] = torch.where(x > 0, x / p, x * p)
    if pen_parts:
        flat, counts = torch.unique(torch.cat(pen_parts), return_counts=True)
        flat, counts = flat.to(dev), counts.to(dev)
        rows, cols = flat // vocab, flat % vocab
        f = torch.tensor(freq, dtype=logits.dtype, device=dev)[rows]
        pr = torch.tensor(pres, dtype=logits.dtype, device=dev)[rows]
        logits[rows, cols] -= f * counts.to(logits.dtype) + pr


def token_logprobs(raw_logits: torch.Tensor, tokens: list[int], ks: list[int]) -> list[Logprobs]:
    """For rows of raw (unprocessed) logits [R, V]: the log-probability of `tokens[i]` and
    the `ks[i]` most likely tokens of row i, most likely first (module docstring)."""
    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long, device=lp.device)[:, None])
    chosen_l = chosen[:, 0].tolist()
    kmax = max(ks)
    if kmax:
        top = torch.topk(lp, kmax, dim=-1)
        top_v, top_i = top.values.tolist(), top.indices.tolist()
    else:
        top_v = top_i = [[] for _ in tokens]
    return [
        Logprobs([chosen_l[i]], [top_i[i][:k]], [top_v[i][:k]]) for i, k in enumerate(ks)
    ]


def _t(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
