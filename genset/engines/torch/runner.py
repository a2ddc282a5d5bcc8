"""ModelRunner: the torch executor behind the scheduler/executor contract in
genset/engines/batch.py.

It owns the weights and the paged KV cache; it knows nothing about requests, queues or block
allocation. Each `execute(plan)` computes K/V for every scheduled chunk at the slots its block
table names and samples one token for each chunk that asks for it.

KV cache layout: one tensor [layers, 2 (K, V), num_blocks + 1, block_size, kv_heads,
head_dim]; `kv_cache[l, 0]` is layer l's K cache in the [num_blocks + 1, block_size,
kv_heads, head_dim] shape the scheduler's block ids index. The extra last block is never
handed out and never written: it stays zero, and every masked column of a batched decode
attention reads it (see `_decode_group`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from genset.engines.batch import ScheduledChunk, StepPlan
from genset.engines.torch import kvformat
from genset.engines.torch.config import ModelConfig, load_config
from genset.engines.torch.model import (
    DecodeGroup,
    DecodeKV,
    LlamaModel,
    PrefillSpan,
    StepMetadata,
)
from genset.engines.torch.sampling import process_logits, sample, token_logprobs
from genset.engines.torch.tiny import resolve_model
from genset.engines.torch.weights import (
    dummy_weights,
    expected_shapes,
    has_checkpoint,
    load_checkpoint,
)
from genset.engines.types import Logprobs

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig, device: torch.device):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        # Half-precision matmuls are slow (or missing) on most CPUs: compute in float32.
        return torch.float32
    return _DTYPES.get(cfg.torch_dtype or "", torch.bfloat16)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def blocks_for_memory(
    cfg: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype
) -> int:
    """How many KV blocks fit in `memory_bytes`."""
    return max(0, memory_bytes // kv_bytes_per_block(cfg, block_size, dtype))


DEFAULT_CPU_KV_BYTES = 256 << 20


def size_num_blocks(
    cfg: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_bytes: int | None = None,
    *,
    cuda_fraction: float = 0.85,
) -> int:
    """KV blocks for a memory budget: `memory_bytes` if given; on CUDA otherwise
    `cuda_fraction` of the free memory left once the weights are loaded; on CPU 256 MiB."""
    if memory_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            elem = torch.empty((), dtype=dtype).element_size()
            weight_bytes = elem * sum(math.prod(s) for s in expected_shapes(cfg).values())
            memory_bytes = int((free - weight_bytes) * cuda_fraction)
        else:
            memory_bytes = DEFAULT_CPU_KV_BYTES
    n = blocks_for_memory(cfg, memory_bytes, block_size, dtype)
    if n < 1:
        raise ValueError(
            f"KV memory budget of {memory_bytes} bytes holds no block of "
            f"{kv_bytes_per_block(cfg, block_size, dtype)} bytes"
        )
    return n


class ModelRunner:
    """Executes StepPlans on one device.

    `model`: "tiny", a local Hugging Face directory, or a ModelConfig (random weights).
    `weights`: "auto" loads the directory's safetensors, or generates seeded weights when the
    config says so (the tiny model); "dummy" always generates them (from the config's seed,
    else `seed`). `seed` also drives sampling for requests that bring no seed of their own.
    """

    def __init__(
        self,
        model: str | Path | ModelConfig,
        *,
        num_blocks: int,
        block_size: int,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        weights: str = "auto",
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1"
            )
        if weights not in ("auto", "dummy"):
            raise ValueError(f"weights={weights!r}: expected 'auto' or 'dummy'")
        self.device = torch.device(device)
        self.model_dir: Path | None = None
        extra_eos: tuple[int, ...] = ()
        if isinstance(model, ModelConfig):
            cfg = model
        else:
            self.model_dir = resolve_model(model)
            cfg = load_config(self.model_dir)
            extra_eos = _generation_eos(self.model_dir)
        self.config = cfg
        self.dtype = resolve_dtype(dtype, cfg, self.device)

        use_dummy = (
            weights == "dummy"
            or self.model_dir is None
            or (cfg.dummy_weights_seed is not None and not has_checkpoint(self.model_dir))
        )
        if use_dummy:
            wseed = cfg.dummy_weights_seed if cfg.dummy_weights_seed is not None else seed
            w = dummy_weights(cfg, wseed, dtype=self.dtype, device=self.device)
        else:
            w = load_checkpoint(self.model_dir, cfg, dtype=self.dtype, device=self.device)
        self.model = LlamaModel(cfg, w, self.device, self.dtype)
        del w  # the model holds the (fused) tensors now; drop the unfused originals
        # No K or V value this model computes exceeds this (`kv_value_bound`): imported KV
        # beyond it is refused (`RunnerExecutor.decode_kv`)
        self.kv_bound = kv_value_bound(self.model, self.dtype)

        self.block_size = block_size
        self.num_blocks = num_blocks
        # + 1: the zero block the masked columns of decode attention read (module docstring)
        self.kv_cache = torch.zeros(
            (cfg.num_layers, 2, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim),
            dtype=self.dtype,
            device=self.device,
        )
        self.eos_token_ids = tuple(dict.fromkeys(cfg.eos_token_ids + extra_eos))
        self._fallback = torch.Generator().manual_seed(seed)
        self.step_logprobs: list[Logprobs | None] | None = None  # of the last execute
        # Of the last execute: (chunk index in the plan, why) for each chunk whose logits
        # gave no token (NaN or infinite); empty in a healthy step.
        self.step_errors: list[tuple[int, str]] = []
        self.tokens_computed = 0  # total KV positions computed, for tests and metrics
        # Dense decode K/V kept across steps (see model.DecodeKV), keyed by the group's
        # sequence ids; only the groups of the last step are kept, within _DENSE_KV_BYTES.
        self._dense: dict[tuple[str, ...], DecodeKV] = {}
        self._dense_spare: list[torch.Tensor] = []  # storage of dropped entries, for reuse
        # Groups of the last step and of the step being laid out: a dense copy is made only
        # for a group that already existed in the last step (see _decode_group).
        self._prev_groups: set[tuple[str, ...]] = set()
        self._step_groups: set[tuple[str, ...]] = set()
        self._step_no = 0
        # Decode groups attended from a dense copy (appended to) vs gathered from the paged
        # cache, for tests and profiling.
        self.decode_groups_appended = 0
        self.decode_groups_gathered = 0

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The weights in Hugging Face naming (views, no copy): benchmarks and tests load
        them into a transformers model to compare against the same function."""
        return self.model.state_dict()

    # -- model card ---------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.config, self.block_size, self.dtype)

    # -- execution ----------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> list[int | None]:
        """One token per chunk with `sample` set (None for the others), in plan order.
        `step_logprobs` then holds the step's log-probabilities, one entry per chunk (None
        where it sampled nothing or did not ask), or None when no chunk asked.

        A chunk whose logits give no token (NaN or infinite: `sampling.sample`) gets None
        too, and `step_errors` lists (its index in the plan, why); the caller ends those
        requests. Nothing raises for them: the batch's other chunks get their tokens."""
        logits = self.forward_logits(plan)
        self.step_logprobs = None
        self.step_errors = []
        sampled = [c for c in plan.chunks if c.sample]
        if not sampled:
            return [None] * len(plan.chunks)
        specs = [c.sampling for c in sampled]
        with torch.inference_mode():  # the logits are inference tensors: changed in place
            want_lp = [i for i, s in enumerate(specs) if s.logprobs is not None]
            processed = any(s.processed for s in specs)
            # log-probabilities are of the raw logits: keep them before processing
            raw = None
            if want_lp:
                if len(want_lp) < len(specs):
                    raw = logits[want_lp]  # a copy
                else:
                    raw = logits.clone() if processed else logits
            if processed:
                process_logits(logits, sampled)
            tokens = sample(logits, specs, [c.output_index for c in sampled], self._fallback)
            if raw is not None:
                # rows that gave no token have no log-probabilities to report
                keep = [j for j, i in enumerate(want_lp) if tokens[i] is not None]
                by_row: list[Logprobs | None] = [None] * len(sampled)
                if keep:
                    rows = raw if len(keep) == len(want_lp) else raw[keep]
                    lps = token_logprobs(
                        rows,
                        [tokens[want_lp[j]] for j in keep],
                        [specs[want_lp[j]].logprobs or 0 for j in keep],
                    )
                    for j, lp in zip(keep, lps, strict=True):
                        by_row[want_lp[j]] = lp
                it_lp = iter(by_row)
                self.step_logprobs = [next(it_lp) if c.sample else None for c in plan.chunks]
        if None in tokens:
            row = iter(range(len(sampled)))
            for k, c in enumerate(plan.chunks):
                if c.sample and tokens[next(row)] is None:
                    self.step_errors.append((k, _no_token_reason(c)))
        it = iter(tokens)
        return [next(it) if c.sample else None for c in plan.chunks]

    @torch.inference_mode()
    def forward_logits(self, plan: StepPlan) -> torch.Tensor:
        """Run the step; float32 logits [num sampled chunks, vocab] in plan order."""
        if not plan.chunks:
            return torch.empty((0, self.vocab_size))
        for c in plan.chunks:
            self._check_chunk(c)
        # Single-token chunks first, shortest context first (so that similar lengths share a
        # batched attention call), then the multi-token chunks in plan order.
        order = sorted(
            range(len(plan.chunks)),
            key=lambda i: (
                (0, plan.chunks[i].start_pos, i)
                if len(plan.chunks[i].token_ids) == 1
                else (1, 0, i)
            ),
        )
        chunks = [plan.chunks[i] for i in order]
        self._step_no += 1
        self._step_groups = set()
        input_ids, meta = self._metadata(chunks, order)
        logits = self.model.forward(input_ids, meta, self.kv_cache)
        self._dense_done(meta)
        self.tokens_computed += input_ids.shape[0]
        return logits

    def _check_chunk(self, c: ScheduledChunk) -> None:
        n = len(c.token_ids)
        end = c.start_pos + n
        if n == 0 or c.start_pos < 0:
            raise ValueError(f"seq {c.seq_id}: empty chunk or negative start_pos")
        if end > self.context_length:
            raise ValueError(
                f"seq {c.seq_id}: position {end - 1} beyond context length {self.context_length}"
            )
        need = math.ceil(end / self.block_size)
        if len(c.block_table) < need:
            raise ValueError(
                f"seq {c.seq_id}: block table has {len(c.block_table)} blocks, "
                f"positions up to {end - 1} need {need}"
            )
        for b in c.block_table[:need]:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"seq {c.seq_id}: block id {b} outside [0, {self.num_blocks})")
        bad = [t for t in c.token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"seq {c.seq_id}: token id {bad[0]} outside vocab {self.vocab_size}")

    def _metadata(
        self, chunks: list[ScheduledChunk], order: list[int]
    ) -> tuple[torch.Tensor, StepMetadata]:
        """Packed inputs and attention layout for `chunks` (single-token chunks first;
        chunks[k] is the plan's chunk order[k]). The sampled rows are listed in plan order,
        so the logits come out in plan order with no reordering afterwards.

        Decodes, the common case, are laid out with plain Python integers and a handful of
        tensor ops for the whole group: per-chunk tensor ops cost more than the decode's
        share of the forward pass on a small model.
        """
        bs = self.block_size
        window = self.config.sliding_window
        ids: list[int] = []
        pos_parts: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        prefills: list[PrefillSpan] = []
        sample_rows: list[int] = []

        # -- decodes (single-token chunks, at the front, by increasing context length) -------
        nd = 0
        while nd < len(chunks) and len(chunks[nd].token_ids) == 1:
            nd += 1
        decodes: list[DecodeGroup] = []
        if nd:
            dec = chunks[:nd]
            pos_list = [c.start_pos for c in dec]
            ids.extend(c.token_ids[0] for c in dec)
            pos_parts.append(torch.tensor(pos_list, dtype=torch.long))
            slot_parts.append(
                torch.tensor(
                    [
                        c.block_table[p // bs] * bs + p % bs
                        for c, p in zip(dec, pos_list, strict=True)
                    ],
                    dtype=torch.long,
                )
            )
            for a, b in _decode_groups([p + 1 for p in pos_list]):
                decodes.append(self._decode_group(dec[a:b], a, window))
            sample_rows.extend(i for i, c in enumerate(dec) if c.sample)

        # -- prefill chunks --------------------------------------------------------------------
        row = nd
        for c in chunks[nd:]:
            n = len(c.token_ids)
            end = c.start_pos + n
            table = torch.tensor(c.block_table[: math.ceil(end / bs)], dtype=torch.long)
            pos = torch.arange(c.start_pos, end, dtype=torch.long)
            ids.extend(c.token_ids)
            pos_parts.append(pos)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            ctx_slots = mask = None
            if c.start_pos > 0:
                kpos = torch.arange(end, dtype=torch.long)
                ctx_slots = table[kpos // bs] * bs + kpos % bs
                mask = kpos[None, :] <= pos[:, None]
                if window is not None:
                    mask &= kpos[None, :] > pos[:, None] - window
            elif window is not None and n > window:
                mask = torch.ones(n, n, dtype=torch.bool).tril()
                mask &= ~torch.ones(n, n, dtype=torch.bool).tril(-window)
            prefills.append(
                PrefillSpan(row, row + n, _to(ctx_slots, self.device), _to(mask, self.device))
            )
            row += n
            if c.sample:
                sample_rows.append(row - 1)

        # sample_rows follows packed order; sort it by plan position (the hidden states are
        # gathered before the LM head, [rows, hidden] rather than [rows, vocab]).
        packed_of = [order[k] for k, c in enumerate(chunks) if c.sample]
        sample_rows = [r for _, r in sorted(zip(packed_of, sample_rows, strict=True))]
        meta = StepMetadata(
            positions=torch.cat(pos_parts).to(self.device),
            slots=torch.cat(slot_parts).to(self.device),
            decodes=decodes,
            prefills=prefills,
            # None: every row, in order, so no gather is needed.
            sample_rows=None
            if sample_rows == list(range(row))
            else torch.tensor(sample_rows, dtype=torch.long, device=self.device),
        )
        return torch.tensor(ids, dtype=torch.long, device=self.device), meta

    def _decode_group(self, dec: list[ScheduledChunk], start: int, window: int | None):
        bs = self.block_size
        lens = [c.start_pos + 1 for c in dec]
        longest = max(lens)
        kpos = torch.arange(longest, dtype=torch.long)
        lens_t = torch.tensor(lens, dtype=torch.long)[:, None]
        mask = kpos[None, :] < lens_t
        if window is not None:
            mask &= kpos[None, :] > lens_t - 1 - window
        valid = mask
        # Additive float mask (0 / -inf), made once per step for all layers: SDPA turns a bool
        # mask into this form on every call (~25% of a batch-8 decode attention call);
        # results are bit-identical.
        mask = (
            torch.zeros(mask.shape, dtype=self.dtype)
            .masked_fill_(~mask, float("-inf"))[:, None, None, :]
            .to(self.device)
        )
        key = tuple(c.seq_id for c in dec)
        self._step_groups.add(key)
        dense = self._dense.get(key)
        if (
            dense is not None
            and dense.last_step == self._step_no - 1
            and longest <= dense.cap
            and all(c.start_pos == p for c, p in zip(dec, dense.next_pos, strict=True))
        ):
            # Same sequences as last step, each one position further: append only.
            nkv, cap = self.config.num_kv_heads, dense.cap
            rows = [
                (j * nkv + h) * cap + c.start_pos for j, c in enumerate(dec) for h in range(nkv)
            ]
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
            dense.pending = lens
            self.decode_groups_appended += 1
            return DecodeGroup(start, start + len(dec), None, mask, dense, idx)
        width = math.ceil(longest / bs)
        pad = self.num_blocks  # the zero block (module docstring)
        tables = [c.block_table[:width] + [pad] * (width - len(c.block_table)) for c in dec]
        slots = torch.tensor(tables, dtype=torch.long)[:, kpos // bs] * bs + kpos % bs
        # Every masked column (a shorter row's padding, past its length in its own last block,
        # outside its window) reads the zero block, not whatever another request left there:
        # a masked column still enters attention as score + (-inf) and 0 * value, which is
        # NaN when the score or the value is infinite, so one request's blown-up or
        # huge-but-finite K/V (a block freed since, or block 0 that padding read before)
        # turned its neighbours' outputs into NaN too. One `where` on [D, L] ints per group
        # and step, next to a gather of D * L * kv_heads * head_dim values per layer.
        slots = torch.where(valid, slots, pad * bs)
        self.decode_groups_gathered += 1
        # Filling a dense copy costs a second copy of the context on top of the gather, which
        # only pays off if the group then stays the same for a few steps. Under continuous
        # batching a group often changes every step or two (a request finishes or joins), so
        # the copy is made only for a group that has already lasted one step.
        dense = self._new_dense(key, longest) if key in self._prev_groups else None
        if dense is not None:
            dense.pending = lens
        return DecodeGroup(start, start + len(dec), slots.to(self.device), mask, dense)

    def _new_dense(self, key: tuple[str, ...], longest: int) -> DecodeKV | None:
        """A DecodeKV for a group whose longest context is `longest`, with room to grow, or
        None when it would not fit the memory set aside for them."""
        cfg = self.config
        cap = min(self.context_length, -(-(longest + _DENSE_HEADROOM) // 64) * 64)
        shape = (cfg.num_layers, 2, len(key), cfg.num_kv_heads, cap, cfg.head_dim)
        numel = math.prod(shape)
        held = sum(d.kv.numel() for k, d in self._dense.items() if k != key)
        if (held + numel) * self.kv_cache.element_size() > _DENSE_KV_BYTES:
            return None
        old = self._dense.pop(key, None)
        if old is not None:
            self._dense_spare.append(old.kv.view(-1))
        # Reuse a dropped entry's storage when one is large enough: a fresh multi-MB buffer
        # costs page faults on first touch, every time a group changes.
        fits = [i for i, t in enumerate(self._dense_spare) if t.numel() >= numel]
        if fits:
            kv = self._dense_spare.pop(fits[0])[:numel].view(shape)
        else:
            kv = torch.empty(shape, dtype=self.dtype, device=self.device)
        dense = DecodeKV(kv, [], -1)
        self._dense[key] = dense
        return dense

    def _dense_done(self, meta: StepMetadata) -> None:
        """After a successful forward: the step's groups now hold one more position each;
        entries of groups absent from this step are dropped (their storage kept for reuse)."""
        keep: dict[tuple[str, ...], DecodeKV] = {}
        used = {id(g.dense) for g in meta.decodes if g.dense is not None}
        for key, dense in self._dense.items():
            if id(dense) in used:
                keep[key] = dense
            else:
                self._dense_spare.append(dense.kv.view(-1))
        for g in meta.decodes:
            if g.dense is not None:
                g.dense.last_step = self._step_no
                g.dense.next_pos = g.dense.pending
        self._dense = keep
        self._prev_groups, self._step_groups = self._step_groups, set()
        # Bound the spare list to what the budget could hold anyway.
        elem = self.kv_cache.element_size()
        while sum(t.numel() for t in self._dense_spare) * elem > _DENSE_KV_BYTES:
            self._dense_spare.pop(0)

    # -- KV export / import -------------------------------------------------------------------

    def read_blocks_tensor(self, block_ids: list[int]) -> torch.Tensor:
        """[n, layers, 2, block_size, kv_heads, head_dim] copy of the given blocks (CPU)."""
        idx = torch.tensor(self._check_ids(block_ids), dtype=torch.long, device=self.device)
        return self.kv_cache[:, :, idx].permute(2, 0, 1, 3, 4, 5).contiguous().cpu()

    def write_blocks_tensor(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        want = (len(block_ids), *self.block_shape)
        if tuple(blocks.shape) != want:
            raise ValueError(f"KV import: got blocks of shape {tuple(blocks.shape)}, want {want}")
        idx = torch.tensor(self._check_ids(block_ids), dtype=torch.long, device=self.device)
        data = blocks.to(device=self.device, dtype=self.dtype).permute(1, 2, 0, 3, 4, 5)
        self.kv_cache[:, :, idx] = data
        self._dense.clear()  # imported blocks: never trust a dense copy made before

    def read_blocks(self, block_ids: list[int]) -> bytes:
        """The blocks' K/V for all layers as a self-describing payload (see kvformat)."""
        return kvformat.encode(self.read_blocks_tensor(block_ids))

    def write_blocks(self, block_ids: list[int], data: bytes | torch.Tensor) -> None:
        """Import blocks exported by `read_blocks` (or a tensor in the same layout) into
        `block_ids` of this cache. Layout must match; dtype is converted if it differs."""
        blocks = data if isinstance(data, torch.Tensor) else kvformat.decode(data)
        self.write_blocks_tensor(block_ids, blocks)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one exported block: (layers, 2, block_size, kv_heads, head_dim)."""
        c = self.config
        return (c.num_layers, 2, self.block_size, c.num_kv_heads, c.head_dim)

    def _check_ids(self, block_ids: list[int]) -> list[int]:
        ids = list(block_ids)
        for b in ids:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b} outside [0, {self.num_blocks})")
        return ids


# `kv_value_bound`'s margin over the exact bound: rounding in a low-precision forward pass
# (bfloat16 keeps 8 bits) moves a value by well under 1 %
_KV_BOUND_SLACK = 2.0


def kv_value_bound(model: LlamaModel, dtype: torch.dtype) -> float:
    """An upper bound on |x| for every K and V value `model` can compute, whatever its
    input: what imported KV is checked against (a peer's KV beyond it was not computed by
    this model, and huge values overflow attention into NaN, or into garbage tokens without
    any NaN: a V of 1e30 on the tiny model gives token 0 over and over).

    Each layer's K/V is a projection of the RMS-normalised hidden state: x / rms(x) has no
    element above sqrt(hidden) in magnitude (x_i^2 <= sum x^2), so projection row j gives at
    most sqrt(hidden) * sum_i |W[j, i] * norm_weight[i]| + |bias[j]|. RoPE mixes pairs of
    K elements with cos and sin (scaled by YaRN's attention factor): at most
    max(|cos| + |sin|) times the larger of the two. The largest over layers and rows, times
    `_KV_BOUND_SLACK`, capped at the cache dtype's largest finite value (a larger one would
    turn into inf when written). Loose (the tiny model: ~650, against K/V of at most ~5 in
    practice), but it never refuses what this model computed, and it needs no calibration."""
    cfg = model.cfg
    q, kv = cfg.q_size, cfg.kv_size
    root = math.sqrt(cfg.hidden_size)
    rope = model.rope
    turn = (rope.cos.float().abs() + rope.sin.float().abs()).max().item()
    bound = 0.0
    for layer in model.layers:
        rows = (layer.qkv[q:].float().abs() @ layer.in_norm.float().abs()) * root
        if layer.qkv_b is not None:
            rows += layer.qkv_b[q:].float().abs()
        bound = max(bound, rows[:kv].max().item() * turn, rows[kv:].max().item())
    return min(bound * _KV_BOUND_SLACK, torch.finfo(dtype).max)


# Decode grouping: a batched attention call costs about as much as this many context
# positions of padding (call, mask and append overhead, per layer); groups are chosen to
# minimise calls * _GROUP_CALL_COST + sum(group size * longest context in the group).
_GROUP_CALL_COST = 1024
_GROUP_MAX_CANDIDATES = 48  # split points considered (keeps the search O(48^2) per step)

# Dense decode K/V (model.DecodeKV): at most this many bytes in all, and this many positions
# of headroom per group so that it is rebuilt only when the group changes.
_DENSE_KV_BYTES = 128 << 20
_DENSE_HEADROOM = 256


def _decode_groups(lens: list[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of `lens` (ascending) attended together.

    Padding a short context to its group's longest costs memory traffic and arithmetic;
    another group costs a call. The cheapest partition into runs of the sorted lengths is
    found exactly (over every split point, or every k-th for large batches). Since all
    contexts grow by one per decode step, the cost of every partition grows by the same
    amount, so the groups stay the same from step to step (their dense K/V stays valid)
    until a sequence joins or leaves.
    """
    n = len(lens)
    if n <= 1:
        return [(0, n)] if n else []
    stride = -(-n // _GROUP_MAX_CANDIDATES)
    ends = [*range(stride, n, stride), n]
    best: dict[int, tuple[int, int]] = {0: (0, 0)}  # end -> (cost, start of its last group)
    starts = [0]
    for j in ends:
        width = lens[j - 1]
        best[j] = min((best[i][0] + _GROUP_CALL_COST + (j - i) * width, i) for i in starts)
        starts.append(j)
    groups = []
    j = n
    while j:
        i = best[j][1]
        groups.append((i, j))
        j = i
    return groups[::-1]


def _no_token_reason(c: ScheduledChunk) -> str:
    """Why chunk `c`'s request got no next token (`sampling.sample` gave None)."""
    t = c.sampling.temperature
    why = (f"NaN or infinite logits for output token {c.output_index}: a numerical overflow "
           "in the model (e.g. corrupt or out-of-range KV)")
    if t > 0 and c.sampling.top_k != 1:
        why += f", or temperature {t:g} too small to divide them by"
    return f"no next token: {why}; only this request was ended"


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _generation_eos(model_dir: Path) -> tuple[int, ...]:
    """eos ids from generation_config.json, which often lists more than config.json."""
    p = model_dir / "generation_config.json"
    try:
        eos = json.loads(p.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    vals = eos if isinstance(eos, list) else [eos]
    return tuple(t for t in vals if isinstance(t, int) and not isinstance(t, bool) and t >= 0)
