"""Rotary position embeddings, including the static scaling schemes checkpoints ship with.

The inverse frequencies follow the published definitions (linear interpolation, Llama 3.1's
wavelength-banded scaling, YaRN); tests compare them with transformers' implementation.
"""

from __future__ import annotations

import math

import torch

from genset.engines.torch.config import ModelConfig, RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention scale applied to cos/sin)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    base_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "default":
        return base_freq, 1.0
    if rope.type == "linear":
        return base_freq / rope.factor, 1.0
    if rope.type == "llama3":
        return _llama3(rope, base_freq), 1.0
    if rope.type == "yarn":
        return _yarn(rope, head_dim)
    raise ValueError(f"unsupported rope type {rope.type!r}")


def _llama3(rope: RopeConfig, freq: torch.Tensor) -> torch.Tensor:
    # Long wavelengths (beyond the original context / low_freq_factor) are interpolated by
    # `factor`, short ones kept, and the band in between blended linearly in 1/wavelength.
    old_ctx = rope.original_max_position_embeddings
    long_wl = old_ctx / rope.low_freq_factor
    short_wl = old_ctx / rope.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > long_wl, freq / rope.factor, freq)
    blend = (old_ctx / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - blend) * scaled / rope.factor + blend * scaled
    in_band = (wavelen >= short_wl) & (wavelen <= long_wl)
    return torch.where(in_band, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor, base = rope.factor, rope.theta
    orig = rope.original_max_position_embeddings
    if rope.attention_factor is not None:
        attn = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attn = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attn = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength completes `rotations` turns over the original context.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolate = 1.0 / pos_freqs
    interpolate = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where high-frequency dims keep their original frequency
    return interpolate * (1 - keep) + extrapolate * keep, attn


class RotaryEmbedding:
    """Precomputed cos/sin tables indexed by absolute position (packed batches need no
    per-sequence offsets: each token just looks up its own position)."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
        inv_freq, attn_scale = inverse_frequencies(cfg.rope, cfg.head_dim)
        self.max_positions = cfg.max_position_embeddings
        pos = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        # float32 angles, then cast: matches how reference implementations round.
        self.cos = (freqs.cos() * attn_scale).to(device=device, dtype=dtype)
        self.sin = (freqs.sin() * attn_scale).to(device=device, dtype=dtype)
        self.half = cfg.head_dim // 2

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [tokens, 1, head_dim/2] for a step's positions (shared by all layers)."""
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        return cos, self.sin.index_select(0, positions).unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [tokens, heads, head_dim] (the "rotate half" layout HF checkpoints use)."""
        x1, x2 = x[..., : self.half], x[..., self.half :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
