"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) over a paged KV cache.

One step computes a packed batch: every scheduled token of every sequence sits in one
[tokens, hidden] matrix, so the projections and the MLP are single matmuls with no padding.
Only attention is per sequence, and it reads each sequence's past K/V from the cache blocks
its block table names. The runner orders a step as: single-token chunks first (decodes,
sorted by context length and attended in a few batched calls, each padded only to the
longest context of its group), then multi-token chunks (prefill pieces, one causal attention
call each). A decode group that keeps the same sequences from step to step attends over a
dense copy of its past K/V that each step appends to (DecodeKV) instead of gathering it again.

Weights stay in Hugging Face naming until here; q/k/v and gate/up are fused at load so each
layer runs three large matmuls instead of five.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genset.engines.torch.config import ModelConfig
from genset.engines.torch.rope import RotaryEmbedding


@dataclass(slots=True)
class PrefillSpan:
    """One multi-token chunk inside the packed batch."""

    start: int  # row of its first token in the packed batch
    end: int
    ctx_slots: torch.Tensor | None  # cache slots of positions [0, last]; None: no past context
    mask: torch.Tensor | None  # [n, ctx] bool (True = may attend); None: plain causal


class DecodeKV:
    """A decode group's past K/V kept dense across steps: [layers, 2, D, kv_heads, cap,
    head_dim], row d holding positions [0, next_pos[d]) of the group's d-th sequence.

    Gathering every sequence's context out of the paged cache costs about as much as the
    attention itself, every step. While a group keeps the same sequences from one step to
    the next (the common case), its context only grows by one position per sequence, so the
    runner keeps this copy and the model appends to it instead of gathering again. The paged
    cache stays the source of truth (prefix cache, export, preemption); this is a cache of
    the gather, rebuilt from it whenever the group changes.
    """

    __slots__ = ("kv", "last_step", "next_pos", "pending")

    def __init__(self, kv: torch.Tensor, next_pos: list[int], last_step: int):
        self.kv = kv
        self.next_pos = next_pos  # per row: positions held after step `last_step`
        self.last_step = last_step  # the runner's step number that last completed with it
        self.pending = next_pos  # next_pos once the step in flight completes

    @property
    def cap(self) -> int:
        return self.kv.shape[4]


@dataclass(slots=True)
class DecodeGroup:
    """Single-token chunks of similar context length, attended in one batched call."""

    start: int  # rows [start, end) of the packed batch
    end: int
    slots: torch.Tensor | None  # [D, L] int64 cache slots of each context, padded to the
    # longest (None when `dense` already holds the past and only this step's K/V is appended)
    mask: torch.Tensor  # [D, 1, 1, L] additive, in the model dtype (0 = real context
    # position, -inf = padding)
    dense: DecodeKV | None = None  # dense copy of the group's K/V, see DecodeKV
    append_rows: torch.Tensor | None = None  # [D * kv_heads] rows of dense.kv[l, i] viewed
    # as [D * kv_heads * cap, head_dim] where this step's K/V go (when slots is None)


@dataclass(slots=True)
class StepMetadata:
    """Per-step attention layout, shared by every layer."""

    positions: torch.Tensor  # [T] int64, absolute position of each packed token
    slots: torch.Tensor  # [T] int64, cache slot (block * block_size + offset) to write
    decodes: list[DecodeGroup]  # at the front of the packed batch
    prefills: list[PrefillSpan]  # after the decodes
    sample_rows: torch.Tensor | None  # rows whose next-token logits are wanted; None: all


# MKL's pre-packed sgemm (torch.ops.mkl._mkl_linear) takes its fast path only when a call's
# row count equals the row count the weight was packed for: packed for 8 rows, a 7- or
# 32-row call runs at plain-sgemm speed (measured on every weight shape of the tiny model).
# So the weights are packed for several row counts, and a small batch is padded up to the
# nearest one when the padding is cheap. Results equal F.linear up to float32 rounding (bit
# for bit at a packed row count on the machines measured, ~1e-6 when padded: F.linear itself
# switches kernels with the row count; fewer than 4 rows stay on F.linear for that reason).
_PACK_ROWS = (8, 16, 32)  # in the order they are kept when memory is short
_PACK_MIN_ROWS = 4  # fewer rows: F.linear (see above)
# Packed copies kept per model, all row counts together, at most this many bytes (a packed
# copy holds ~1.5x its weight's bytes); a model too large for one copy is not packed.
_PACK_MAX_BYTES = 256 << 20
_PACKED_BYTES_PER_WEIGHT_BYTE = 1.5


def _can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    )


def pack_rows_for(weight_bytes: int) -> tuple[int, ...]:
    """The row counts to pack a model with `weight_bytes` of matmul weights for."""
    copies = int(_PACK_MAX_BYTES // max(1.0, weight_bytes * _PACKED_BYTES_PER_WEIGHT_BYTE))
    return tuple(sorted(_PACK_ROWS[:copies]))


def padded_rows(rows: tuple[int, ...]) -> list[int]:
    """For each batch size m (index), the packed row count to pad it to, or 0 for F.linear.

    Padding is taken when it is cheap: while a product is bound by reading the weights
    (16 rows or fewer here) any padding, above that at most 1/8 of the padded rows."""
    table = [0] * (max(rows, default=0) + 1)
    for m in range(_PACK_MIN_ROWS, len(table)):
        h = min(r for r in rows if r >= m)
        if h <= 16 or (h - m) * 8 <= h:
            table[m] = h
    return table


class PackedWeight:
    """One weight matrix pre-packed for MKL at several row counts (see _PACK_ROWS)."""

    __slots__ = ("by_rows", "pad_to")

    def __init__(self, w: torch.Tensor, rows: tuple[int, ...], pad_to: list[int]):
        self.by_rows = {r: torch.ops.mkl._mkl_reorder_linear_weight(w, r) for r in rows}
        self.pad_to = pad_to  # shared by the model's weights: padded_rows(rows)


def linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """F.linear(x, w, b), through MKL's pre-packed weight for small batches.

    A plain sgemm packs (copies) the whole weight matrix on every call; for a decode step's
    few rows that copy costs about as much as the product itself. The packed forms are
    computed once at load.
    """
    if packed is not None:
        m = x.shape[0]
        pad_to = packed.pad_to
        rows = pad_to[m] if m < len(pad_to) else 0
        if rows == m and m:
            return torch.ops.mkl._mkl_linear(x, packed.by_rows[m], w, b, m)
        if rows:
            x = F.pad(x, (0, 0, 0, rows - m))
            return torch.ops.mkl._mkl_linear(x, packed.by_rows[rows], w, b, rows)[:m]
    return F.linear(x, w, b)


class _Layer:
    __slots__ = (
        "down",
        "down_p",
        "gate_up",
        "gate_up_p",
        "in_norm",
        "o",
        "o_b",
        "o_p",
        "post_norm",
        "qkv",
        "qkv_b",
        "qkv_p",
    )

    def __init__(self, w: dict[str, torch.Tensor], p: str, cfg: ModelConfig):
        # Tensors are popped from `w` as they are fused, so a large checkpoint is never held
        # twice (only one layer's worth of extra memory while loading).
        attn = f"{p}.self_attn"
        self.in_norm = w.pop(f"{p}.input_layernorm.weight")
        self.post_norm = w.pop(f"{p}.post_attention_layernorm.weight")
        self.qkv = torch.cat([w.pop(f"{attn}.{n}_proj.weight") for n in "qkv"])
        self.qkv_b = (
            torch.cat([w.pop(f"{attn}.{n}_proj.bias") for n in "qkv"]) if cfg.qkv_bias else None
        )
        self.o = w.pop(f"{attn}.o_proj.weight")
        self.o_b = w.pop(f"{attn}.o_proj.bias") if cfg.o_bias else None
        mlp = f"{p}.mlp"
        self.gate_up = torch.cat([w.pop(f"{mlp}.gate_proj.weight"), w.pop(f"{mlp}.up_proj.weight")])
        self.down = w.pop(f"{mlp}.down_proj.weight")
        self.qkv_p = self.o_p = self.gate_up_p = self.down_p = None

    def pack(self, rows: tuple[int, ...], pad_to: list[int]) -> None:
        self.qkv_p = PackedWeight(self.qkv, rows, pad_to)
        self.o_p = PackedWeight(self.o, rows, pad_to)
        self.gate_up_p = PackedWeight(self.gate_up, rows, pad_to)
        self.down_p = PackedWeight(self.down, rows, pad_to)

    def state_dict(self, p: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        attn, mlp = f"{p}.self_attn", f"{p}.mlp"
        sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        out = {
            f"{p}.input_layernorm.weight": self.in_norm,
            f"{p}.post_attention_layernorm.weight": self.post_norm,
            f"{attn}.o_proj.weight": self.o,
            f"{mlp}.down_proj.weight": self.down,
        }
        for n, t in zip("qkv", self.qkv.split(sizes), strict=True):
            out[f"{attn}.{n}_proj.weight"] = t
        if self.qkv_b is not None:
            for n, t in zip("qkv", self.qkv_b.split(sizes), strict=True):
                out[f"{attn}.{n}_proj.bias"] = t
        if self.o_b is not None:
            out[f"{attn}.o_proj.bias"] = self.o_b
        gate, up = self.gate_up.chunk(2)
        out[f"{mlp}.gate_proj.weight"], out[f"{mlp}.up_proj.weight"] = gate, up
        return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # torch's fused kernel: one op instead of six, bit-identical to the formula below
        # in float32 (checked against it in the tests).
        return F.rms_norm(x, weight.shape, weight, eps)
    # Normalise in float32 whatever the weight dtype, like the reference implementations, so
    # bf16 runs round the same way.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    """Forward pass of a Llama/Qwen2/Mistral decoder; holds weights, not the cache."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ):
        if cfg.mlp_bias:
            # No Llama/Qwen2/Mistral checkpoint we know of sets it; refuse rather than guess.
            raise ValueError("field 'mlp_bias': MLP biases are not supported")
        self.cfg = cfg
        self.device, self.dtype = device, dtype
        # Takes ownership of `weights`: entries are popped as they are fused, so the unfused
        # originals can be freed layer by layer.
        w = weights
        self.embed = w.pop("model.embed_tokens.weight")
        self.norm = w.pop("model.norm.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else w.pop("lm_head.weight")
        self.layers = [_Layer(w, f"model.layers.{i}", cfg) for i in range(cfg.num_layers)]
        self.rope = RotaryEmbedding(cfg, device, dtype)
        self.lm_head_p: PackedWeight | None = None
        self.packed_rows: tuple[int, ...] = ()
        if _can_pack(device, dtype):
            matmul_bytes = sum(
                t.numel() * t.element_size()
                for layer in self.layers
                for t in (layer.qkv, layer.o, layer.gate_up, layer.down)
            ) + self.lm_head.numel() * self.lm_head.element_size()
            self.packed_rows = pack_rows_for(matmul_bytes)
        if self.packed_rows:
            pad_to = padded_rows(self.packed_rows)
            for layer in self.layers:
                layer.pack(self.packed_rows, pad_to)
            self.lm_head_p = PackedWeight(self.lm_head, self.packed_rows, pad_to)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under their Hugging Face names (views of the fused tensors, no copy):
        what a reference implementation loads to compute the same function."""
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not self.cfg.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            out |= layer.state_dict(f"model.layers.{i}", self.cfg)
        return out

    def forward(
        self, input_ids: torch.Tensor, meta: StepMetadata, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """Writes this step's K/V into kv_cache [layers, 2, blocks, block_size, kv_heads,
        head_dim] and returns float32 logits for meta.sample_rows."""
        cfg = self.cfg
        h = F.embedding(input_ids, self.embed)
        rope = self.rope.lookup(meta.positions)
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.in_norm, cfg.rms_norm_eps)
            h += self._attention(x, layer, meta, kv_cache[i], rope, i)
            x = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
            # In place on the fused projection's output: no [tokens, intermediate] temporaries
            # (for a prefill chunk, fresh multi-MB buffers cost page faults every layer).
            gate, up = linear(x, layer.gate_up, None, layer.gate_up_p).chunk(2, dim=-1)
            h += linear(F.silu(gate, inplace=True).mul_(up), layer.down, None, layer.down_p)
        if meta.sample_rows is not None:
            h = h.index_select(0, meta.sample_rows)
        h = rms_norm(h, self.norm, cfg.rms_norm_eps)
        return linear(h, self.lm_head, None, self.lm_head_p).float()

    def _attention(
        self,
        x: torch.Tensor,
        layer: _Layer,
        meta: StepMetadata,
        cache: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layer_idx: int,
    ) -> torch.Tensor:
        cfg = self.cfg
        t = x.shape[0]
        qkv = linear(x, layer.qkv, layer.qkv_b, layer.qkv_p).view(t, -1, cfg.head_dim)
        # q and k heads are adjacent in the fused projection: rotate them in one go.
        nq, nkv = cfg.num_heads, cfg.num_kv_heads
        qk = self.rope.apply(qkv[:, : nq + nkv], *rope)
        q, k = qk[:, :nq], qk[:, nq:]
        v = qkv[:, nq + nkv :]

        k_cache = cache[0].view(-1, cfg.num_kv_heads, cfg.head_dim)
        v_cache = cache[1].view(-1, cfg.num_kv_heads, cfg.head_dim)
        k_cache.index_copy_(0, meta.slots, k)
        v_cache.index_copy_(0, meta.slots, v)

        gqa = nq != nkv
        outs = []
        for g in meta.decodes:
            d, width = g.mask.shape[0], g.mask.shape[-1]
            if g.dense is None or g.slots is not None:
                # Each decode's context, gathered slot by slot (index_select copies whole
                # rows, several times faster than advanced indexing).
                kd = k_cache.index_select(0, g.slots.view(-1)).view(d, width, nkv, -1)
                vd = v_cache.index_select(0, g.slots.view(-1)).view(d, width, nkv, -1)
                kd, vd = kd.transpose(1, 2), vd.transpose(1, 2)
                if g.dense is not None:  # first step of a group kept dense: fill its copy
                    g.dense.kv[layer_idx, 0, :, :, :width].copy_(kd)
                    g.dense.kv[layer_idx, 1, :, :, :width].copy_(vd)
                    # Columns past `width` are read (masked) by later steps for the shorter
                    # rows of the group; a masked column still enters the product as
                    # 0 * value, so uninitialised memory there (NaN/inf) would poison them.
                    g.dense.kv[layer_idx, :, :, :, width:].zero_()
            else:
                # The past is already dense: append this step's K/V (one row per head).
                rows = g.dense.kv[layer_idx].view(2, -1, cfg.head_dim)
                rows[0].index_copy_(0, g.append_rows, k[g.start : g.end].reshape(-1, cfg.head_dim))
                rows[1].index_copy_(0, g.append_rows, v[g.start : g.end].reshape(-1, cfg.head_dim))
                kd = g.dense.kv[layer_idx, 0, :, :, :width]
                vd = g.dense.kv[layer_idx, 1, :, :, :width]
            # One query per head: the query heads sharing a KV head stand in for query
            # positions ([D, kv_heads, group, hd]), so GQA needs no K/V expansion.
            qd = q[g.start : g.end].reshape(d, nkv, nq // nkv, cfg.head_dim)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=g.mask)
            outs.append(od.reshape(d, nq, cfg.head_dim))
        if len(outs) == 1 and meta.decodes[0].end == t:  # one group, nothing else: no merge
            return linear(outs[0].reshape(t, cfg.q_size), layer.o, layer.o_b, layer.o_p)
        out = torch.empty((t, nq, cfg.head_dim), dtype=x.dtype, device=x.device)
        for g, od in zip(meta.decodes, outs, strict=True):
            out[g.start : g.end] = od
        for span in meta.prefills:
            qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)
            if span.ctx_slots is None:
                ks, vs = k[span.start : span.end], v[span.start : span.end]
            else:
                ks = k_cache.index_select(0, span.ctx_slots)
                vs = v_cache.index_select(0, span.ctx_slots)
            ks = ks.transpose(0, 1).unsqueeze(0)
            vs = vs.transpose(0, 1).unsqueeze(0)
            os_ = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=span.mask, is_causal=span.mask is None, enable_gqa=gqa
            )
            out[span.start : span.end] = os_.squeeze(0).transpose(0, 1)
        return linear(out.reshape(t, cfg.q_size), layer.o, layer.o_b, layer.o_p)
