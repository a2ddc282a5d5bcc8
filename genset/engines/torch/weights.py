"""Weights in Hugging Face naming: from local safetensors files, or seeded random.

Checkpoint loading is strict about names and shapes (a missing or mis-shaped tensor is an
error naming it) because a silently half-loaded model produces fluent garbage. Nothing here
executes code from the checkpoint directory: safetensors holds tensors only, and there is no
`trust_remote_code` path.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

from genset.engines.torch.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters save that are recomputed here from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """A checkpoint that does not fit its config; the message names the tensor."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder needs, by Hugging Face parameter name."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}"
        shapes |= {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (cfg.q_size, d),
            f"{p}.self_attn.k_proj.weight": (cfg.kv_size, d),
            f"{p}.self_attn.v_proj.weight": (cfg.kv_size, d),
            f"{p}.self_attn.o_proj.weight": (d, cfg.q_size),
            f"{p}.mlp.gate_proj.weight": (i, d),
            f"{p}.mlp.up_proj.weight": (i, d),
            f"{p}.mlp.down_proj.weight": (d, i),
        }
        if cfg.qkv_bias:
            shapes |= {
                f"{p}.self_attn.q_proj.bias": (cfg.q_size,),
                f"{p}.self_attn.k_proj.bias": (cfg.kv_size,),
                f"{p}.self_attn.v_proj.bias": (cfg.kv_size,),
            }
        if cfg.o_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (d,)
    return shapes


def has_checkpoint(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return (d / INDEX_FILE).is_file() or any(d.glob("*.safetensors"))


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: unreadable 'weight_map': {e}") from e
        names = sorted(set(weight_map.values()))
        for n in names:
            # Shard names come from the index file; refuse anything that escapes the directory.
            if Path(n).name != n:
                raise WeightsError(f"{index}: shard name {n!r} is not a plain file name")
        files = [model_dir / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index}: shard files missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_dir}: no *.safetensors weights (and no {INDEX_FILE})")
    return files


def load_checkpoint(
    model_dir: str | Path, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Load and check every tensor `cfg` needs from a local safetensors checkpoint."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    want = expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for f in _checkpoint_files(model_dir):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    if name not in want:
                        if name.endswith(_IGNORED_SUFFIXES) or (
                            name == "lm_head.weight" and cfg.tie_word_embeddings
                        ):
                            continue
                        raise WeightsError(f"{f.name}: unexpected tensor {name!r}")
                    t = st.get_tensor(name)
                    if tuple(t.shape) != want[name]:
                        raise WeightsError(
                            f"{f.name}: tensor {name!r} has shape {tuple(t.shape)}, "
                            f"config implies {want[name]}"
                        )
                    out[name] = t.to(device=device, dtype=dtype)
        except WeightsError:
            raise
        except Exception as e:  # corrupt header, truncated file, ...
            raise WeightsError(f"{f}: cannot read safetensors: {e}") from e
    missing = [n for n in want if n not in out]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"{model_dir}: missing tensors {missing[:5]}{more}")
    return out


def dummy_weights(
    cfg: ModelConfig, seed: int, *, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Seeded random weights: the same (config, seed) gives the same tensors on any machine
    with this torch version, whatever the device.

    Scales keep activations O(1) through the stack (matrices ~ N(0, 1/fan_in)) and give
    logits with unit spread, so greedy decoding depends on context instead of collapsing to
    one token as a small-init model does.
    """
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        # One generator per tensor, keyed by its name, so adding a tensor kind (or a layer)
        # never changes the others.
        g = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        out[name] = t.to(device=device, dtype=dtype)
    return out
