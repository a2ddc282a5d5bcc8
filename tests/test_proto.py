"""The wire contract: round trips, plain-msgpack readability, validation, versioning."""

from __future__ import annotations

import json

import msgpack
import msgspec
import pytest

import proto
from proto import keys, subjects
from proto.codec import ProtocolError, decode, encode
from proto.schema import schema

SAMPLES = [
    proto.GenerateRequest(
        request_id="r-1",
        model="tiny",
        token_ids=proto.pack_tokens([1, 2, 3, 70000]),
        sampling=proto.SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=7),
        stop=proto.StopConditions(max_tokens=32, stop_token_ids=[2], ignore_eos=True),
        deadline_ms=1_800_000_000_000,
    ),
    proto.StreamChunk(seq=3, token_ids=proto.pack_tokens([5, 6])),
    proto.StreamChunk(
        seq=9, final=True, finish_reason=proto.FINISH_LENGTH,
        usage=proto.Usage(prompt_tokens=4, completion_tokens=8, cached_tokens=2),
    ),
    proto.StreamChunk(seq=4, heartbeat=True),
    proto.StreamChunk(seq=1, final=True, error=proto.ErrorInfo(code="overloaded", message="busy", retryable=True)),
    proto.Cancel(stream_id="_INBOX.abc.1", reason="client disconnected"),
    proto.KvEventBatch(
        worker_id=0xABCDEF,
        event_id=12,
        events=[
            proto.Stored(parent_hash=None, blocks=[proto.StoredBlock(hash=2**64 - 1, token_ids=proto.pack_tokens(range(4)))]),
            proto.Stored(parent_hash=2**64 - 1, blocks=[proto.StoredBlock(hash=17)]),
            proto.Removed(hashes=[17, 18]),
            proto.Cleared(),
        ],
        ts_ms=123,
    ),
    proto.KvResyncRequest(worker_id=5),
    proto.LoadReport(worker_id=5, ts_ms=1, running=3, waiting=1, waiting_prefill_tokens=900,
                     kv_used_blocks=10, kv_total_blocks=100, step_ms_ewma=12.5),
    proto.InstanceRecord(instance_id=9, component="decode", namespace="default",
                         subjects={"generate": "genset.default.decode.generate.9"}, pid=42),
    proto.ModelCard(model="tiny", instance_id=9, block_size=16, kv_blocks=512, context_length=2048,
                    eos_token_ids=[2], generate_subject="genset.default.decode.generate.9"),
    proto.RouteRequest(request_id="r-1", model="tiny", token_ids=proto.pack_tokens([1, 2]), exclude=[3]),
    proto.RouteDecision(request_id="r-1", worker_id=9, model="tiny", overlap_blocks=2, policy="genset"),
    proto.RequestLifecycle(request_id="r-1", worker_id=9, phase=proto.PHASE_FIRST_TOKEN),
    proto.ClientGenerateRequest(model="tiny", messages=[proto.ChatMessage(role="user", content="hi")],
                                max_tokens=8, stop=["\n\n"]),
    # the KV offload store's messages (proto/offload.py)
    proto.OffloadPut(sender_id=9, blocks=[
        proto.OffloadBlock(hash=2**64 - 1, token_ids=proto.pack_tokens(range(4)), data=b"kv"),
        proto.OffloadBlock(hash=5, parent_hash=2**64 - 1)]),
    proto.OffloadPutReply(store_id=3, stored=1, known=1, refused=1, error="too large"),
    proto.OffloadLookup(hashes=[2**64 - 1, 5], max_bytes=1 << 20, want_tokens=True,
                        max_large_bytes=64 << 20),
    proto.OffloadLookupReply(store_id=3, held=2, blocks=[proto.OffloadBlock(hash=2**64 - 1)],
                             disk_blocks=1, large=[proto.OffloadBlockRef(
                                 hash=5, parent_hash=2**64 - 1, size=2 << 20)]),
    proto.OffloadPutPart(sender_id=9, hash=5, parent_hash=2**64 - 1,
                         token_ids=proto.pack_tokens(range(16)), size=2 << 20,
                         offset=1 << 20, data=b"kv"),
    proto.OffloadGetPart(hash=5, offset=1 << 20, max_bytes=1 << 20),
    proto.OffloadPart(store_id=3, hash=5, size=2 << 20, offset=1 << 20, data=b"kv"),
    proto.OffloadResyncReply(store_id=3, tiers=[
        proto.TierSnapshot(tier="host", first_event_id=4, last_event_id=4),
        proto.TierSnapshot(tier="disk", first_event_id=7, last_event_id=9, blocks=40000)]),
    # planner (proto/planner.py)
    proto.PlannerTargets(pools={"decode": 3, "prefill": 1}, reason="kv 0.91 > 0.80", ts_ms=5,
                         decision_id=2, policy="load", ready={"decode": 2}, inputs={"kv": 0.91}),
    proto.FrontendStats(frontend_id=7, ts_ms=10, window_ms=1000, arrivals=4, prompt_tokens=900,
                        cached_tokens=300, output_tokens=64, finished=2, ttft_ms=[80.5, 120.0],
                        itl_ms=[12.5]),
    proto.WorkerStepStats(worker_id=9, ts_ms=3, samples=[
        proto.StepSample(prefill_tokens=512, decode_seqs=3, kv_usage=0.25, ms=31.5)]),
    # the sampling fields of issue 16, and a frame carrying log-probabilities
    proto.GenerateRequest(
        request_id="r-2", model="tiny", token_ids=proto.pack_tokens([1]),
        sampling=proto.SamplingParams(presence_penalty=-0.5, frequency_penalty=2.0,
                                      repetition_penalty=1.2, logit_bias={"7": -100.0, "70000": 2.5},
                                      logprobs=3),
        stop=proto.StopConditions(max_tokens=8, min_tokens=2),
    ),
    proto.StreamChunk(seq=2, token_ids=proto.pack_tokens([5, 6]), logprobs=proto.TokenLogprobs.pack(
        [-0.25, -1.5], [[5, 9], [6, 1]], [[-0.25, -2.0], [-1.5, -1.75]], top_k=2)),
    # disaggregation: a decode worker's remote-prefill request and the prefill worker's reply
    proto.RemotePrefillRequest(
        request=proto.GenerateRequest(request_id="r-3", model="tiny",
                                      token_ids=proto.pack_tokens(range(40)),
                                      stop=proto.StopConditions(max_tokens=9)),
        target=proto.KvTransferTarget(
            transfer_id="ab12", worker_id=9, subject="genset.default.kvxfer.rx.9.ab12",
            window_bytes=1 << 20, first_block=1,
            tcp=proto.TcpEndpoint(host="127.0.0.1", port=4000, token="t0k"),
            layout=proto.KvLayout(engine="torch", format="genset-kv/1", dtype="float32",
                                  block_shape=[2, 2, 16, 2, 8], bytes_per_block=4200),
            deadline_ms=1_800_000_000_000),
        first_block=1),
    proto.RemotePrefillReply(request_id="r-3", transfer_id="ab12",
                             first_token_ids=proto.pack_tokens([77]), prompt_tokens=40,
                             cached_tokens=16, blocks=1),
]


def test_every_message_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(proto.MESSAGES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert decode(encode(message), type(message)) == message


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_plain_msgpack_reads_the_documented_map(message):
    plain = msgpack.unpackb(encode(message), raw=False)
    assert isinstance(plain, dict)
    assert plain["v"] == proto.PROTOCOL_MAJOR
    # every field of the Struct is present under its own name, with msgpack-native values
    assert set(plain) == set(type(message).__struct_fields__)
    assert plain == msgspec.to_builtins(message, builtin_types=(bytes,))


def test_token_ids_are_packed_int32_little_endian():
    plain = msgpack.unpackb(encode(SAMPLES[0]), raw=False)
    assert plain["token_ids"] == (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + (3).to_bytes(4, "little") + (70000).to_bytes(4, "little")
    assert proto.unpack_tokens(plain["token_ids"]) == [1, 2, 3, 70000]
    with pytest.raises(ValueError, match="multiple of 4"):
        proto.unpack_tokens(b"\x01\x02\x03")


def test_kv_events_are_tagged_maps():
    plain = msgpack.unpackb(encode(SAMPLES[6]), raw=False)
    assert [e["type"] for e in plain["events"]] == ["stored", "stored", "removed", "cleared"]
    assert plain["events"][0]["blocks"][0]["hash"] == 2**64 - 1


def test_a_foreign_encoder_is_understood():
    """What a Go or Rust client would send: a plain map, fields in any order."""
    raw = msgpack.packb({"model": "tiny", "request_id": "x", "v": 1, "token_ids": b"\x01\x00\x00\x00",
                         "stop": {"max_tokens": 3}})
    req = decode(raw, proto.GenerateRequest)
    assert proto.unpack_tokens(req.token_ids) == [1] and req.stop.max_tokens == 3
    assert req.sampling == proto.SamplingParams()


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"v": 1, "request_id": "x", "model": "m", "token_ids": "not bytes"}, "$.token_ids"),
        ({"v": 1, "request_id": "x", "model": 5, "token_ids": b""}, "$.model"),
        ({"v": 1, "request_id": "x", "model": "m", "token_ids": b"", "sampling": {"temperature": -1}}, "temperature"),
        ({"v": 1, "request_id": "x", "model": "m", "token_ids": b"", "stop": {"max_tokens": 0}}, "max_tokens"),
        ({"v": 1, "model": "m", "token_ids": b""}, "request_id"),
    ],
)
def test_malformed_message_names_the_bad_field(payload, field):
    with pytest.raises(ProtocolError) as info:
        decode(msgpack.packb(payload), proto.GenerateRequest)
    assert field in str(info.value)
    assert "GenerateRequest" in str(info.value)


def test_bad_kv_event_names_the_path():
    raw = msgpack.packb({"v": 1, "worker_id": 1, "event_id": 1, "events": [{"type": "stored", "blocks": [{"hash": "x"}]}]})
    with pytest.raises(ProtocolError, match=r"\$\.events\[0\]\.blocks\[0\]\.hash"):
        decode(raw, proto.KvEventBatch)
    with pytest.raises(ProtocolError, match="type"):
        decode(msgpack.packb({"v": 1, "worker_id": 1, "event_id": 1, "events": [{"type": "exploded"}]}), proto.KvEventBatch)


def test_not_msgpack_is_a_clear_error():
    with pytest.raises(ProtocolError, match="not msgpack"):
        decode(b"\xc1\xc1", proto.StreamChunk)


def test_unknown_fields_are_ignored():
    raw = msgpack.packb({"v": 1, "seq": 1, "added_in_1_9": {"x": 1}, "token_ids": b""})
    assert decode(raw, proto.StreamChunk).seq == 1


def test_unknown_major_version_is_refused():
    raw = msgpack.packb({"v": 2, "seq": 1})
    with pytest.raises(ProtocolError, match="unsupported protocol major version 2"):
        decode(raw, proto.StreamChunk)
    with pytest.raises(ProtocolError, match="version"):
        decode(msgpack.packb({"v": 99, "stream_id": "s"}), proto.Cancel)


def test_json_schema_covers_every_message():
    doc = schema()
    assert set(doc["messages"]) == {m.__name__ for m in (*proto.MESSAGES,
                                                         *proto.TRANSFER_MESSAGES)}
    assert "KvTransferChunk" in doc["messages"]  # the transfer's, not only the bus's
    json.dumps(doc)  # serialisable
    req = doc["$defs"]["GenerateRequest"]
    assert {"request_id", "model", "token_ids"} <= set(req["required"])
    defs = doc["$defs"]
    assert defs["ModelCard"]["properties"]["role"]["enum"] == ["both", "decode", "prefill"]
    assert defs["RequestLifecycle"]["properties"]["phase"]["enum"] == ["done", "first_token"]
    reason = defs["StreamChunk"]["properties"]["finish_reason"]["anyOf"]
    assert {"enum": ["cancelled", "error", "length", "stop"]} in reason


@pytest.mark.parametrize(("message_type", "fields", "path"), [
    (proto.ModelCard, {"model": "m", "instance_id": 1, "role": "router"}, "$.role"),
    (proto.RequestLifecycle, {"request_id": "r", "worker_id": 1, "phase": "prefill_done"}, "$.phase"),
    (proto.StreamChunk, {"seq": 3, "final": True, "finish_reason": "timeout"}, "$.finish_reason"),
    (proto.ModelCard, {"model": "m", "instance_id": 1, "role": 1}, "$.role"),
])
def test_unknown_typed_value_is_a_protocol_error_naming_the_field(message_type, fields, path):
    raw = msgpack.packb({"v": 1, **fields})
    with pytest.raises(ProtocolError) as exc:
        decode(raw, message_type)
    assert str(exc.value).startswith(f"invalid {message_type.__name__}: ")
    assert str(exc.value).endswith(f"- at `{path}`")


def test_typed_values_accept_every_listed_value_and_todays_defaults():
    for role in proto.ROLES:
        card = proto.ModelCard(model="m", instance_id=1, role=role)
        assert decode(encode(card), proto.ModelCard).role == role
    # a card written before roles were typed (no role, or today's "decode") still decodes
    assert decode(msgpack.packb({"v": 1, "model": "m", "instance_id": 1}), proto.ModelCard).role \
        == proto.ROLE_DECODE
    for phase in proto.PHASES:
        msg = proto.RequestLifecycle(request_id="r", worker_id=1, phase=phase)
        assert decode(encode(msg), proto.RequestLifecycle).phase == phase
    for reason in (*proto.FINISH_REASONS, None):
        chunk = proto.StreamChunk(seq=0, final=True, finish_reason=reason)
        assert decode(encode(chunk), proto.StreamChunk).finish_reason == reason
    assert proto.ROLES == ("decode", "prefill", "both")
    assert proto.PHASES == ("first_token", "done")
    assert proto.FINISH_REASONS == ("stop", "length", "cancelled", "error")


def test_subjects_and_keys():
    assert subjects.worker_generate("prod", "decode", 255) == "genset.prod.decode.generate.ff"
    assert subjects.kv_events_all("prod") == "genset.prod.kv.events.>"
    with pytest.raises(ValueError, match="not a valid subject token"):
        subjects.route("bad.namespace")
    assert keys.instance("prod", "decode", 255) == "genset/prod/instances/decode/ff"
    key = keys.model("prod", "org/model-7b", 1)
    assert key == "genset/prod/models/org%2Fmodel-7b/1"
    assert keys.model_name_from_key(key, "prod") == "org/model-7b"
    with pytest.raises(ValueError):
        keys.instances_prefix("a/b")


def test_sampling_defaults_change_nothing_and_old_senders_decode():
    s = proto.SamplingParams()
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.0, 0.0, 1.0)
    assert s.logit_bias == {} and s.logprobs is None and not s.processes_logits
    # a request from a sender that predates the fields
    raw = msgpack.packb({"v": 1, "request_id": "x", "model": "m", "token_ids": b"",
                         "sampling": {"temperature": 0.5}})
    assert decode(raw, proto.GenerateRequest).sampling == proto.SamplingParams(temperature=0.5)
    assert proto.SamplingParams(logit_bias={"1": 0.5}).processes_logits
    assert proto.SamplingParams(logit_bias={"12": -1.0, "0": 2}).logit_bias_ids() == {12: -1.0, 0: 2}
    assert proto.SamplingParams(repetition_penalty=1.1).processes_logits
    assert not proto.SamplingParams(logprobs=5).processes_logits  # logprobs alone: plain path


@pytest.mark.parametrize(("sampling", "field"), [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias"),
    ({"logit_bias": {"\u00b2": 1.0}}, "logit_bias"),
    ({"logit_bias": {"99999999999": 1.0}}, "logit_bias"),
    ({"logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {5: 1.0}}, "logit_bias"),  # keys are strings, as in OpenAI's JSON
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    # non-finite floats (msgpack carries them): every float field refuses NaN and +/-inf
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("-inf")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": float("inf")}, "top_p"),
    ({"presence_penalty": float("inf")}, "presence_penalty"),
    ({"frequency_penalty": float("-inf")}, "frequency_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"logit_bias": {"5": float("nan")}}, "logit_bias"),
    ({"logit_bias": {"5": float("-inf")}}, "logit_bias"),
])
def test_bad_sampling_field_is_named(sampling, field):
    raw = msgpack.packb({"v": 1, "request_id": "x", "model": "m", "token_ids": b"",
                         "sampling": sampling})
    with pytest.raises(ProtocolError) as info:
        decode(raw, proto.GenerateRequest)
    assert field in str(info.value)
    if all(isinstance(k, str) for k in sampling.get("logit_bias", {})):  # typed: msgspec's
        # the same check when a sender builds the struct (the frontend turns it into a 400)
        with pytest.raises(ValueError, match=f"^{field}"):
            proto.SamplingParams(**sampling)


def test_non_finite_temperature_message_names_the_field_and_the_value():
    with pytest.raises(ValueError) as info:
        proto.SamplingParams(temperature=float("nan"))
    assert str(info.value) == ("temperature must be a finite number >= 0, got nan - at "
                               "`$.temperature`")
    assert proto.SamplingParams(temperature=0.0).temperature == 0.0  # greedy stays allowed


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -1.0])
def test_client_request_timeout_must_be_finite(value):
    raw = msgpack.packb({"v": 1, "prompt": "x", "timeout_s": value})
    with pytest.raises(ProtocolError, match="timeout_s"):
        decode(raw, proto.ClientGenerateRequest)
    for ok in (None, 0.0, 2.5):
        assert proto.ClientGenerateRequest(prompt="x", timeout_s=ok).timeout_s == ok


def test_min_tokens_must_not_be_negative():
    raw = msgpack.packb({"v": 1, "request_id": "x", "model": "m", "token_ids": b"",
                         "stop": {"min_tokens": -1}})
    with pytest.raises(ProtocolError, match="min_tokens"):
        decode(raw, proto.GenerateRequest)


def test_for_choice_derives_distinct_seeds_and_keeps_choice_zero():
    s = proto.SamplingParams(temperature=0.7, seed=41, logprobs=1)
    assert s.for_choice(0) is s
    assert [s.for_choice(i).seed for i in range(1, 4)] == [42, 43, 44]
    assert s.for_choice(2).logprobs == 1 and s.for_choice(2).temperature == 0.7
    unseeded = proto.SamplingParams()
    assert unseeded.for_choice(3) is unseeded


def test_token_logprobs_pack_and_plain_msgpack_layout():
    lp = proto.TokenLogprobs.pack([-0.5, -3.0], [[4, 8], [9, 2]], [[-0.5, -1.0], [-2.0, -3.0]],
                                  top_k=2)
    assert lp.unpack() == ([-0.5, -3.0], [[4, 8], [9, 2]], [[-0.5, -1.0], [-2.0, -3.0]])
    plain = msgpack.unpackb(encode(proto.StreamChunk(seq=0, logprobs=lp)), raw=False)["logprobs"]
    # what a client in another language reads: little-endian float32 / int32, token-major
    import struct
    assert struct.unpack("<2f", plain["logprobs"]) == (-0.5, -3.0)
    assert struct.unpack("<4i", plain["top_ids"]) == (4, 8, 9, 2)
    assert plain["top_k"] == 2
    empty = proto.TokenLogprobs.pack([-1.0], [[]], [[]], top_k=0)
    assert empty.unpack() == ([-1.0], [[]], [[]])
    # a frame without logprobs has the field nil (old receivers ignore it)
    assert msgpack.unpackb(encode(proto.StreamChunk(seq=0)), raw=False)["logprobs"] is None


@pytest.mark.parametrize(("fields", "field"), [
    ({"logprobs": b"\x00\x00\x00"}, "logprobs"),
    ({"logprobs": b"\x00" * 8, "top_k": 2, "top_ids": b"\x00" * 12, "top_logprobs": b"\x00" * 16},
     "top_ids"),
    ({"logprobs": b"\x00" * 4, "top_k": 1, "top_ids": b"\x00" * 4}, "top_logprobs"),
    ({"logprobs": b"", "top_k": -1}, "top_k"),
])
def test_bad_token_logprobs_frame_is_refused(fields, field):
    raw = msgpack.packb({"v": 1, "seq": 0, "logprobs": fields})
    with pytest.raises(ProtocolError) as info:
        decode(raw, proto.StreamChunk)
    assert field in str(info.value)
