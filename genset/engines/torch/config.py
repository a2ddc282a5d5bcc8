"""Reading a Hugging Face `config.json` for the Llama family (Llama, Qwen2, Mistral).

Only what the decoder needs is kept, validated up front, so a bad checkpoint fails at load
time with the offending field named instead of deep inside a matmul.

Both config generations are accepted: transformers 4.x writes `rope_theta` + `rope_scaling`,
transformers 5.x writes one `rope_parameters` dict holding both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# "default" means no scaling; "dynamic" is refused on purpose: transformers recomputes its
# frequencies from the longest sequence in the current batch, so a serving engine that packs
# unrelated requests could not reproduce it.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ModelConfigError(ValueError):
    """A config.json that this engine cannot run; the message names the field."""


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    # Set only by the built-in tiny model: no checkpoint, weights are drawn from this seed.
    dummy_weights_seed: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def load_config(path: str | Path) -> ModelConfig:
    """Read `path` (a model directory or a config.json file)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ModelConfigError(f"{p}: config.json not found")
    try:
        raw = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{p}: not valid JSON: {e}") from e
    try:
        return parse_config(raw)
    except ModelConfigError as e:
        raise ModelConfigError(f"{p}: {e}") from None


def _int(raw: dict, key: str, default: Any = ..., minimum: int = 1) -> int:
    v = raw.get(key, default)
    if v is ...:
        raise ModelConfigError(f"missing required field {key!r}")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ModelConfigError(f"field {key!r} must be an integer, got {v!r}")
    if v < minimum:
        raise ModelConfigError(f"field {key!r} must be >= {minimum}, got {v}")
    return v


def _float(raw: dict, key: str, default: Any = ..., positive: bool = True) -> float:
    v = raw.get(key, default)
    if v is ...:
        raise ModelConfigError(f"missing required field {key!r}")
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ModelConfigError(f"field {key!r} must be a number, got {v!r}")
    if positive and v <= 0:
        raise ModelConfigError(f"field {key!r} must be > 0, got {v}")
    return float(v)


def _bool(raw: dict, key: str, default: bool) -> bool:
    v = raw.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ModelConfigError(f"field {key!r} must be true or false, got {v!r}")
    return v


def _token_ids(raw: dict, key: str) -> tuple[int, ...]:
    v = raw.get(key)
    if v is None:
        return ()
    vals = v if isinstance(v, list) else [v]
    for t in vals:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ModelConfigError(f"field {key!r} must be a token id or list of ids, got {v!r}")
    return tuple(vals)


def _parse_rope(raw: dict, max_pos: int) -> RopeConfig:
    params = raw.get("rope_parameters")
    field = "rope_parameters"
    if params is None:
        params = raw.get("rope_scaling")
        field = "rope_scaling"
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ModelConfigError(f"field {field!r} must be an object, got {params!r}")
    theta_src = params if "rope_theta" in params else raw
    theta = _float(theta_src, "rope_theta", 10000.0)
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"field {field}.rope_type: unsupported RoPE scaling {rtype!r} "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )

    def num(key: str, default: Any = ...) -> float:
        try:
            return _float(params, key, default)
        except ModelConfigError as e:
            raise ModelConfigError(str(e).replace(f"{key!r}", f"'{field}.{key}'")) from None

    if rtype == "default":
        return RopeConfig(theta=theta)
    factor = num("factor")
    orig = params.get("original_max_position_embeddings")
    if orig is not None and (isinstance(orig, bool) or not isinstance(orig, int) or orig < 1):
        raise ModelConfigError(
            f"field '{field}.original_max_position_embeddings' must be a positive integer"
        )
    if rtype == "linear":
        return RopeConfig(theta=theta, type=rtype, factor=factor)
    if rtype == "llama3":
        if orig is None:
            raise ModelConfigError(
                f"missing required field '{field}.original_max_position_embeddings'"
            )
        low, high = num("low_freq_factor"), num("high_freq_factor")
        if high <= low:
            raise ModelConfigError(f"field '{field}.high_freq_factor' must exceed low_freq_factor")
        return RopeConfig(
            theta=theta,
            type=rtype,
            factor=factor,
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=orig,
        )
    # yarn
    attn = params.get("attention_factor")
    return RopeConfig(
        theta=theta,
        type=rtype,
        factor=factor,
        original_max_position_embeddings=orig if orig is not None else max_pos,
        beta_fast=num("beta_fast", 32.0),
        beta_slow=num("beta_slow", 1.0),
        attention_factor=None if attn is None else num("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def parse_config(raw: Any) -> ModelConfig:
    """Validate a parsed config.json dict; raises ModelConfigError naming the bad field."""
    if not isinstance(raw, dict):
        raise ModelConfigError("config.json must hold a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"field 'model_type': unsupported {model_type!r} "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelConfigError(f"field 'hidden_act': only 'silu' is supported, got {act!r}")

    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    kv_heads = _int(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ModelConfigError(
            f"field 'num_key_value_heads' ({kv_heads}) must divide num_attention_heads ({heads})"
        )
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ModelConfigError(
                f"field 'hidden_size' ({hidden}) is not divisible by num_attention_heads "
                f"({heads}) and no 'head_dim' is given"
            )
        head_dim = hidden // heads
    else:
        head_dim = _int(raw, "head_dim")
    if head_dim % 2:
        raise ModelConfigError(f"field 'head_dim' must be even for RoPE, got {head_dim}")
    max_pos = _int(raw, "max_position_embeddings", 2048)

    sliding = None
    if model_type == "mistral" or (model_type == "qwen2" and raw.get("use_sliding_window")):
        if raw.get("sliding_window") is not None:
            sliding = _int(raw, "sliding_window")
        if model_type == "qwen2" and sliding is not None:
            # Qwen2 only windows layers past max_window_layers; not worth supporting until a
            # real checkpoint needs it.
            raise ModelConfigError("field 'use_sliding_window': Qwen2 sliding window unsupported")

    if model_type == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v bias and no o_proj bias
        o_bias = False
    else:
        qkv_bias = o_bias = _bool(raw, "attention_bias", False)

    eos = _token_ids(raw, "eos_token_id")
    bos = _token_ids(raw, "bos_token_id")
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    if dtype is not None and not isinstance(dtype, str):
        raise ModelConfigError(f"field 'torch_dtype' must be a string, got {dtype!r}")
    seed = raw.get("genset_dummy_weights_seed")
    if seed is not None:
        seed = _int(raw, "genset_dummy_weights_seed", minimum=0)

    return ModelConfig(
        model_type=model_type,
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_layers=_int(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
        max_position_embeddings=max_pos,
        rope=_parse_rope(raw, max_pos),
        tie_word_embeddings=_bool(raw, "tie_word_embeddings", False),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=_bool(raw, "mlp_bias", False),
        sliding_window=sliding,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        torch_dtype=dtype,
        dummy_weights_seed=seed,
    )
