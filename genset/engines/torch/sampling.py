"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

A seeded request draws token n from a generator seeded by (seed, n) alone, so its text does
not depend on which other requests shared the step, on preemption, or on which engine
instance continued it after a KV transfer.
"""

from __future__ import annotations

import torch

from genset.engines.batch import SamplingSpec

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
