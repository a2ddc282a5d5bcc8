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
from proto.routing import RequestLifecycle, RouteDecision, RouteRequest
from proto.tokens import pack_tokens, unpack_tokens
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
)

__all__ = [
    "MESSAGES",
    "PROTOCOL_MAJOR",
    "PROTOCOL_MINOR",
    "PROTOCOL_VERSION",
    "Cancel",
    "ChatMessage",
    "Cleared",
    "ClientDelta",
    "ClientGenerateRequest",
    "ErrorInfo",
    "GenerateRequest",
    "InstanceRecord",
    "KvEvent",
    "KvEventBatch",
    "KvResyncRequest",
    "LoadReport",
    "ModelCard",
    "ProtocolError",
    "Removed",
    "RequestLifecycle",
    "RouteDecision",
    "RouteRequest",
    "SamplingParams",
    "StopConditions",
    "Stored",
    "StoredBlock",
    "StreamChunk",
    "Usage",
    "decode",
    "encode",
    "pack_tokens",
    "unpack_tokens",
]

# KV transfer between workers (proto.transfer). Kept apart from MESSAGES for now (the wire
# contract's sample test lists MESSAGES; the transfer messages have their own test):
# TRANSFER_MESSAGES names them for docs and schema.
from proto.transfer import (  # noqa: E402
    TRANSFER_MESSAGES,
    KvLayout,
    KvTransferAbort,
    KvTransferAck,
    KvTransferChunk,
    KvTransferCredit,
    KvTransferHeader,
    KvTransferMessage,
    KvTransferTarget,
    TcpEndpoint,
)

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
    "TcpEndpoint",
]
