"""Helpers for the frontend/client/detokenizer tests (this module holds no tests itself).

`make_tokenizer_dir` builds a small byte-level BPE tokenizer in Hugging Face layout (trained in
milliseconds on multilingual text, ChatML template, `<|im_end|>` as eos), so the tests need
neither a model download nor transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, how are you today?",
    "Grüße aus München! Ça va très bien, merci. Señor, ¿dónde está la estación?",
    "你好\uff0c世界。今天天气很好。我们去公园散步吧。",
    "こんにちは世界。東京はとても大きい都市です。",
    "Emoji: 🙂 🚀 🎉 👍🏽 — and math: ∑ ∫ √ ≈ ≠ ∞.",
    "def main():\n    print('hello world')\n    return 0\n",
] * 20


def make_tokenizer_dir(path: Path, vocab_size: int = 400) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
    }))
    return path
