"""`genset worker` flags: bad values and missing engines are refused before connecting."""

from __future__ import annotations

import json

import pytest

from genset.engines.factory import EngineConfigError, build_engine, model_facts, served_model_name
from services.decode.__main__ import build_parser, main


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--engine", "mocker", "--kv-blocks", "-1"], "--kv-blocks must be >= 0"),
    (["--engine", "mocker", "--block-size", "0"], "--block-size must be >= 1"),
    (["--engine", "trtllm"], "TensorRT-LLM"),
    (["--engine", "vllm"], "invalid choice"),
    (["--engine", "mocker", "--namespace", "bad.ns"], "namespace"),
])
def test_bad_flags_exit_2_naming_the_problem(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_model_facts_and_names(tmp_path):
    tiny = model_facts("tiny")
    assert tiny.tokenizer == "tiny" and tiny.vocab_size > 0 and tiny.eos_token_ids
    assert served_model_name("tiny") == "tiny"
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"vocab_size": 100, "eos_token_id": [5, 6], "max_position_embeddings": 256}))
    facts = model_facts(str(model))
    assert (facts.vocab_size, facts.eos_token_ids, facts.context_length) == (100, [5, 6], 256)
    assert facts.tokenizer == str(model.resolve()) and served_model_name(str(model)) == "my-model"
    (model / "config.json").write_text("{not json")
    with pytest.raises(EngineConfigError, match=r"config\.json"):
        model_facts(str(model))


def test_mocker_engine_from_flags():
    engine = build_engine("mocker", "tiny", worker_id=3, kv_blocks=128, block_size=8,
                          speedup=5.0)
    card = engine.card
    assert (card.engine, card.kv_blocks, card.block_size) == ("mocker", 128, 8)
    assert card.vocab_size == model_facts("tiny").vocab_size
    with pytest.raises(EngineConfigError, match="speedup"):
        build_engine("mocker", "tiny", worker_id=3, speedup=0)
    args = build_parser().parse_args(["--engine", "mocker", "--role", "prefill"])
    assert args.role == "prefill" and args.model == "tiny"
