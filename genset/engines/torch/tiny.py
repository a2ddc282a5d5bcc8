"""The built-in `tiny` model: what `genset up` and the tests serve when no checkpoint is named.

It is a small Llama (4 layers, GQA) whose weights are drawn from a fixed seed when loaded,
so nothing large is committed, plus a real byte-level BPE tokenizer with a ChatML chat
template. The assets in `genset/assets/tiny/` (config.json, tokenizer.json,
tokenizer_config.json, generation_config.json) make it look exactly like a Hugging Face
model directory without weights; config.json carries `genset_dummy_weights_seed`, which is
how the runner knows to generate weights rather than look for safetensors.

The tokenizer was trained offline, once, by `python -m genset.engines.torch.tiny` on the
docstrings of the Python standard library found on this machine (no network); the output is
committed so every machine gets byte-identical token ids.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from pathlib import Path

TINY_NAME = "tiny"
ASSETS = Path(__file__).resolve().parents[2] / "assets" / TINY_NAME
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": None,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
    "genset_dummy_weights_seed": 0,
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def resolve_model(model: str | Path) -> Path:
    """A model directory for `model`: "tiny" (the built-in) or a local Hugging Face directory.

    Raises FileNotFoundError with the name when it is neither: genset never downloads.
    """
    if str(model) == TINY_NAME:
        if not (ASSETS / "config.json").is_file():
            raise FileNotFoundError(f"built-in tiny model assets missing from {ASSETS}")
        return ASSETS
    p = Path(model).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"model {str(model)!r}: not 'tiny' and not a local directory with config.json "
            "(genset loads local Hugging Face directories only; it never downloads)"
        )
    return p


def _stdlib_corpus(limit_chars: int = 6_000_000) -> list[str]:
    """Docstrings of the running interpreter's standard library, in a fixed file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for f in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if f.parent.name.startswith(("test", "idlelib")) or f.name.startswith("test"):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
                    total += len(doc)
        if total >= limit_chars:
            break
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation) on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_assets(out: Path = ASSETS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(_stdlib_corpus())
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    config = dict(TINY_CONFIG, vocab_size=vocab)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": TINY_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen = {"eos_token_id": [2, 0], "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate the tiny model's committed assets.")
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args(argv)
    write_assets(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
