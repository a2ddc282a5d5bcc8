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

Step 1's -inf is written last: bias and penalties leave -inf as it is, so the result is the
same, but the repetition penalty's blend (x + seen * (penalised - x)) turned a -inf into
NaN (-inf - -inf), which made greedy emit the banned stop id and sampling raise.

Rows that give no token: a row whose logits hold NaN or +inf, or nothing above -inf (the
model blew up numerically, e.g. attention overflowing on huge-but-finite imported K/V), or
whose division by a tiny temperature overflowed, has no distribution to draw from:
`sample` returns None for it, the runner reports it (`ModelRunner.step_errors`) and the
engine ends that one request with an error while the rest of the batch goes on. The check
rides on work sampling does anyway: greedy rows take `max(dim=-1)` (value and index in the
one pass argmax made), sampled rows one `max()` of the temperature-scaled row before its
softmax; costs measured in `sample`'s comment.

Each step works from the sequence's token list (only the prompt's ids are kept, as a
tensor, between steps), with one vectorised update per kind for the whole batch; only
requests that use them pay for it.

Log-probabilities (`token_logprobs`): log_softmax of the model's raw logits (float32), before
any of the processing above and before temperature, top-k and top-p. That is what OpenAI
reports (the model's distribution: the same numbers whatever the request's temperature) and
what vLLM returns by default (`logprobs_mode="raw_logprobs"`). The chosen token's entry is
the token actually emitted, which with sampling or penalties need not be the most likely.
"""

from __future__ import annotations

import math

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


def filtered_probs(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor | None:
    """Probabilities of one row [V] after temperature, top-k and top-p; None when the row,
    divided by the temperature, holds NaN or +inf or nothing above -inf (no distribution:
    softmax would give NaN, and `torch.multinomial` raises on it)."""
    x = logits.float() / spec.temperature
    if not math.isfinite(x.max().item()):
        return None
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
) -> list[int | None]:
    """One token per row of `logits` [S, V]; `fallback` drives requests without a seed.

    None for a row that gives no token: its logits hold NaN or +inf, or none is above -inf
    (the model blew up numerically, e.g. on corrupt KV), or dividing them by the request's
    temperature overflowed (module docstring, "Rows that give no token"). The other rows are
    sampled as usual; the caller ends only the requests of the None rows.

    The check's cost, measured on this machine's CPU (one thread, float32 logits, load
    1.8-2.1, medians of 30-400 calls, 3 alternated runs): greedy, `max(dim=-1)` + isfinite
    + where against the former `argmax(dim=-1)`, both with `.tolist()`: tiny model (batch 8
    x 4,096) 39 against 30 us; batch 64 x 4,096 and batch 64 x 128k (32 MiB of logits, 7-13
    ms either way) within the run-to-run noise, as both are one pass over the logits.
    Sampled rows: the divide + max of one row, 5 us (4,096) and 35-44 us (128k), against
    0.2-0.36 ms and ~5.5 ms for that row's whole draw (softmax, top-k/top-p, multinomial).
    On a GPU the greedy check adds two tiny kernels on [S] and no extra sync (the one
    `.tolist()` stays).
    """
    out: list[int | None] = [None] * len(specs)
    greedy = [i for i, s in enumerate(specs) if is_greedy(s)]
    if greedy:
        rows = logits if len(greedy) == len(specs) else logits[greedy]
        # max, not argmax: the same one pass gives the top value too, which says whether
        # the row is usable (argmax alone picks a NaN's index as if it were the top logit)
        peak, top = rows.max(dim=-1)
        picked = torch.where(torch.isfinite(peak), top, -1).tolist()
        for i, t in zip(greedy, picked, strict=True):
            out[i] = t if t >= 0 else None
    if len(greedy) == len(specs):
        return out
    # Random draws on the CPU: identical streams whatever device computed the logits.
    rows = logits.float().cpu()
    for i, spec in enumerate(specs):
        if is_greedy(spec):
            continue
        probs = filtered_probs(rows[i], spec)
        if probs is None:
            continue
        if spec.seed is None:
            g = fallback
        else:
            g = torch.Generator().manual_seed(_mix(spec.seed, output_indices[i]))
        out[i] = int(torch.multinomial(probs, 1, generator=g).item())
    return out


def process_logits(logits: torch.Tensor, chunks: list[ScheduledChunk]) -> None:
    """Apply logit_bias, penalties and min_tokens masks (module docstring) in place to the
    rows of `logits` [S, V] (row i is `chunks[i]`'s) whose spec is `processed`.

    Penalties work on dense [rows, V] masks / counts of the penalised rows, filled and
    applied with a handful of ops for the whole batch (no op per row: on a GPU each op is a
    kernel launch). The prompt's ids are turned into a
    tensor once per request (kept in its spec); only the generated tokens are converted each
    step. Measured on this machine's CPU (tiny model, one thread, batch 32, 1,000-token
    prompts + 200 outputs, all three penalties on every request): ~1.5 ms of CPU time here,
    against a ~16-19 ms decode step; requests without them cost nothing here.
    """
    vocab = logits.shape[-1]
    dev = logits.device
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_vals: list[float] = []
    rep: list[tuple[int, float, torch.Tensor, torch.Tensor | None]] = []
    pen: list[tuple[int, float, float, torch.Tensor]] = []
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
        seen = c.seq_tokens
        if not seen or (spec.repetition_penalty == 1.0 and spec.frequency_penalty == 0.0
                        and spec.presence_penalty == 0.0):
            continue
        out = _t(seen[c.prompt_len :], dev) if len(seen) > c.prompt_len else None
        if spec.repetition_penalty != 1.0:
            prompt = spec.executor_state
            if prompt is None:
                prompt = spec.executor_state = _t(seen[: c.prompt_len], dev)
            rep.append((r, spec.repetition_penalty, prompt, out))
        if out is not None and (spec.frequency_penalty != 0.0 or spec.presence_penalty != 0.0):
            pen.append((r, spec.frequency_penalty, spec.presence_penalty, out))
    if bias_ids:
        logits.index_put_(
            (_t(bias_rows, dev), _t(bias_ids, dev)),
            torch.tensor(bias_vals, dtype=logits.dtype, device=dev),
            accumulate=True,
        )
    # Float arithmetic only (clamp, mul, add): on CPU, torch.where and comparisons producing
    # bool masks cost ~100x a float op of the same size (1.9 ms vs 17 us for 32 x 4096,
    # measured); on a GPU either is a few kernels.
    if rep:
        parts = [t for _, _, prompt, out in rep for t in (prompt, out) if t is not None]
        lens = [len(prompt) + (0 if out is None else len(out)) for _, _, prompt, out in rep]
        seen = torch.zeros(len(rep) * vocab, dtype=logits.dtype, device=dev)
        seen.index_fill_(0, _flat(parts, lens, vocab, dev), 1.0)
        rows = _t([r for r, *_ in rep], dev)
        p = torch.tensor([x[1] for x in rep], dtype=logits.dtype, device=dev)[:, None]
        x = logits[rows]
        penalised = x.clamp(min=0) / p + x.clamp(max=0) * p  # x > 0: x / p, else x * p
        logits[rows] = x + seen.view(len(rep), vocab) * (penalised - x)
    if pen:
        flat = _flat([out for *_, out in pen], [len(out) for *_, out in pen], vocab, dev)
        counts = torch.bincount(flat, minlength=len(pen) * vocab).view(len(pen), vocab)
        counts = counts.to(logits.dtype)
        rows = _t([r for r, *_ in pen], dev)
        f = torch.tensor([x[1] for x in pen], dtype=logits.dtype, device=dev)[:, None]
        pr = torch.tensor([x[2] for x in pen], dtype=logits.dtype, device=dev)[:, None]
        logits[rows] -= f * counts + pr * counts.clamp(max=1)  # clamp: 1 where generated
    # min_tokens' ban last (module docstring): the same result as first, without the NaN the
    # repetition penalty's blend made of a -inf
    if ban_ids:
        logits[_t(ban_rows, dev), _t(ban_ids, dev)] = float("-inf")


def _flat(parts: list[torch.Tensor], lens: list[int], vocab: int, dev) -> torch.Tensor:
    """Row j's token ids (the parts, consecutive, `lens[j]` per row) as j * vocab + id."""
    ids = torch.cat(parts) if len(parts) > 1 else parts[0]
    rows = torch.repeat_interleave(
        torch.arange(len(lens), device=dev) * vocab, _t(lens, dev), output_size=ids.numel()
    )
    return rows + ids


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
