"""Decode workers' KV TCP endpoints as they publish them, for the prefill workers that send
them KV (prefill side of genset.disagg.worker).

A `RemotePrefillRequest`'s target names a TCP endpoint (host, port, token) where the prefill
worker connects and writes the KV. Taken as it comes, anyone who can publish a remote-prefill
request could make a prefill worker open a connection anywhere and write a frame there
(SSRF). So a decode worker publishes its endpoint in its own `InstanceRecord`
(`labels["kv_tcp"] = "host:port"`, the address its receives offer; in a secured deployment
only that worker may write its record), and a prefill worker connects over TCP only when a
target's endpoint is exactly the one the record of `target.worker_id` names. Any other
target's KV goes over NATS, to the named worker's own receive subject (which
`KvTransferHub.check_target` holds it to): a record not seen yet (the watch lags a worker
that just started) costs that transfer TCP, never the request.
"""

from __future__ import annotations

import contextlib

import structlog

import proto
from genset.worker.roles import ROLE_DECODE
from proto import keys
from proto.transfer import KvTransferTarget

log = structlog.get_logger("genset.disagg")

# The InstanceRecord label a decode worker publishes its KV TCP endpoint in.
KV_TCP_LABEL = "kv_tcp"


def tcp_address(host: str, port: int) -> str:
    """An endpoint as the label writes it (compared as a string, never parsed)."""
    return f"{host}:{port}"


def endpoint_labels(listener) -> dict[str, str]:
    """The InstanceRecord labels that publish a decode worker's endpoint: its KV transfer
    hub's `TcpListener` (started; its advertised address and bound port), or None (NATS
    only: no label)."""
    if listener is None:
        return {}
    return {KV_TCP_LABEL: tcp_address(listener.advertise_host, listener.port)}


class DecodeEndpoints:
    """The decode workers' published KV TCP endpoints in one namespace (a watch of their
    InstanceRecords)."""

    def __init__(self, *, discovery, namespace: str) -> None:
        self.discovery = discovery
        self.ns = namespace
        self._records = None

    async def start(self) -> None:
        prefix = keys.instances_prefix(self.ns, ROLE_DECODE)
        try:
            self._records = await self.discovery.watch(prefix, proto.InstanceRecord)
        except Exception as exc:  # etcd away: start empty (every KV goes over NATS until then)
            log.warning("etcd not answering; no decode worker's KV endpoint known yet",
                        error=repr(exc))
            self._records = await self.discovery.watch(prefix, proto.InstanceRecord,
                                                       require_initial=False)

    async def close(self) -> None:
        records, self._records = self._records, None
        if records is not None:
            with contextlib.suppress(Exception):
                await records.close()

    def published(self, worker_id: int) -> str | None:
        """The endpoint decode worker `worker_id` publishes ("host:port"), or None."""
        if self._records is None:
            return None
        record = self._records.items.get(keys.instance(self.ns, ROLE_DECODE, worker_id))
        if not isinstance(record, proto.InstanceRecord) or record.instance_id != worker_id:
            return None
        return record.labels.get(KV_TCP_LABEL) or None

    def trusted(self, target: KvTransferTarget) -> bool:
        """Whether `target`'s TCP endpoint (if any) is the one its worker publishes."""
        tcp = target.tcp
        if tcp is None:
            return True
        return self.published(target.worker_id) == tcp_address(tcp.host, tcp.port)
