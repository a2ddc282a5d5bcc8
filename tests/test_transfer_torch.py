"""Real KV through the transfer: the tiny torch model's blocks exported by one engine, sent
over NATS chunks or TCP, imported into a second engine, block for block identical, and the
second engine continues the prompt exactly as the first would."""

from __future__ import annotations

import random
import uuid

import pytest

torch = pytest.importorskip("torch")

from genset.engines.torch import kvformat  # noqa: E402
from genset.engines.torch.engine import TorchEngine  # noqa: E402
from genset.engines.types import EngineRequest, KvBlockData, KvImport  # noqa: E402
from genset.kv.hashing import block_hashes  # noqa: E402
from genset.runtime.bus import Bus  # noqa: E402
from genset.transfer import KvTransferHub  # noqa: E402
from proto.generate import SamplingParams, StopConditions  # noqa: E402
from proto.transfer import KvLayout  # noqa: E402

BS = 8


def torch_layout(payload: bytes) -> KvLayout:
    """What a torch engine's block payloads are (phase 2: from the engine's card)."""
    header, _ = kvformat.read_header(payload)
    return KvLayout(engine="torch", format=header["format"], dtype=header["dtype"],
                    block_shape=header["shape"][1:], bytes_per_block=len(payload))


async def _generate(engine, rid, prompt, n):
    req = EngineRequest(rid, list(prompt), SamplingParams(temperature=0.0),
                        StopConditions(max_tokens=n, ignore_eos=True))
    tokens, last = [], None
    async for out in await engine.submit(req):
        tokens.extend(out.token_ids)
        last = out
    return tokens, last


@pytest.mark.parametrize("transport", ["nats", "tcp"])
async def test_torch_kv_export_transfer_import_is_identical(nats_server, transport):
    rng = random.Random(3)
    prompt = [rng.randrange(3, 4096) for _ in range(45)]  # 5 full blocks of 8 + 5 tokens
    hashes = block_hashes(prompt, BS)
    prefill = TorchEngine("tiny", num_blocks=32, block_size=BS)
    decode = TorchEngine("tiny", num_blocks=32, block_size=BS)
    buses = [await Bus.connect(nats_server.url, name=f"t-{uuid.uuid4().hex[:6]}")
             for _ in range(2)]
    rx_hub = KvTransferHub(buses[0], 1)
    tx_hub = KvTransferHub(buses[1], 2)
    try:
        # import_kv is a command run by the engine's stepping thread: before start() nothing
        # runs it (the receiver's deadline would be what ends such a wait)
        await decode.start()
        expected, _ = await _generate(prefill, "ref", prompt, 6)  # also fills its cache
        exported = await prefill.export_kv(hashes)
        assert [b.hash for b in exported] == hashes
        layout = torch_layout(exported[0].data)
        assert prefill.card.kv_layout == layout == decode.card.kv_layout  # the card says it

        async def source(first, count):  # read from the engine window by window
            blocks = await prefill.export_kv(hashes[first : first + count])
            return [b.data for b in blocks]

        imported = []

        async def importer(run):
            kv = KvImport([KvBlockData(h, bytes(p)) for h, p in zip(run.hashes, run.payloads,
                                                                     strict=True)],
                          parent_hash=run.parent_hash)
            assert await decode.import_kv(kv) == len(run.hashes)
            imported.extend(run.hashes)

        rx = await rx_hub.open_receive("req", on_blocks=importer, expected_hashes=hashes,
                                       layout=layout, window_bytes=2 * layout.bytes_per_block)
        result = await tx_hub.send(rx.target, request_id="req", hashes=hashes, block_size=BS,
                                   layout=layout, source=source, transport=transport)
        await rx.wait()
        assert result.transport == transport and result.chunks >= 2  # several chunks, pipelined
        assert imported == hashes
        again = await decode.export_kv(hashes)
        assert [b.hash for b in again] == hashes
        assert [b.data for b in again] == [b.data for b in exported]  # byte-identical blocks

        before = decode.runner.tokens_computed
        tokens, out = await _generate(decode, "cont", prompt, 6)
        assert out.cached_tokens == 5 * BS
        assert decode.runner.tokens_computed - before == 5 + 5  # the tail, then decodes
        assert tokens == expected
    finally:
        await rx_hub.close()
        await tx_hub.close()
        for b in buses:
            await b.close()
        await prefill.stop()
        await decode.stop()
