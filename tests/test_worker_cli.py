"""`genset worker` flags: bad values and missing engines are refused before connecting."""

from __future__ import annotations

import json

import pytest

from genset.engines.factory import EngineConfigError, build_engine, model_facts, served_model_name
from genset.runtime.config import ConfigError, dataclass_from_args
from genset.worker import registered_role
from services.decode.__main__ import build_parser, main
from services.decode.service import WorkerOptions, WorkerService


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--engine", "mocker", "--kv-blocks", "-1"], "--kv-blocks=-1 must be >= 0"),
    (["--engine", "mocker", "--block-size", "0"], "--block-size=0 must be >= 1"),
    (["--engine", "mocker", "--max-streams", "0"], "--max-streams=0 must be >= 1"),
    (["--engine", "mocker", "--coalesce-ms", "-1"], "--coalesce-ms=-1.0 must be >= 0"),
    (["--engine", "mocker", "--speedup", "0"], "--speedup: must be > 0"),
    (["--engine", "mocker", "--mocker-load-s", "-1"], "--mocker-load-s=-1.0 must be >= 0"),
    (["--engine", "torch", "--mocker-load-s", "5"], "only --engine mocker models a load time"),
    (["--engine", "mocker", "--role", "agg"], "--role='agg' is not one of: decode, prefill, both"),
    (["--engine", "mocker", "--seed", "x"], "argument --seed: 'x' is not an integer"),
    (["--engine", "trtllm"], "TensorRT-LLM"),
    (["--engine", "vllm"], "--engine='vllm' is not one of: torch, mocker, trtllm"),
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


def options(argv: list[str], env: dict[str, str] | None = None) -> WorkerOptions:
    return dataclass_from_args(WorkerOptions, build_parser().parse_args(argv), env or {})


def test_options_defaults_roles_and_env():
    opts = options(["--engine", "mocker", "--role", "prefill"])
    assert opts.role == "prefill" and opts.model == "tiny" and opts.block_size == 16
    assert options(["--engine", "mocker"]) == WorkerOptions(engine="mocker")
    assert (WorkerOptions().role, WorkerOptions().max_streams, WorkerOptions().coalesce_ms) == (
        "decode", 1024, 0.5)
    # "both" is today's aggregated worker: it registers (and is routed to) as decode
    both = options(["--engine", "mocker", "--role", "both"])
    assert both.role == "both" and registered_role(both.role) == "decode"
    assert registered_role("prefill") == "prefill"
    assert options([], {"GENSET_ENGINE": "mocker", "GENSET_KV_BLOCKS": "64"}).kv_blocks == 64
    with pytest.raises(ConfigError, match=r"GENSET_SPEEDUP: must be > 0"):
        options(["--engine", "mocker"], {"GENSET_SPEEDUP": "-2"})
    with pytest.raises(ConfigError, match=r"GENSET_MODEL: model '/nope'"):
        options(["--engine", "mocker"], {"GENSET_MODEL": "/nope"})


def test_service_component_follows_the_role():
    from genset.runtime.config import CommonConfig

    for role, component in (("decode", "decode"), ("both", "decode"), ("prefill", "prefill")):
        service = WorkerService(CommonConfig(), WorkerOptions(engine="mocker", role=role))
        assert service.component == component
        assert service.instance_key.split("/")[-2] == component
