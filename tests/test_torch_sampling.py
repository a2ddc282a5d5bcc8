"""Torch engine sampling parameters (issue 16): repetition / presence / frequency penalties,
logit_bias, min_tokens, logprobs, greedy determinism and n choices sharing one prefill.

References: transformers' `generate` (repetition penalty), and a dense step-by-step reference
built here on transformers' logits with the penalties written out naively (one token at a
time, no batching), which the engine's vectorised, batched version must match exactly.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from genset.engines.torch.engine import TorchEngine, TorchEngineCore  # noqa: E402
from genset.engines.torch.runner import ModelRunner  # noqa: E402
from genset.engines.torch.tiny import resolve_model  # noqa: E402
from genset.engines.types import EngineRequest  # noqa: E402
from proto.generate import SamplingParams, StopConditions  # noqa: E402

BLOCK = 16


@pytest.fixture(scope="module")
def hf_model():
    """transformers' Llama with the tiny model's weights: the dense reference."""
    weights = ModelRunner("tiny", num_blocks=1, block_size=BLOCK).weights
    raw = json.loads((resolve_model("tiny") / "config.json").read_text())
    raw.pop("genset_dummy_weights_seed")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**raw)).eval()
    model.load_state_dict(weights)
    return model


def _core(num_blocks: int = 128, max_batch_tokens: int = 2048) -> TorchEngineCore:
    return TorchEngineCore(ModelRunner("tiny", num_blocks=num_blocks, block_size=BLOCK),
                           max_batch_tokens=max_batch_tokens)


def _run(core: TorchEngineCore, requests: list[EngineRequest]) -> dict[str, dict]:
    """Submit all, step until done: per request its tokens, logprobs, finish, first output."""
    res: dict[str, dict] = {}
    for r in requests:
        core.add_request(r)
        res[r.request_id] = {"tokens": [], "lp": [], "top_ids": [], "top_lp": [],
                             "finish": None, "first": None}
    while core.has_work():
        outputs, _ = core.step()
        for o in outputs:
            d = res[o.request_id]
            d["first"] = d["first"] or o
            d["tokens"] += o.token_ids
            if o.logprobs is not None:
                d["lp"] += o.logprobs.logprobs
                d["top_ids"] += o.logprobs.top_ids
                d["top_lp"] += o.logprobs.top_logprobs
            if o.finish_reason:
                d["finish"] = o.finish_reason
                d["usage"] = o
    return res


def _req(rid, prompt, n, **sampling):
    stop = sampling.pop("stop", None) or StopConditions(max_tokens=n, ignore_eos=True)
    return EngineRequest(rid, list(prompt), SamplingParams(**sampling), stop)


def _prompt(seed: int, n: int, vocab: int = 4096, repeats: bool = False) -> list[int]:
    rng = random.Random(seed)
    if repeats:  # a small alphabet: the prompt repeats tokens, so penalties bite at once
        alphabet = [rng.randrange(3, vocab) for _ in range(6)]
        return [rng.choice(alphabet) for _ in range(n)]
    return [rng.randrange(3, vocab) for _ in range(n)]


def _dense_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def _dense_greedy(model, prompt, n, *, rep=1.0, freq=0.0, pres=0.0, bias=None):
    """Greedy decoding with the penalties applied one token at a time, naively."""
    seq = list(prompt)
    out: list[int] = []
    for _ in range(n):
        x = _dense_logits(model, seq)[-1].clone()
        for t, b in (bias or {}).items():
            x[t] += b
        if rep != 1.0:
            for t in set(seq):
                x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        for t, c in Counter(out).items():
            x[t] -= freq * c + pres
        tok = int(x.argmax())
        out.append(tok)
        seq.append(tok)
    return out


def test_greedy_repetition_penalty_equals_transformers_generate(hf_model):
    prompts = [_prompt(s, 20 + 7 * s, repeats=s % 2 == 0) for s in range(4)]
    n = 12
    got = _run(_core(), [_req(f"r{i}", p, n, temperature=0.0, repetition_penalty=1.3)
                         for i, p in enumerate(prompts)])
    plain = _run(_core(), [_req(f"r{i}", p, n, temperature=0.0) for i, p in enumerate(prompts)])
    changed = 0
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.3,
                pad_token_id=0)[0, len(p):].tolist()
        assert got[f"r{i}"]["tokens"] == ref, f"prompt {i}"
        changed += got[f"r{i}"]["tokens"] != plain[f"r{i}"]["tokens"]
    assert changed, "the penalty changed no output: the test would prove nothing"


def test_penalties_and_bias_equal_the_naive_reference_in_one_batch(hf_model):
    """Requests with different settings share every step: each row gets its own."""
    cases = {
        "plain": {},
        "freq": {"frequency_penalty": -2.0},  # negative: encourages repeats, so it shows
        "pres": {"presence_penalty": -2.0},
        "mixed": {"frequency_penalty": 1.5, "presence_penalty": -1.0, "repetition_penalty": 0.8},
        "bias": {"logit_bias": {"100": 6.0, "200": -3.0}, "repetition_penalty": 1.5},
    }
    prompts = {name: _prompt(10 + i, 24, repeats=True) for i, name in enumerate(cases)}
    n = 10
    got = _run(_core(), [_req(name, prompts[name], n, temperature=0.0, **kw)
                         for name, kw in cases.items()])
    for name, kw in cases.items():
        ref = _dense_greedy(
            hf_model, prompts[name], n, rep=kw.get("repetition_penalty", 1.0),
            freq=kw.get("frequency_penalty", 0.0), pres=kw.get("presence_penalty", 0.0),
            bias={int(k): v for k, v in kw.get("logit_bias", {}).items()})
        assert got[name]["tokens"] == ref, name
        if name != "plain":
            assert ref != _dense_greedy(hf_model, prompts[name], n), f"{name} had no effect"


def test_logit_bias_forces_and_bans_tokens():
    prompt = _prompt(3, 30)
    base = _run(_core(), [_req("a", prompt, 6, temperature=0.0)])["a"]["tokens"]
    got = _run(_core(), [
        _req("force", prompt, 6, temperature=0.0, logit_bias={"77": 100.0}),
        _req("ban", prompt, 6, temperature=0.0, logit_bias={str(t): -100.0 for t in set(base)}),
        _req("sampled", prompt, 6, temperature=1.0, seed=5, logit_bias={"77": 100.0}),
    ])
    assert got["force"]["tokens"] == [77] * 6
    assert got["sampled"]["tokens"] == [77] * 6  # +100 dwarfs every other logit
    assert not set(got["ban"]["tokens"]) & set(base)


def test_logit_bias_outside_the_vocabulary_is_refused():
    core = _core()
    with pytest.raises(ValueError, match="logit_bias: token id 4096 is outside"):
        core.add_request(_req("x", [1, 2], 2, logit_bias={"4096": 1.0}))
    assert not core.has_work()


def test_min_tokens_masks_stop_ids_and_eos_until_reached():
    core = _core()
    prompt = _prompt(4, 20)
    eos = core.card.eos_token_ids[0]
    stop = _run(core, [_req("free", prompt, 8, temperature=0.0)])["free"]["tokens"][0]
    got = _run(core, [
        # the stop id is what greedy picks first: without min_tokens it stops at once
        _req("no-min", prompt, 8, temperature=0.0,
             stop=StopConditions(max_tokens=8, stop_token_ids=[stop], ignore_eos=True)),
        # forced by bias on every step, the stop id comes exactly after min_tokens
        _req("stop-id", prompt, 20, temperature=0.0, logit_bias={str(stop): 100.0},
             stop=StopConditions(max_tokens=20, stop_token_ids=[stop], min_tokens=5,
                                 ignore_eos=True)),
        _req("eos", prompt, 20, temperature=0.7, seed=3, logit_bias={str(eos): 100.0},
             stop=StopConditions(max_tokens=20, min_tokens=3)),
        # EOS ignored: it is not a stop, so not masked either
        _req("eos-ignored", prompt, 4, temperature=0.0, logit_bias={str(eos): 100.0},
             stop=StopConditions(max_tokens=4, min_tokens=3, ignore_eos=True)),
    ])
    assert got["no-min"]["tokens"] == [stop] and got["no-min"]["finish"] == "stop"
    t = got["stop-id"]["tokens"]
    assert len(t) == 6 and stop not in t[:5] and t[5] == stop and got["stop-id"]["finish"] == "stop"
    t = got["eos"]["tokens"]
    assert len(t) == 4 and eos not in t[:3] and t[3] == eos and got["eos"]["finish"] == "stop"
    assert got["eos-ignored"]["tokens"] == [eos] * 4
    assert got["eos-ignored"]["finish"] == "length"


def test_logprobs_are_log_softmax_of_the_reference_logits(hf_model):
    prompts = [_prompt(20 + i, 18 + 5 * i) for i in range(3)]
    n = 6
    got = _run(_core(), [
        _req("greedy", prompts[0], n, temperature=0.0, logprobs=5),
        # sampled and penalised: logprobs are still the model's raw distribution
        _req("sampled", prompts[1], n, temperature=1.3, seed=11, logprobs=3,
             presence_penalty=1.0, logit_bias={"9": 4.0}),
        _req("chosen-only", prompts[2], n, temperature=0.0, logprobs=0),
        _req("none", prompts[2], n, temperature=0.0),  # the same step, without logprobs
    ])
    for name, prompt, k in (("greedy", prompts[0], 5), ("sampled", prompts[1], 3),
                            ("chosen-only", prompts[2], 0)):
        d = got[name]
        toks = d["tokens"]
        assert len(d["lp"]) == len(d["top_ids"]) == len(d["top_lp"]) == len(toks) == n
        assert all(len(row) == k for row in d["top_ids"] + d["top_lp"])
        ref = torch.log_softmax(_dense_logits(hf_model, prompt + toks), dim=-1)
        for i, tok in enumerate(toks):
            row = ref[len(prompt) - 1 + i]
            assert d["lp"][i] == pytest.approx(float(row[tok]), abs=1e-4)
            if k:
                top = torch.topk(row, k)
                assert d["top_ids"][i] == top.indices.tolist(), (name, i)
                assert d["top_lp"][i] == pytest.approx(top.values.tolist(), abs=1e-4)
        if name == "greedy":  # the chosen token is the most likely one
            assert [ids[0] for ids in d["top_ids"]] == toks
    assert got["none"]["lp"] == [] and got["none"]["first"].logprobs is None
    assert got["none"]["tokens"] == got["chosen-only"]["tokens"]


def test_greedy_is_deterministic_across_request_ids_and_engines():
    prompt = _prompt(30, 37)
    one = _run(_core(), [_req("first-id", prompt, 12, temperature=0.0)])["first-id"]["tokens"]
    # another engine instance, another id, another request in the same steps
    other = _run(_core(), [_req("x", _prompt(31, 25), 12, temperature=0.0),
                           _req("second-id", prompt, 12, temperature=0.0, seed=99)])
    assert other["second-id"]["tokens"] == one
    # top_k=1 is greedy too, whatever the temperature
    again = _run(_core(), [_req("third", prompt, 12, temperature=0.9, top_k=1)])
    assert again["third"]["tokens"] == one


async def test_engine_stream_carries_logprobs_for_every_token():
    """Through the asyncio engine (outputs may be merged when the reader lags): one logprob
    entry per token, in order."""
    engine = TorchEngine("tiny", num_blocks=64, stream_maxsize=2)
    try:
        stream = await engine.submit(_req("a", _prompt(40, 20), 9, temperature=0.0, logprobs=2))
        toks, lps, tops = [], [], []
        async for out in stream:
            toks += out.token_ids
            if out.logprobs is not None:
                lps += out.logprobs.logprobs
                tops += out.logprobs.top_ids
        assert len(toks) == len(lps) == len(tops) == 9
        assert [t[0] for t in tops] == toks
    finally:
        await engine.stop()


def test_n_choices_share_one_prefill():
    """n choices as n requests with the same prompt: once choice 0 has its first token (its
    prompt's full blocks are in the prefix cache), the others are admitted with every full
    prompt block cached and compute only the last, partial one."""
    core = _core(max_batch_tokens=32)  # the 70-token prompt is prefilled in 3 chunks
    runner = core.runner
    prompt = _prompt(50, 70)
    sampling = SamplingParams(temperature=1.0, seed=123)
    stop = StopConditions(max_tokens=5, ignore_eos=True)
    core.add_request(EngineRequest("c0", prompt, sampling.for_choice(0), stop))
    before = runner.tokens_computed
    outs: dict[str, list] = {"c0": []}
    while not outs["c0"]:
        for o in core.step()[0]:
            outs[o.request_id].append(o)
    assert runner.tokens_computed - before == 70  # choice 0: the whole prompt, once
    for i in range(1, 4):
        core.add_request(EngineRequest(f"c{i}", prompt, sampling.for_choice(i), stop))
        outs[f"c{i}"] = []
    before = runner.tokens_computed
    while core.has_work():
        for o in core.step()[0]:
            outs[o.request_id].append(o)
    full = (70 - 1) // BLOCK * BLOCK  # 64: every full block (the last token is always computed)
    decodes = 4 + 3 * 4  # c0's 4 more tokens; c1..c3: 4 decode steps each after the first
    assert runner.tokens_computed - before == 3 * (70 - full) + decodes
    for i in range(1, 4):
        assert outs[f"c{i}"][0].cached_tokens == full
    tokens = {rid: [t for o in os_ for t in o.token_ids] for rid, os_ in outs.items()}
    assert len({tuple(t) for t in tokens.values()}) == 4  # seeded choices differ
    # choice 0 is exactly the n = 1 request
    alone = _run(_core(), [EngineRequest("solo", prompt, sampling, stop)])["solo"]["tokens"]
    assert tokens["c0"] == alone


# ---- rows that give no token (NaN / infinite logits): that request alone ends -------------


def test_sample_gives_no_token_for_non_finite_rows_and_samples_the_others():
    """One batch: healthy greedy and seeded rows next to a NaN, a +inf and an all -inf row,
    greedy and sampled. Before, greedy's argmax picked the NaN's index as a token and the
    sampled NaN row raised ("probability tensor contains either inf, nan or element < 0"),
    failing the whole step."""
    from genset.engines.batch import SamplingSpec
    from genset.engines.torch.sampling import sample

    vocab = 64
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1))
    logits[1, 7] = float("nan")
    logits[3, 5] = float("inf")
    logits[4] = float("-inf")
    logits[5, 9] = float("nan")
    greedy, seeded = SamplingSpec(temperature=0.0), SamplingSpec(temperature=0.8, seed=11)
    specs = [greedy, greedy, seeded, seeded, greedy, seeded]
    got = sample(logits.clone(), specs, [0] * 6, torch.Generator().manual_seed(0))
    assert got[1] is None and got[3] is None and got[4] is None and got[5] is None
    assert got[0] == int(logits[0].argmax())
    # the healthy seeded row draws what it draws alone
    alone = sample(logits[2:3].clone(), [seeded], [0], torch.Generator().manual_seed(0))
    assert got[2] == alone[0] is not None
    # an all-greedy batch takes the same check (its own code path)
    assert sample(logits[:2].clone(), [greedy, greedy], [0, 0], torch.Generator()) == [
        got[0], None]
    # finite logits that a tiny temperature turns into infinities: no distribution either
    tiny = SamplingSpec(temperature=1e-45)
    assert sample(logits[:1].clone() * 1e3, [tiny], [0], torch.Generator()) == [None]


def test_min_tokens_with_repetition_penalty_masks_without_nan():
    """min_tokens' -inf went through the repetition penalty's blend, which made it NaN:
    greedy then emitted the masked EOS at once (min_tokens broken) and a sampled request
    raised, taking the step down. The mask is applied last now."""
    core = _core()
    prompt = _prompt(9, 20, repeats=True)
    eos = core.card.eos_token_ids[0]
    stop = StopConditions(max_tokens=20, min_tokens=3)
    got = _run(core, [
        _req("greedy", prompt, 20, temperature=0.0, repetition_penalty=1.3,
             logit_bias={str(eos): 100.0}, stop=stop),
        _req("sampled", prompt, 20, temperature=0.7, seed=4, repetition_penalty=1.3,
             logit_bias={str(eos): 100.0}, stop=stop),
    ])
    for rid in ("greedy", "sampled"):
        t = got[rid]["tokens"]
        assert len(t) == 4 and eos not in t[:3] and t[3] == eos, (rid, t)
        assert got[rid]["finish"] == "stop"


def test_request_with_non_finite_logits_ends_alone_and_the_engine_goes_on():
    """Two greedy requests prefilled in one step; then the first's KV blocks are overwritten
    with huge but finite values (what a peer's import could bring: finite, so the import's
    check lets it in), which overflow its attention into NaN logits. In the next step (the
    same batch) that request ends with an error output of its own, the other gets its token
    and goes on to the end exactly as alone, and the engine serves a third request."""
    prompts = {"bad": _prompt(21, 40), "good": _prompt(22, 30), "after": _prompt(23, 25)}
    core = _core(num_blocks=64)
    stop = StopConditions(max_tokens=6, ignore_eos=True)
    for rid in ("bad", "good"):
        core.add_request(EngineRequest(rid, prompts[rid], SamplingParams(temperature=0.0), stop))
    first, _ = core.step()
    assert sorted(o.request_id for o in first) == ["bad", "good"]  # both prefilled, 1 token
    blocks = core.scheduler.requests["bad"].block_table
    core.runner.kv_cache[:, :, blocks] = 3e38

    second, _ = core.step()
    by_id = {o.request_id: o for o in second}
    assert set(by_id) == {"bad", "good"}  # one step: the error and the other's token
    err = by_id["bad"]
    assert err.finish_reason == "error" and err.token_ids == []
    assert "NaN or infinite logits" in err.error and err.completion_tokens == 1
    assert err.prompt_tokens == 40
    assert len(by_id["good"].token_ids) == 1 and by_id["good"].finish_reason is None
    assert "bad" not in core.scheduler.requests

    tokens = {"good": first[[o.request_id for o in first].index("good")].token_ids
              + by_id["good"].token_ids}
    while core.has_work():
        for o in core.step()[0]:
            assert o.request_id == "good" and o.finish_reason != "error"
            tokens["good"] += o.token_ids
    after = _run(core, [EngineRequest("after", prompts["after"], SamplingParams(temperature=0.0),
                                      stop)])["after"]
    assert after["finish"] == "length"

    def alone(rid):
        req = EngineRequest(rid, prompts[rid], SamplingParams(temperature=0.0), stop)
        return _run(_core(num_blocks=64), [req])[rid]["tokens"]

    assert tokens["good"] == alone("good")
    assert after["tokens"] == alone("after")
    assert core.pool.num_used == 0  # the ended request's blocks were freed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_penalties_and_logprobs_equal_cpu():
    """The same requests on a CUDA runner (float32): every tensor of the processing and the
    logprobs lives on the device; tokens equal the CPU engine's, logprobs within tolerance."""
    prompts = [_prompt(60 + i, 30, repeats=True) for i in range(3)]
    kws = [{"repetition_penalty": 1.4, "logprobs": 4},
           {"frequency_penalty": -1.5, "presence_penalty": 0.5, "logit_bias": {"11": 3.0}},
           {"logprobs": 0, "stop": StopConditions(max_tokens=8, min_tokens=3,
                                                  stop_token_ids=[5])}]

    def reqs():
        return [_req(f"r{i}", p, 8, temperature=0.0, **dict(kw))
                for i, (p, kw) in enumerate(zip(prompts, kws, strict=True))]

    cpu = _run(_core(), reqs())
    gpu_core = TorchEngineCore(ModelRunner("tiny", num_blocks=128, block_size=BLOCK,
                                           device="cuda", dtype="float32"))
    gpu = _run(gpu_core, reqs())
    for rid in cpu:
        assert gpu[rid]["tokens"] == cpu[rid]["tokens"], rid
        assert gpu[rid]["lp"] == pytest.approx(cpu[rid]["lp"], abs=1e-3)
        assert gpu[rid]["top_ids"] == cpu[rid]["top_ids"]
