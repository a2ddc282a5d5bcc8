"""transformers as the dense reference for the torch engine's tests: greedy decoding of the
same weights, token for token. Import only after `pytest.importorskip("transformers")`."""

from __future__ import annotations

import json

import torch
import transformers


def tiny_reference_model(runner) -> transformers.LlamaForCausalLM:
    """transformers' Llama holding the very weights `runner` (a ModelRunner of the built-in
    tiny model) computes with."""
    raw = json.loads((runner.model_dir / "config.json").read_text())
    raw.pop("genset_dummy_weights_seed")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**raw)).eval()
    model.load_state_dict(runner.weights)
    return model


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation of exactly `max_tokens` tokens, one prompt at a time
    (no padding, so nothing but the prompt reaches the model)."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outs.append(g[0, len(p) :].tolist())
    return outs
