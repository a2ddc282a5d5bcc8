"""Torch model runner against Hugging Face transformers as the dense reference.

Every comparison runs in float32 so greedy argmax must agree exactly, token for token.
"""

from __future__ import annotations

import json
import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from genset.engines.batch import SamplingSpec, ScheduledChunk, StepPlan  # noqa: E402
from genset.engines.torch.config import ModelConfigError, load_config  # noqa: E402
from genset.engines.torch.driver import generate  # noqa: E402
from genset.engines.torch.runner import ModelRunner  # noqa: E402
from genset.engines.torch.tiny import resolve_model  # noqa: E402
from genset.engines.torch.weights import WeightsError  # noqa: E402
from tests.helpers.torch_reference import hf_greedy, tiny_reference_model  # noqa: E402

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.3,  # larger than default so greedy output varies with context
    eos_token_id=None,
    bos_token_id=None,
)


def _save(path, cls, cfg_cls, shard=None, **overrides):
    torch.manual_seed(0)
    model = cls(cfg_cls(**(SMALL | overrides))).eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return model


def _checkpoint(tmp_path_factory, name, cls, cfg_cls, **kw):
    """A fresh directory `name` holding a saved checkpoint: (directory, the model saved)."""
    d = tmp_path_factory.mktemp(name)
    return d, _save(d, cls, cfg_cls, **kw)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return _checkpoint(tmp_path_factory, "llama", transformers.LlamaForCausalLM,
                       transformers.LlamaConfig, rope_scaling=rope)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    # Sharded on purpose: exercises model.safetensors.index.json. Tied embeddings: no lm_head.
    d, model = _checkpoint(tmp_path_factory, "qwen2", transformers.Qwen2ForCausalLM,
                           transformers.Qwen2Config, shard="100KB", tie_word_embeddings=True)
    assert (d / "model.safetensors.index.json").is_file()
    return d, model


@pytest.fixture(scope="module")
def llama_bias_dir(tmp_path_factory):
    # attention_bias (q/k/v and o biases) and an explicit head_dim with
    # heads * head_dim != hidden_size, as in some Mistral-family checkpoints.
    return _checkpoint(tmp_path_factory, "llama_bias", transformers.LlamaForCausalLM,
                       transformers.LlamaConfig, attention_bias=True, head_dim=32,
                       rope_scaling={"rope_type": "linear", "factor": 2.0})


def _prompts(seed=1, n=5, vocab=512):
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(21)]
    out = []
    for i in range(n):
        tail = [rng.randrange(vocab) for _ in range(rng.choice([1, 4, 9, 30, 57]))]
        out.append((shared[: 7 + 3 * i] if i % 2 else shared) + tail)
    return out


@pytest.mark.parametrize("which", ["llama_dir", "qwen2_dir", "llama_bias_dir"])
def test_checkpoint_logits_match_reference(which, request):
    d, model = request.getfixturevalue(which)
    runner = ModelRunner(d, num_blocks=32, block_size=8, dtype="float32")
    prompt = _prompts()[3]
    plan = StepPlan([ScheduledChunk("a", prompt, 0, list(range(32)), True, GREEDY)])
    ours = runner.forward_logits(plan)[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["llama_dir", "qwen2_dir", "llama_bias_dir"])
def test_batched_chunked_greedy_equals_reference(which, request):
    d, model = request.getfixturevalue(which)
    prompts = _prompts(seed=sum(map(ord, which)))  # fixed per model, not hash()
    max_tokens = 12
    runner = ModelRunner(d, num_blocks=128, block_size=4, dtype="float32")
    steps = []
    ours = generate(
        runner,
        prompts,
        max_tokens=max_tokens,
        token_budget=16,
        on_step=lambda plan, _: steps.append(plan),
    )
    # The budget really forced chunked prefill mixed with decodes in one step.
    assert any(c.start_pos > 0 and len(c.token_ids) > 1 for p in steps for c in p.chunks)
    assert any(
        any(len(c.token_ids) == 1 for c in p.chunks) and any(len(c.token_ids) > 1 for c in p.chunks)
        for p in steps
    )
    ref = hf_greedy(model, prompts, max_tokens)
    assert ours == ref
    assert len({t for o in ours for t in o}) > 5  # not a constant stream


def test_mistral_sliding_window_matches_reference(tmp_path):
    model = _save(
        tmp_path,
        transformers.MistralForCausalLM,
        transformers.MistralConfig,
        sliding_window=16,
    )
    prompts = [p + p for p in _prompts(seed=7, n=3)]  # long enough to slide
    runner = ModelRunner(tmp_path, num_blocks=128, block_size=4, dtype="float32")
    assert runner.config.sliding_window == 16
    ours = generate(runner, prompts, max_tokens=8, token_budget=24)
    assert ours == hf_greedy(model, prompts, 8)
    # The window is really in effect: without it the continuation differs.
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["sliding_window"] = None
    (tmp_path / "config.json").write_text(json.dumps(raw))
    unwindowed = ModelRunner(tmp_path, num_blocks=128, block_size=4, dtype="float32")
    assert generate(unwindowed, prompts, max_tokens=8, token_budget=24) != ours


@pytest.mark.parametrize("which", ["llama_dir", "qwen2_dir", "llama_bias_dir", "tiny"])
def test_kv_bound_holds_for_what_the_model_computes(which, request):
    """`kv_bound` (what imported K/V is checked against) is above every K/V value the model
    computes: biases, RoPE scaling and an explicit head_dim included; by its slack even
    without it (it must never refuse a peer's honest KV), and far below a poisoned 1e30."""
    from genset.engines.torch.runner import _KV_BOUND_SLACK

    d = "tiny" if which == "tiny" else request.getfixturevalue(which)[0]
    runner = ModelRunner(d, num_blocks=128, block_size=4, dtype="float32")
    vocab = runner.vocab_size
    generate(runner, _prompts(seed=3, vocab=vocab), max_tokens=8, token_budget=64)
    peak = runner.kv_cache.abs().max().item()
    assert 0 < peak * _KV_BOUND_SLACK <= runner.kv_bound < 1e6


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.5},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16, "mscale": 1.0, "mscale_all_dim": 0.5},
    ],
)
def test_rope_scaling_matches_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from genset.engines.torch.config import parse_config
    from genset.engines.torch.rope import inverse_frequencies

    raw = SMALL | {"model_type": "llama", "rope_scaling": dict(rope), "rope_theta": 50000.0}
    ours, our_scale = inverse_frequencies(parse_config(raw).rope, 16)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert our_scale == pytest.approx(ref_scale)


def test_tiny_model_matches_reference_and_varies():
    runner = ModelRunner("tiny", num_blocks=64, block_size=16)
    model = tiny_reference_model(runner)
    prompts = [[1, 2284, 201, 1961, 349, 14], list(range(100, 160))]
    ours = generate(runner, prompts, max_tokens=16, token_budget=32)
    assert ours == hf_greedy(model, prompts, 16)
    assert all(len(set(o)) > 4 for o in ours)
    # Dummy weights are a pure function of the seed.
    again = ModelRunner("tiny", num_blocks=8, block_size=16)
    assert torch.equal(again.weights["lm_head.weight"], runner.weights["lm_head.weight"])


# -- sampling -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runner_factory():
    return lambda: ModelRunner("tiny", num_blocks=96, block_size=16)


def test_sampling_seeded_and_greedy_equivalents(tiny_runner_factory):
    prompts = [list(range(10, 30)), list(range(300, 340)), [5, 6, 7]]
    greedy = generate(tiny_runner_factory(), prompts, max_tokens=8)
    # temperature 0 and top_k=1 are greedy, whatever the other knobs say.
    for spec in (SamplingSpec(temperature=0.0, top_p=0.5), SamplingSpec(temperature=1.5, top_k=1)):
        assert generate(tiny_runner_factory(), prompts, max_tokens=8, sampling=spec) == greedy

    seeded = [SamplingSpec(temperature=1.0, top_p=0.95, seed=42 + i) for i in range(3)]
    a = generate(tiny_runner_factory(), prompts, max_tokens=8, sampling=seeded)
    # Same seeds, different batch composition and budget: same tokens.
    b = generate(tiny_runner_factory(), prompts[:1], max_tokens=8, sampling=seeded[:1])
    c = generate(tiny_runner_factory(), prompts, max_tokens=8, sampling=seeded, token_budget=7)
    assert a[0] == b[0]
    assert a == c
    assert a != greedy  # sampling actually sampled
    other = [SamplingSpec(temperature=1.0, top_p=0.95, seed=1000 + i) for i in range(3)]
    assert generate(tiny_runner_factory(), prompts, max_tokens=8, sampling=other) != a


def test_top_k_top_p_filtering():
    from genset.engines.torch.sampling import filtered_probs

    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    p = filtered_probs(logits, SamplingSpec(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and p[:2].sum().item() == pytest.approx(1.0)
    full = torch.softmax(logits, -1)
    p = filtered_probs(logits, SamplingSpec(temperature=1.0, top_p=float(full[0] + 0.01)))
    assert (p[2:] == 0).all() and p[1] > 0  # smallest set reaching top_p: two tokens
    p = filtered_probs(logits, SamplingSpec(temperature=1.0, top_p=0.01))
    assert p[0].item() == pytest.approx(1.0)  # the top token always survives


# -- KV export / import --------------------------------------------------------------------------


GREEDY = SamplingSpec(temperature=0.0)


def _step(runner, seq, ids, start, table):
    return runner.execute(StepPlan([ScheduledChunk(seq, ids, start, table, True, GREEDY)]))[0]


def test_kv_export_import_continues_identically():
    bs = 8
    prompt = list(range(40, 77))  # 37 tokens: 4 full blocks and a partial one
    uninterrupted = generate(
        ModelRunner("tiny", num_blocks=16, block_size=bs), [prompt], max_tokens=10
    )[0]

    a = ModelRunner("tiny", num_blocks=16, block_size=bs)
    table_a = [3, 9, 1, 12, 5, 6]
    first = _step(a, "x", prompt, 0, table_a)
    n_blocks = -(-len(prompt) // bs)
    payload = a.read_blocks(table_a[:n_blocks])
    assert isinstance(payload, bytes)

    b = ModelRunner("tiny", num_blocks=16, block_size=bs)
    table_b = [14, 0, 7, 2, 11, 4]  # different physical blocks
    b.write_blocks(table_b[:n_blocks], payload)
    out, tok = [first], first
    for i in range(9):
        tok = _step(b, "x", [tok], len(prompt) + i, table_b)
        out.append(tok)
    assert out == uninterrupted
    assert b.tokens_computed == 9  # nothing recomputed on b


def test_kv_payload_is_validated():
    from genset.engines.torch import kvformat

    a = ModelRunner("tiny", num_blocks=4, block_size=8)
    payload = a.read_blocks([0, 1])
    header, _ = kvformat.read_header(payload)
    assert header["shape"] == [2, *a.block_shape] and header["dtype"] == "float32"
    assert len(kvformat.split(payload)) == 2
    assert kvformat.join(kvformat.split(payload)) == payload
    with pytest.raises(ValueError, match="shape"):
        ModelRunner("tiny", num_blocks=4, block_size=16).write_blocks([0, 1], payload)
    with pytest.raises(ValueError, match="want"):
        a.write_blocks([0], payload)  # 2 blocks into 1 id
    with pytest.raises(kvformat.KVFormatError, match="magic"):
        a.write_blocks([0], b"nope")
    with pytest.raises(kvformat.KVFormatError, match="data bytes"):
        a.write_blocks([0, 1], payload[:-4])
    with pytest.raises(ValueError, match="block id 7"):
        a.read_blocks([7])


# -- bad input -----------------------------------------------------------------------------------


def _write_cfg(tmp_path, **changes):
    raw = json.loads((resolve_model("tiny") / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            raw.pop(k, None)
        else:
            raw[k] = v
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hidden_size": ...}, "hidden_size"),
        ({"model_type": "gpt2"}, "model_type"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"vocab_size": "many"}, "vocab_size"),
        ({"rms_norm_eps": -1}, "rms_norm_eps"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "original_max_position"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ],
)
def test_bad_config_names_the_field(tmp_path, changes, field):
    d = _write_cfg(tmp_path, **changes)
    with pytest.raises(ModelConfigError, match=field):
        ModelRunner(d, num_blocks=4, block_size=8)


def test_unreadable_config_and_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="JSON"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ModelRunner("no-such-model", num_blocks=4, block_size=8)
    d = _write_cfg(tmp_path, genset_dummy_weights_seed=...)
    with pytest.raises(WeightsError, match="safetensors"):
        ModelRunner(d, num_blocks=4, block_size=8)


def test_checkpoint_shape_mismatch_names_tensor(tmp_path, llama_dir):
    d, _ = llama_dir
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=r"mlp\.(gate|up|down)_proj\.weight"):
        ModelRunner(tmp_path, num_blocks=4, block_size=8)


def test_bad_plan_is_refused():
    r = ModelRunner("tiny", num_blocks=4, block_size=8)
    with pytest.raises(ValueError, match="block table"):
        r.execute(StepPlan([ScheduledChunk("a", list(range(20)), 0, [0, 1], True)]))
    with pytest.raises(ValueError, match="outside vocab"):
        r.execute(StepPlan([ScheduledChunk("a", [10**6], 0, [0], True)]))
    with pytest.raises(ValueError, match="block id 9"):
        r.execute(StepPlan([ScheduledChunk("a", [1], 0, [9], True)]))


# -- the built-in tiny model's assets ------------------------------------------------------------


def test_tiny_assets_are_a_usable_hf_directory():
    from tokenizers import Tokenizer

    d = resolve_model("tiny")
    cfg = json.loads((d / "config.json").read_text())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg["vocab_size"]
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok.token_to_id("<|im_end|>") == 2
    text = "def f(x):\n    return x  # héllo ✓"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless on any text
    chat = transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(chat).ids[0] == 1  # <|im_start|> is one special token


def test_resolving_tiny_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from genset.engines.torch.tiny import resolve_model; resolve_model('tiny');"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_greedy_equals_reference(llama_dir):
    d, model = llama_dir
    prompts = _prompts(seed=11)
    runner = ModelRunner(d, num_blocks=128, block_size=4, device="cuda", dtype="float32")
    ours = generate(runner, prompts, max_tokens=12, token_budget=16)
    assert ours == hf_greedy(model, prompts, 12)


def test_bfloat16_runner_and_cross_dtype_kv_import():
    from genset.engines.torch import kvformat

    def logits(runner, ids, start, table):
        plan = StepPlan([ScheduledChunk("x", ids, start, table, True, GREEDY)])
        return runner.forward_logits(plan)[0]

    prompt = list(range(200, 237))
    a = ModelRunner("tiny", num_blocks=8, block_size=8, dtype="bfloat16")
    assert a.kv_cache.dtype == torch.bfloat16 and a.kv_bytes_per_block == 8192
    full = logits(a, prompt, 0, [0, 1, 2, 3, 4, 5])
    payload = a.read_blocks([0, 1, 2, 3])
    assert kvformat.read_header(payload)[0]["dtype"] == "bfloat16"
    b = ModelRunner("tiny", num_blocks=8, block_size=8, dtype="bfloat16")
    b.write_blocks([7, 6, 5, 4], payload)
    assert torch.equal(b.read_blocks_tensor([7, 6, 5, 4]), a.read_blocks_tensor([0, 1, 2, 3]))
    # Recomputing only the partial 5th block on top of the imported ones gives the same
    # logits (up to bf16 rounding, which may depend on how rows are batched).
    cont = logits(b, prompt[32:], 32, [7, 6, 5, 4, 3])
    torch.testing.assert_close(cont, full, atol=0.15, rtol=0.05)
    # A float32 runner accepts bf16 blocks (converted on import) and agrees as closely.
    c = ModelRunner("tiny", num_blocks=8, block_size=8)
    c.write_blocks([0, 1, 2, 3], payload)
    assert c.kv_cache.dtype == torch.float32
    torch.testing.assert_close(
        logits(c, prompt[32:], 32, [0, 1, 2, 3, 4]), full, atol=0.3, rtol=0.1
    )


def test_decodes_of_very_different_lengths_are_grouped_and_exact():
    from genset.engines.torch.runner import _decode_groups

    assert _decode_groups([5, 9, 300, 310, 2000]) == [(0, 4), (4, 5)]
    assert _decode_groups([5, 9, 1300, 1310, 4000]) == [(0, 2), (2, 4), (4, 5)]
    assert _decode_groups([5, 9, 200]) == [(0, 3)]  # short spreads stay one call
    assert _decode_groups([]) == []
    # Every context one longer (the next decode step): the same groups.
    spread = random.Random(3)
    lens = sorted(spread.randint(17, 300) for _ in range(40))
    assert _decode_groups(lens) == _decode_groups([n + 1 for n in lens])
    assert len(_decode_groups(lens)) >= 2

    runner = ModelRunner("tiny", num_blocks=128, block_size=16)
    model = tiny_reference_model(runner)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 4096) for _ in range(n)] for n in (700, 4, 11, 330)]
    steps = []
    ours = generate(
        runner,
        prompts,
        max_tokens=5,
        token_budget=256,
        on_step=lambda plan, _: steps.append(
            sorted(c.start_pos + 1 for c in plan.chunks if len(c.token_ids) == 1)
        ),
    )
    assert max(len(_decode_groups(lens)) for lens in steps if lens) >= 2
    assert ours == hf_greedy(model, prompts, 5)


def test_decode_kv_kept_dense_across_steps_is_exact(monkeypatch):
    """Decode groups keep their gathered K/V between steps and append to it; the result is
    the same as gathering from the paged cache every step, and as the reference."""
    import genset.engines.torch.runner as runner_mod

    rng = random.Random(11)
    prompts = [[rng.randrange(3, 4096) for _ in range(n)] for n in (40, 7, 90, 23, 61)]
    # token_budget 32: prompts finish prefill at different steps, so the decode group
    # changes several times (rebuilt) and stays the same in between (appended to).
    dense = ModelRunner("tiny", num_blocks=128, block_size=16)
    ours = generate(dense, prompts, max_tokens=20, token_budget=32)
    assert dense.decode_groups_appended > dense.decode_groups_gathered > 0

    monkeypatch.setattr(runner_mod, "_DENSE_KV_BYTES", 0)  # no room: gather every step
    plain = ModelRunner("tiny", num_blocks=128, block_size=16)
    assert generate(plain, prompts, max_tokens=20, token_budget=32) == ours
    assert plain.decode_groups_appended == 0

    model = tiny_reference_model(dense)
    assert ours == hf_greedy(model, prompts, 20)


def test_dense_decode_kv_ignores_garbage_in_fresh_buffers(monkeypatch):
    """A dense copy is allocated uninitialised; whatever that memory held (here NaN, as it
    did on the CI machine) must not reach the shorter rows of a group through its masked
    columns."""
    runner = ModelRunner("tiny", num_blocks=128, block_size=16)
    fresh = runner._new_dense

    def poisoned(key, longest):
        dense = fresh(key, longest)
        if dense is not None:
            dense.kv.fill_(float("nan"))
        return dense

    monkeypatch.setattr(runner, "_new_dense", poisoned)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 4096) for _ in range(n)] for n in (4, 11, 30)]
    ours = generate(runner, prompts, max_tokens=8, token_budget=256)
    assert runner.decode_groups_appended > 0
    clean = ModelRunner("tiny", num_blocks=128, block_size=16)
    assert generate(clean, prompts, max_tokens=8, token_budget=256) == ours


def test_fused_rms_norm_is_the_reference_formula_in_float32():
    from genset.engines.torch.model import rms_norm

    x, w = torch.randn(37, 256), torch.randn(256)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(rms_norm(x, w, 1e-5), ref)


def test_packed_small_batch_weights_are_used_and_exact_on_cpu():
    """The pre-packed MKL weights (the decode fast path) are on for CPU float32, packed for
    several row counts, and every batch size (padded or not) gives what F.linear gives, up to
    float32 rounding (F.linear itself picks other kernels for some row counts)."""
    from genset.engines.torch import model as model_mod

    if not model_mod._can_pack(torch.device("cpu"), torch.float32):
        pytest.skip("this torch build has no MKL packed linear")
    runner = ModelRunner("tiny", num_blocks=16, block_size=16, dtype="float32")
    model = runner.model
    assert model.packed_rows == (8, 16, 32)
    assert model.lm_head_p is not None
    pad_to = model.lm_head_p.pad_to
    assert (pad_to[3], pad_to[4], pad_to[7], pad_to[8], pad_to[10]) == (0, 8, 8, 8, 16)
    assert (pad_to[20], pad_to[28], pad_to[32]) == (0, 32, 32)
    layer = model.layers[0]
    for w, packed in ((model.lm_head, model.lm_head_p), (layer.down, layer.down_p)):
        for rows in range(1, 34):
            gen = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, w.shape[1], generator=gen)
            got = model_mod.linear(x, w, None, packed)
            want = torch.nn.functional.linear(x, w)
            if rows < 4:  # F.linear itself
                assert torch.equal(got, want), rows
            else:  # bit-identical at a packed size on the machines measured; rounding may vary
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Too large for even one packed copy: not packed at all.
    assert model_mod.pack_rows_for(1 << 30) == ()
