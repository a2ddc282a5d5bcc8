"""Planner workloads: the sinusoid-modulated trace and the Azure trace reader."""

from __future__ import annotations

import json
import os

import pytest

from genset.planning.workload import WorkloadError, modulate, rate_profile, read_azure
from tests.helpers.shared_data import shared_data

DATA = shared_data()


def steady(n: int, rate: float) -> list[dict]:
    return [{"timestamp": i * 1000.0 / rate, "input_length": 100, "output_length": 10,
             "hash_ids": [i]} for i in range(n)]


def test_modulated_rate_swings_between_low_and_peak_and_keeps_order_and_content():
    recs = steady(6000, rate=10.0)  # 600 s at 10 req/s
    out = modulate(recs, period_s=200.0, low=0.25)
    assert [r["hash_ids"] for r in out] == [r["hash_ids"] for r in recs]
    ts = [r["timestamp"] for r in out]
    assert ts == sorted(ts) and ts[0] == 0.0
    assert ts[-1] / 1000 == pytest.approx(600.0, rel=0.02)  # duration kept by default
    rates = rate_profile(out, bucket_s=10.0)[:-1]
    assert max(rates) / min(rates) == pytest.approx(4.0, rel=0.15)
    assert max(rates) == pytest.approx(10.0 / 0.625, rel=0.05)  # peak = mean / mean(m)
    # the low point is at t = 0, the peak half a period later
    assert rates[0] < rates[10] > rates[19]


def test_modulated_peak_rate_can_be_set():
    out = modulate(steady(3000, rate=10.0), period_s=100.0, low=0.5, peak_rate=40.0)
    rates = rate_profile(out, bucket_s=5.0)[:-1]
    assert max(rates) == pytest.approx(40.0, rel=0.08)
    assert min(rates) == pytest.approx(20.0, rel=0.1)
    with pytest.raises(WorkloadError, match="low"):
        modulate(steady(10, 1.0), low=0.0)
    assert modulate([], period_s=10) == []


def test_azure_reader_turns_rows_into_mooncake_records(tmp_path):
    p = tmp_path / "azure.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.6805900,374,44\n"
                 "2023-11-16 18:15:50.9951690,1025,109\n\n"
                 "2023-11-16 18:15:51,10,1\n")
    recs = read_azure(str(p))
    assert [r["timestamp"] for r in recs] == pytest.approx([0.0, 4314.579, 4319.41])
    assert recs[1] == {"timestamp": recs[1]["timestamp"], "input_length": 1025,
                       "output_length": 109, "hash_ids": [1, 2, 3]}
    assert recs[0]["hash_ids"] == [0] and recs[2]["hash_ids"] == [4]  # never shared
    slow = read_azure(str(p), time_scale=2.0, limit=2)
    assert len(slow) == 2 and slow[1]["timestamp"] == pytest.approx(2 * 4314.579)


@pytest.mark.parametrize("body, words", [
    ("a,b,c\n", "expected the header"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n", ":2: TIMESTAMP 'yesterday'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,x,1\n", ":2: ContextTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,0,1\n", ">= 1"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1\n", "3 fields"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,1\n"
     "2023-11-16 18:15:40,1,1\n", ":3: TIMESTAMP goes back"),
    # these were a UnicodeDecodeError, two billion hash ids (MemoryError), and 10000 s added
    (b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,1\n\xff,1,1\n",
     ":3: not UTF-8 text"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1000000000000,1\n",
     ":2: ContextTokens 1000000000000 is more than"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,1\n"
     "2023-11-16 18:15:46.1e5,1,1\n", ":3: TIMESTAMP '2023-11-16 18:15:46.1e5'"),
])
def test_azure_reader_errors_name_the_line(tmp_path, body, words):
    p = tmp_path / "bad.csv"
    p.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(WorkloadError, match=words):
        read_azure(str(p))
    with pytest.raises(WorkloadError, match="cannot read"):
        read_azure(str(tmp_path / "missing.csv"))


@pytest.mark.skipif(not (DATA / "azure_llm_conv_2023.csv").exists(),
                    reason="../shared/data not present")
def test_real_traces_convert_and_parse_as_mooncake(tmp_path):
    from genset.replay.trace import load_trace  # the replay's own reader

    for name in ("azure_llm_conv_2023.csv", "azure_llm_code_2023.csv"):
        recs = read_azure(str(DATA / name))
        out = tmp_path / (name + ".jsonl")
        out.write_text("".join(json.dumps(r) + "\n" for r in recs))
        assert len(load_trace(str(out))) == len(recs) > 8000
    mooncake = [json.loads(x) for x in (DATA / "mooncake_synthetic_trace.jsonl").open()]
    mod = modulate(mooncake, period_s=300.0)
    assert len(mod) == len(mooncake)
    out = tmp_path / "mc.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in mod))
    assert len(load_trace(str(out))) == len(mooncake)
    assert os.path.getsize(out) > 0
