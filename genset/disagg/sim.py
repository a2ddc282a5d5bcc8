"""Disaggregation in simulation: what a mocker worker does in each role, and how long a KV
transfer takes when no real KV exists.

The mocker has no tensors, so a transfer between mockers moves hashes only; its time is
modelled instead, from the same two knobs as Dynamo's mocker: `--kv-bytes-per-token` (bytes
of KV one token occupies, all layers, K and V) and `--kv-transfer-bandwidth` (GB/s, 1 GB =
1e9 bytes; 0 turns the delay off). Full blocks travel on the link, so the modelled bytes are
full blocks x block_size x kv_bytes_per_token; the trailing partial block rides with the
first token (`KvImport.tail`: one block at most, not modelled on the link). Which blocks count is `timing_mode`: `missing` (default: the blocks the
decode worker does not already hold, what a real transfer moves) or `full_prompt` (every full
block of the prompt, Dynamo's simpler default).

Roles (the worker's `--role`; the same words as the model card): `both` serves requests
aggregated (today's worker: it neither asks for nor serves remote prefills); `prefill` only
prefills for decode workers: a request runs to its first token (max_tokens 1) and its blocks
stay cached (pinned by the sender) until the transfer is acked; `decode` serves requests and
never prefills for others, but prefills locally whenever the decision (genset.disagg.decision)
says so or no prefill worker is there.

Pure: no I/O, no clock; live workers and `genset replay` call the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9

ROLES = ("both", "prefill", "decode")
TIMING_MISSING = "missing"
TIMING_FULL_PROMPT = "full_prompt"
TIMING_MODES = (TIMING_MISSING, TIMING_FULL_PROMPT)


@dataclass(frozen=True, slots=True)
class RoleBehaviour:
    """What a worker in one role does (the mocker's and the worker host's switches)."""

    serves_requests: bool  # takes generate requests from the router
    serves_prefill: bool  # takes remote-prefill requests and exports KV
    may_request_remote_prefill: bool  # may send its requests' prefill elsewhere
    max_tokens_override: int | None  # forced max_tokens for requests it runs


_BEHAVIOUR = {
    "both": RoleBehaviour(True, False, False, None),
    "prefill": RoleBehaviour(False, True, False, 1),
    "decode": RoleBehaviour(True, False, True, None),
}


def role_behaviour(role: str) -> RoleBehaviour:
    try:
        return _BEHAVIOUR[role]
    except KeyError:
        raise ValueError(f"--role must be one of {', '.join(ROLES)}, got {role!r}") from None


def transfer_ms(num_tokens: int, kv_bytes_per_token: float, bandwidth_gb_s: float,
                speedup_ratio: float = 1.0) -> float:
    """Modelled time to move the KV of `num_tokens` tokens; 0 when bandwidth is 0 (off)."""
    if num_tokens <= 0 or bandwidth_gb_s <= 0 or kv_bytes_per_token <= 0:
        return 0.0
    return num_tokens * kv_bytes_per_token / (bandwidth_gb_s * GB) * 1e3 / speedup_ratio


def transfer_blocks(prompt_tokens: int, block_size: int, decode_cached_blocks: int = 0,
                    mode: str = TIMING_MISSING) -> int:
    """Full blocks a remote prefill ships for this prompt."""
    full = prompt_tokens // block_size
    if mode == TIMING_FULL_PROMPT:
        return full
    if mode == TIMING_MISSING:
        return max(0, full - decode_cached_blocks)
    raise ValueError(f"timing mode must be one of {', '.join(TIMING_MODES)}, got {mode!r}")


@dataclass(frozen=True, slots=True)
class DisaggSimConfig:
    """A mocker worker's disaggregation knobs (CLI: --role, --kv-bytes-per-token,
    --kv-transfer-bandwidth, --kv-transfer-timing)."""

    role: str = "both"
    kv_bytes_per_token: int = 0
    kv_transfer_bandwidth_gb_s: float = 0.0
    timing_mode: str = TIMING_MISSING
    speedup_ratio: float = 1.0

    def __post_init__(self) -> None:
        role_behaviour(self.role)
        if self.kv_bytes_per_token < 0:
            raise ValueError(
                f"--kv-bytes-per-token must be >= 0, got {self.kv_bytes_per_token}")
        if self.kv_transfer_bandwidth_gb_s < 0:
            raise ValueError(f"--kv-transfer-bandwidth must be >= 0 GB/s (0: no delay), got "
                             f"{self.kv_transfer_bandwidth_gb_s}")
        if self.timing_mode not in TIMING_MODES:
            raise ValueError(f"--kv-transfer-timing must be one of {', '.join(TIMING_MODES)}, "
                             f"got {self.timing_mode!r}")
        if self.speedup_ratio <= 0:
            raise ValueError(f"speedup_ratio must be > 0, got {self.speedup_ratio}")

    @property
    def behaviour(self) -> RoleBehaviour:
        return role_behaviour(self.role)

    def block_bytes(self, block_size: int) -> int:
        """Bytes one block would hold (for a live mocker that sends dummy payloads of the
        real size, to load the transport as a real model would)."""
        return self.kv_bytes_per_token * block_size

    def transfer_ms(self, prompt_tokens: int, block_size: int,
                    decode_cached_blocks: int = 0) -> float:
        """Modelled time for a remote prefill's KV to reach the decode worker."""
        blocks = transfer_blocks(prompt_tokens, block_size, decode_cached_blocks,
                                 self.timing_mode)
        return transfer_ms(blocks * block_size, self.kv_bytes_per_token,
                           self.kv_transfer_bandwidth_gb_s, self.speedup_ratio)

    def kv_ready_at_ms(self, prefill_done_ms: float, prompt_tokens: int, block_size: int,
                       decode_cached_blocks: int = 0) -> float:
        """When (simulated ms) the decode worker may start on a request whose remote prefill
        finished at `prefill_done_ms`."""
        return prefill_done_ms + self.transfer_ms(prompt_tokens, block_size,
                                                  decode_cached_blocks)

    def bandwidth_bytes_per_s(self) -> float | None:
        """The bandwidth for the cost model's prior (None when transfers are modelled as
        free: use the measured one)."""
        bw = self.kv_transfer_bandwidth_gb_s
        return bw * GB * self.speedup_ratio if bw > 0 else None
