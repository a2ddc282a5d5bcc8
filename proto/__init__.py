"""genset's wire contract. Depends on nothing but msgspec."""

from proto.client import ChatMessage, ClientDelta, ClientGenerateRequest
from proto.codec import ProtocolError, decode, encode
from proto.discovery import InstanceRecord, ModelCard
from proto.generate import (
    Cancel,
    ErrorInfo,
    GenerateRequest,
    SamplingParams,
    StopConditions,
    StreamChunk,
    TokenLogprobs,
    Usage,
)
from proto.kv import (
    Cleared,
    KvEvent,
    KvEventBatch,
    KvResyncRequest,
    LoadReport,
    Removed,
    Stored,
    StoredBlock,
)
from proto.offload import (
    OFFLOAD_MESSAGES,
    OffloadBlock,
    OffloadBlockRef,
    OffloadGetPart,
    OffloadLookup,
    OffloadLookupReply,
    OffloadPart,
    OffloadPut,
    OffloadPutPart,
    OffloadPutReply,
    OffloadResyncReply,
    TierSnapshot,
)
from proto.routing import RequestLifecycle, RouteDecision, RouteRequest
from proto.tokens import pack_tokens, unpack_tokens
from proto.values import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_REASONS,
    FINISH_STOP,
    PHASE_DONE,
    PHASE_FIRST_TOKEN,
    PHASES,
    ROLE_BOTH,
    ROLE_DECODE,
    ROLE_PREFILL,
    ROLES,
    FinishReason,
    Phase,
    Role,
)
from proto.version import PROTOCOL_MAJOR, PROTOCOL_MINOR, PROTOCOL_VERSION

# Every top-level message type, in documentation order.
MESSAGES = (
    GenerateRequest,
    StreamChunk,
    Cancel,
    KvEventBatch,
    KvResyncRequest,
    LoadReport,
    InstanceRecord,
    ModelCard,
    RouteRequest,
    RouteDecision,
    RequestLifecycle,
    ClientGenerateRequest,
    *OFFLOAD_MESSAGES,
)

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_ERROR",
    "FINISH_LENGTH",
    "FINISH_REASONS",
    "FINISH_STOP",
    "MESSAGES",
    "PHASES",
    "PHASE_DONE",
    "PHASE_FIRST_TOKEN",
    "PROTOCOL_MAJOR",
    "PROTOCOL_MINOR",
    "PROTOCOL_VERSION",
    "ROLES",
    "ROLE_BOTH",
    "ROLE_DECODE",
    "ROLE_PREFILL",
    "Cancel",
    "ChatMessage",
    "Cleared",
    "ClientDelta",
    "ClientGenerateRequest",
    "ErrorInfo",
    "FinishReason",
    "GenerateRequest",
    "InstanceRecord",
    "KvEvent",
    "KvEventBatch",
    "KvResyncRequest",
    "LoadReport",
    "ModelCard",
    "OffloadBlock",
    "OffloadBlockRef",
    "OffloadGetPart",
    "OffloadLookup",
    "OffloadLookupReply",
    "OffloadPart",
    "OffloadPut",
    "OffloadPutPart",
    "OffloadPutReply",
    "OffloadResyncReply",
    "Phase",
    "ProtocolError",
    "Removed",
    "RequestLifecycle",
    "Role",
    "RouteDecision",
    "RouteRequest",
    "SamplingParams",
    "StopConditions",
    "Stored",
    "StoredBlock",
    "StreamChunk",
    "TierSnapshot",
    "TokenLogprobs",
    "Usage",
    "decode",
    "encode",
    "pack_tokens",
    "unpack_tokens",
]

# ---- planner messages (additive; proto/planner.py) ----
from proto.planner import (  # noqa: E402
    FrontendStats,
    PlannerTargets,
    StepSample,
    WorkerStepStats,
)

MESSAGES = (*MESSAGES, PlannerTargets, FrontendStats, WorkerStepStats)
__all__ += ["FrontendStats", "PlannerTargets", "StepSample", "WorkerStepStats"]
# KV transfer between workers (proto.transfer). Kept apart from MESSAGES for now (the wire
# contract's sample test lists MESSAGES; the transfer messages have their own test):
# TRANSFER_MESSAGES names them for docs and schema.
from proto.transfer import (  # noqa: E402
    REMOTE_PREFILL_MESSAGES,
    TRANSFER_MESSAGES,
    KvLayout,
    KvTransferAbort,
    KvTransferAck,
    KvTransferChunk,
    KvTransferCredit,
    KvTransferHeader,
    KvTransferMessage,
    KvTransferTarget,
    RemotePrefillReply,
    RemotePrefillRequest,
    TcpEndpoint,
)

# Disaggregation: a decode worker asks a prefill worker for a prompt's first token and KV.
MESSAGES = (*MESSAGES, *REMOTE_PREFILL_MESSAGES)

__all__ += [
    "TRANSFER_MESSAGES",
    "KvLayout",
    "KvTransferAbort",
    "KvTransferAck",
    "KvTransferChunk",
    "KvTransferCredit",
    "KvTransferHeader",
    "KvTransferMessage",
    "KvTransferTarget",
    "RemotePrefillReply",
    "RemotePrefillRequest",
    "TcpEndpoint",
]
