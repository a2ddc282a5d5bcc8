"""Closed sets of wire values: a worker's role, a request's lifecycle phase, a stream's finish
reason.

Each is a `Literal` used as the field's type in the Structs, so msgspec's decoder refuses any
other value itself (`proto.decode` raises ProtocolError naming the field, e.g. `invalid
ModelCard: Invalid enum value 'x' - at `$.role``), and the JSON Schema lists the values as an
`enum`. Code compares and builds these values through the constants below, never through
string literals, so a typo is a NameError instead of a silent mismatch.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

# What a worker does (ModelCard.role; also the component name in its subjects and etcd keys).
# decode: serves generate requests, prefill included (today's aggregated workers register so);
# prefill: prefill only, its KV goes to a decode worker; both: aggregated prefill + decode.
Role = Literal["decode", "prefill", "both"]
ROLE_DECODE: Final = "decode"
ROLE_PREFILL: Final = "prefill"
ROLE_BOTH: Final = "both"
ROLES: tuple[str, ...] = get_args(Role)

# Progress of a routed request (RequestLifecycle.phase), published by its worker.
# first_token: prefill done; done: finished, cancelled or failed.
Phase = Literal["first_token", "done"]
PHASE_FIRST_TOKEN: Final = "first_token"
PHASE_DONE: Final = "done"
PHASES: tuple[str, ...] = get_args(Phase)

# Why a token stream ended (StreamChunk.finish_reason on the final frame).
# stop: an end-of-sequence or stop token; length: max_tokens or the context length;
# cancelled: the requester cancelled (or the worker shut down); error: see StreamChunk.error.
FinishReason = Literal["stop", "length", "cancelled", "error"]
FINISH_STOP: Final = "stop"
FINISH_LENGTH: Final = "length"
FINISH_CANCELLED: Final = "cancelled"
FINISH_ERROR: Final = "error"
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)
