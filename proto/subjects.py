"""Every NATS subject genset uses: `genset.<namespace>.<component>.<endpoint>[.<instance>]`.

Build subjects only with these functions. Instance ids appear as lowercase hex.
"""

from __future__ import annotations

import re

ROOT = "genset"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _tok(value: str, what: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} is not a valid subject token (letters, digits, _ and -)")
    return value


def instance_token(instance_id: int) -> str:
    return f"{instance_id:x}"


def subject(namespace: str, component: str, endpoint: str, instance_id: int | None = None) -> str:
    base = f"{ROOT}.{_tok(namespace, 'namespace')}.{_tok(component, 'component')}.{_tok(endpoint, 'endpoint')}"
    return base if instance_id is None else f"{base}.{instance_token(instance_id)}"


def worker_generate(namespace: str, component: str, instance_id: int) -> str:
    """Generate requests for one worker instance (the router picked it)."""
    return subject(namespace, component, "generate", instance_id)


def kv_events(namespace: str, worker_id: int) -> str:
    return subject(namespace, "kv", "events", worker_id)


def kv_events_all(namespace: str) -> str:
    return subject(namespace, "kv", "events") + ".>"


def kv_resync(namespace: str, worker_id: int) -> str:
    return subject(namespace, "kv", "resync", worker_id)


def load_report(namespace: str, worker_id: int) -> str:
    return subject(namespace, "load", "report", worker_id)


def load_report_all(namespace: str) -> str:
    return subject(namespace, "load", "report") + ".>"


def route(namespace: str) -> str:
    """Route requests; router replicas answer in one queue group."""
    return subject(namespace, "router", "route")


def route_decisions(namespace: str) -> str:
    """Decisions broadcast between router replicas."""
    return subject(namespace, "router", "decisions")


def request_lifecycle(namespace: str) -> str:
    return subject(namespace, "router", "lifecycle")


def frontend_generate(namespace: str) -> str:
    """The frontend's generate service for NATS-native clients (queue group)."""
    return subject(namespace, "frontend", "generate")


def stream_cancel(namespace: str) -> str:
    return subject(namespace, "stream", "cancel")


# ---- KV offload store (issue 12) ---------------------------------------------------------------
# Each store instance serves its own hash range (clients place blocks by rendezvous hashing over
# the live instances), so every endpoint is per instance.

OFFLOAD_COMPONENT = "kv_offload"


def offload_put(namespace: str, store_id: int) -> str:
    """`OffloadPut` -> `OffloadPutReply` (write-behind of evicted blocks)."""
    return subject(namespace, OFFLOAD_COMPONENT, "put", store_id)


def offload_put_part(namespace: str, store_id: int, sender_id: int) -> str:
    """`OffloadPutPart` -> `OffloadPutReply` (a part of a block larger than a message), from
    worker `sender_id`. The sender is a subject token, not only a field of the message: the
    store keeps per-sender state for blocks in parts (buffers, bounded per sender), and a
    secured stack lets a worker publish here only under its own id, so the server vouches
    for it (`genset.runtime.auth`)."""
    return f"{subject(namespace, OFFLOAD_COMPONENT, 'putpart', store_id)}.{instance_token(sender_id)}"


def offload_put_part_all(namespace: str, store_id: int) -> str:
    """Every sender's parts for one store instance (the store's one subscription)."""
    return subject(namespace, OFFLOAD_COMPONENT, "putpart", store_id) + ".*"


def sender_token(subject_: str) -> int | None:
    """The instance id in a subject's last token (`offload_put_part`'s sender), or None when
    it is not one as `instance_token` writes it (lowercase hex, no sign, no leading zero)."""
    tok = subject_.rpartition(".")[2]
    if not tok or len(tok) > 16 or tok.strip("0123456789abcdef"):
        return None
    value = int(tok, 16)
    return value if instance_token(value) == tok else None


def offload_get_part(namespace: str, store_id: int) -> str:
    """`OffloadGetPart` -> `OffloadPart` (a part of a held block larger than a message)."""
    return subject(namespace, OFFLOAD_COMPONENT, "getpart", store_id)


def offload_lookup(namespace: str, store_id: int) -> str:
    """`OffloadLookup` -> `OffloadLookupReply` (onboarding: a run of blocks with their data)."""
    return subject(namespace, OFFLOAD_COMPONENT, "lookup", store_id)


def offload_resync(namespace: str, store_id: int) -> str:
    """`KvResyncRequest` -> `OffloadResyncReply`; the snapshot goes out on the events subject."""
    return subject(namespace, OFFLOAD_COMPONENT, "resync", store_id)


def offload_events(namespace: str, store_id: int) -> str:
    """The store's `KvEventBatch`es, one sequence per tier (`host`, `disk`)."""
    return subject(namespace, OFFLOAD_COMPONENT, "events", store_id)


def offload_events_all(namespace: str) -> str:
    return subject(namespace, OFFLOAD_COMPONENT, "events") + ".>"


# ---- planner inputs (additive; see proto/planner.py) ----


def frontend_stats(namespace: str) -> str:
    """Each frontend's periodic `FrontendStats` (arrivals, lengths, TTFT/ITL samples)."""
    return subject(namespace, "frontend", "stats")


def step_stats(namespace: str, worker_id: int) -> str:
    """A worker's `WorkerStepStats` (samples of its engine steps, for performance models)."""
    return subject(namespace, "worker", "steps", worker_id)


def step_stats_all(namespace: str) -> str:
    return subject(namespace, "worker", "steps") + ".>"


# -- KV transfer (proto.transfer) ----------------------------------------------------------------


def kv_transfer_rx(namespace: str, worker_id: int, transfer_id: str) -> str:
    """Where a receiving worker takes the header and chunks of one transfer."""
    return f"{subject(namespace, 'kvxfer', 'rx', worker_id)}.{_tok(transfer_id, 'transfer id')}"


def kv_transfer_rx_all(namespace: str, worker_id: int) -> str:
    """Every transfer a worker receives (its one subscription)."""
    return subject(namespace, "kvxfer", "rx", worker_id) + ".*"


def kv_transfer_tx(namespace: str, worker_id: int, transfer_id: str) -> str:
    """Where a sending worker takes the credits and the ack of one transfer."""
    return f"{subject(namespace, 'kvxfer', 'tx', worker_id)}.{_tok(transfer_id, 'transfer id')}"


def kv_transfer_tx_all(namespace: str, worker_id: int) -> str:
    return subject(namespace, "kvxfer", "tx", worker_id) + ".*"


def remote_prefill(namespace: str, worker_id: int) -> str:
    """Remote-prefill requests (`proto.transfer.RemotePrefillRequest`) to one prefill worker."""
    return subject(namespace, "prefill", "remote", worker_id)


def prefill_kv_hashes(namespace: str, worker_id: int) -> str:
    """A prefill worker's KV event batches again, block hashes only (no token ids): what
    decode workers follow to price its cached prefixes without reading anyone's prompts."""
    return subject(namespace, "prefill", "kvhashes", worker_id)


def prefill_kv_hashes_all(namespace: str) -> str:
    return subject(namespace, "prefill", "kvhashes") + ".*"
