"""etcd discovery: this process's records under one lease, and watched views of prefixes.

Registration: `Discovery.connect` grants one lease per process; every `register`ed key is
put under it and remembered. A keepalive task refreshes the lease every TTL/3. When etcd is
unreachable the records are kept in memory; when it answers again they are re-asserted (a
conditional put, so records that survived cause no change), and if the lease expired in the
meantime a new one is granted and every record is put again.

Watching: `Membership` lists a prefix, then watches it from the listed revision + 1. After a
failure it reconnects with backoff and resumes from the last revision it applied, so no change
is missed or seen twice. If that revision was compacted away it re-lists and emits only the
difference (puts for new or changed keys, deletes for vanished ones). While etcd is away the
last known `items` stay as they are: losing etcd must not look like losing every worker.

Values are `proto` Structs (msgpack); a value that does not decode as `value_type` is logged
and the key is treated as absent, so one bad writer cannot crash a watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from genset.runtime.etcd_client import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
)
from proto.codec import ProtocolError, decode, encode

log = structlog.get_logger("genset.discovery")

Listener = Callable[[str, str, Any], None]


class DiscoveryError(Exception):
    """Discovery could not do what was asked (etcd unreachable at connect, bad config)."""


class ChangesOverflow(DiscoveryError):
    """A `Membership.changes()` consumer fell more than its queue size behind.

    The consumer should re-read `Membership.items` and start a new `changes()`.
    """


class _Backoff:
    def __init__(self, first: float = 0.1, cap: float = 2.0):
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.cap, self.delay * 2)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.delay = self.first


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return encode(value)


class Discovery:
    """One etcd connection, one lease, and the records this process keeps under it."""

    def __init__(self, client: EtcdClient, ttl: float, call_timeout: float,
                 watch_liveness_s: float = 5.0):
        self._client = client
        self.ttl = ttl
        self._ttl_s = max(2, math.ceil(ttl))  # etcd leases are whole seconds, 2 s minimum
        self._call_timeout = call_timeout
        self._watch_liveness_s = watch_liveness_s
        self.lease_id: int | None = None
        self._records: dict[str, bytes] = {}
        self._pending_deletes: set[str] = set()  # unregistered while etcd was away
        self._lock = asyncio.Lock()  # orders lease changes against register/unregister
        self._dirty = False  # some record may be missing in etcd: re-assert when reachable
        self._reachable = True
        self._keepalive_task: asyncio.Task | None = None
        self._memberships: set[Membership] = set()
        self._closed = False

    @classmethod
    async def connect(cls, endpoints: str | list[str] = "127.0.0.1:2379", *, ttl: float = 10.0,
                      user: str | None = None, password: str | None = None,
                      ca_cert: str | None = None, cert: str | None = None,
                      key: str | None = None, connect_timeout: float = 5.0,
                      call_timeout: float = 3.0, watch_liveness_s: float = 5.0) -> Discovery:
        """Connect and grant this process's lease; raises DiscoveryError if etcd does not
        answer within `connect_timeout` (a service must not start half-registered).

        call_timeout: deadline of every unary etcd call. watch_liveness_s: a watch silent
        this long asks etcd for progress and is reconnected if etcd stays silent as long
        again (this is how a hung, not dead, etcd is noticed)."""
        if ttl <= 0:
            raise DiscoveryError(f"lease ttl must be > 0, got {ttl}")
        try:
            client = EtcdClient(endpoints, timeout=call_timeout, user=user, password=password,
                                ca_cert=ca_cert, cert=cert, key=key)
        except (ValueError, OSError) as exc:
            raise DiscoveryError(f"bad etcd configuration: {exc}") from None
        self = cls(client, ttl, call_timeout, watch_liveness_s)
        deadline = time.monotonic() + connect_timeout
        backoff = _Backoff()
        while True:
            left = deadline - time.monotonic()
            try:
                self.lease_id = await client.lease_grant(
                    self._ttl_s, time_limit=max(0.1, min(call_timeout, left)))
                break
            except EtcdUnavailable as exc:
                if left <= 0:
                    await client.close()
                    raise DiscoveryError(
                        f"etcd at {endpoints} unreachable for {connect_timeout} s: {exc}"
                    ) from None
                await asyncio.sleep(min(backoff.next(), max(0.0, left)))
            except EtcdError as exc:
                await client.close()
                raise DiscoveryError(f"etcd at {endpoints} refused: {exc}") from None
        self._keepalive_task = asyncio.create_task(self._keepalive(), name="etcd-keepalive")
        log.debug("etcd lease granted", lease=self.lease_id, ttl=self._ttl_s,
                  endpoint=client.endpoint)
        return self

    @property
    def reachable(self) -> bool:
        """False while the keepalive cannot reach etcd."""
        return self._reachable

    @property
    def client(self) -> EtcdClient:
        return self._client

    # ---- records under the lease -------------------------------------------------------------
    async def register(self, key: str, value: Any) -> None:
        """Put `key` under this process's lease and remember it.

        If etcd is unreachable the record is kept and put as soon as etcd answers again (this
        call then returns without raising). Other etcd errors (e.g. permission) raise.
        """
        self._check_open()
        data = _to_bytes(value)
        async with self._lock:
            self._records[key] = data
            self._pending_deletes.discard(key)
            try:
                await self._client.put(key, data, lease=self.lease_id or 0)
            except EtcdUnavailable as exc:
                self._dirty = True
                log.warning("etcd unreachable; record will be registered when it returns",
                            key=key, error=str(exc))
            except EtcdError as exc:
                if "lease not found" not in str(exc):
                    raise
                try:  # expired before the keepalive noticed: a new lease, then every record
                    await self._regrant()
                except EtcdUnavailable:
                    self._dirty = True  # the keepalive finishes the job when etcd answers

    async def unregister(self, key: str) -> None:
        """Forget `key` and delete it from etcd (best effort if etcd is away: the key still
        vanishes when the lease ends)."""
        self._check_open()
        async with self._lock:
            self._records.pop(key, None)
            try:
                await self._client.delete(key)
            except EtcdUnavailable as exc:
                self._pending_deletes.add(key)
                self._dirty = True
                log.warning("etcd unreachable; record will be deleted when it returns",
                            key=key, error=str(exc))

    @property
    def records(self) -> dict[str, bytes]:
        """The records this process keeps registered (key -> encoded value)."""
        return dict(self._records)

    async def _keepalive(self) -> None:
        interval = self._ttl_s / 3
        retry = min(1.0, interval)
        delay = interval
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                remaining = await self._client.lease_keepalive(self.lease_id or 0,
                                                               time_limit=interval)
                async with self._lock:
                    if remaining <= 0:
                        await self._regrant()
                    elif self._dirty:
                        await self._reassert()
                if not self._reachable:
                    log.info("etcd reachable again; registrations restored",
                             records=len(self._records))
                self._reachable = True
                delay = interval
            except EtcdUnavailable as exc:
                if self._reachable:
                    log.warning("etcd unreachable; keeping records and retrying",
                                error=str(exc))
                self._reachable = False
                self._dirty = True
                delay = retry
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the keepalive die: the lease would expire
                log.error("etcd keepalive failed", error=repr(exc))
                self._dirty = True
                delay = retry

    async def _regrant(self) -> None:
        """The lease expired (etcd was away longer than the TTL): start over with a new one."""
        old = self.lease_id
        self.lease_id = await self._client.lease_grant(self._ttl_s)
        log.warning("etcd lease was lost; granted a new one and re-registering",
                    old_lease=old, lease=self.lease_id, records=len(self._records))
        self._dirty = True
        await self._reassert()

    async def _reassert(self) -> None:
        for key in list(self._pending_deletes):
            await self._client.delete(key)
            self._pending_deletes.discard(key)
        for key, data in list(self._records.items()):
            await self._client.put_if_changed(key, data, lease=self.lease_id or 0)
        self._dirty = False

    # ---- plain KV (not under the lease unless asked) ------------------------------------------
    async def put(self, key: str, value: Any, *, leased: bool = False) -> None:
        """Write a key once (no re-registration). `leased=True` ties it to this lease."""
        self._check_open()
        await self._client.put(key, _to_bytes(value),
                               lease=(self.lease_id or 0) if leased else 0)

    async def get(self, key: str, value_type: type | None = None) -> Any:
        """One key's value (decoded if `value_type`), or None if absent."""
        kv = await self._client.get(key)
        if kv is None:
            return None
        return kv.value if value_type is None else decode(kv.value, value_type)

    async def delete(self, key: str) -> bool:
        return await self._client.delete(key)

    async def get_prefix(self, prefix: str, value_type: type | None = None) -> dict[str, Any]:
        """Current values under `prefix`; values that do not decode are logged and left out."""
        kvs, _ = await self._client.get_prefix(prefix)
        out: dict[str, Any] = {}
        for kv in kvs:
            ok, value = _decode_value(kv, value_type)
            if ok:
                out[kv.key] = value
        return out

    # ---- watching -----------------------------------------------------------------------------
    async def watch(self, prefix: str, value_type: type | None = None, *,
                    require_initial: bool = True) -> Membership:
        """List `prefix` and keep watching it. With `require_initial` (default) the first list
        must succeed (raises EtcdUnavailable otherwise); without it an empty view is returned
        at once and filled when etcd answers."""
        self._check_open()
        membership = Membership(self, prefix, value_type)
        if require_initial:
            await membership._relist()
        membership._start()
        self._memberships.add(membership)
        return membership

    async def close(self, *, revoke: bool = True) -> None:
        """Stop keepalive and watches; with `revoke`, revoke the lease so every record of this
        process vanishes at once (otherwise they expire after the TTL)."""
        if self._closed:
            return
        self._closed = True
        for m in list(self._memberships):
            await m.close()
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            await asyncio.wait({self._keepalive_task}, timeout=5.0)
        if revoke and self.lease_id is not None:
            try:
                await self._client.lease_revoke(self.lease_id)
            except EtcdError as exc:
                log.warning("could not revoke etcd lease; records expire after the TTL",
                            lease=self.lease_id, ttl=self._ttl_s, error=str(exc))
        self.lease_id = None
        await self._client.close()

    def _check_open(self) -> None:
        if self._closed:
            raise DiscoveryError("discovery is closed")


def _decode_value(kv: KeyValue, value_type: type | None) -> tuple[bool, Any]:
    if value_type is None:
        return True, kv.value
    try:
        return True, decode(kv.value, value_type)
    except ProtocolError as exc:
        log.warning("skipping etcd value that does not decode", key=kv.key,
                    type=value_type.__name__, error=str(exc))
        return False, None


class Membership:
    """The live view of one etcd prefix: `items` plus change notifications."""

    def __init__(self, discovery: Discovery, prefix: str, value_type: type | None):
        self._discovery = discovery
        self.prefix = prefix
        self.value_type = value_type
        self.items: dict[str, Any] = {}
        self._raw: dict[str, bytes] = {}  # key -> value bytes as last seen (decodable or not)
        self.revision = 0  # the last store revision applied to this view
        self.connected = False  # True while a watch stream is established
        self._listeners: list[Listener] = []
        self._queues: list[_ChangeQueue] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._closed = False

    # ---- public -------------------------------------------------------------------------------
    def add_listener(self, callback: Listener) -> None:
        """callback(kind, key, value), kind "put" | "delete"; for a delete, value is the last
        known value. Called on the event loop in change order; it must not block."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def changes(self, *, maxsize: int = 4096, initial: bool = False
                ) -> AsyncIterator[tuple[str, str, Any]]:
        """Iterate (kind, key, value) changes from now on. With `initial`, the current items
        come first as puts. A consumer more than `maxsize` behind gets ChangesOverflow."""
        queue = _ChangeQueue(self, maxsize)
        if initial:
            for key, value in self.items.items():
                queue.push(("put", key, value))
        self._queues.append(queue)
        return queue

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool],
                       timeout: float) -> None:  # noqa: ASYNC109 (agreed API)
        """Wait until predicate(items) is true; raises TimeoutError after `timeout` s."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.items))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            # Bounded: a task that does not stop must not hang the caller's shutdown.
            done, _ = await asyncio.wait({self._task}, timeout=5.0)
            if not done:
                log.warning("etcd watch task did not stop within 5 s", prefix=self.prefix)
        for queue in list(self._queues):
            queue.end()
        self._discovery._memberships.discard(self)

    # ---- applying changes ---------------------------------------------------------------------
    def _emit(self, kind: str, key: str, value: Any) -> None:
        for cb in list(self._listeners):
            try:
                cb(kind, key, value)
            except Exception:
                log.exception("membership listener failed", prefix=self.prefix, key=key)
        for queue in list(self._queues):
            queue.push((kind, key, value))

    def _apply_put(self, kv: KeyValue) -> bool:
        if self._raw.get(kv.key) == kv.value:
            return False  # same bytes re-put (e.g. re-asserted after an outage): no change
        self._raw[kv.key] = kv.value
        ok, value = _decode_value(kv, self.value_type)
        if ok:
            self.items[kv.key] = value
            self._emit("put", kv.key, value)
            return True
        if kv.key in self.items:  # the record became invalid: it no longer describes anything
            self._emit("delete", kv.key, self.items.pop(kv.key))
            return True
        return False

    def _apply_delete(self, key: str) -> bool:
        self._raw.pop(key, None)
        if key in self.items:
            self._emit("delete", key, self.items.pop(key))
            return True
        return False

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _relist(self) -> None:
        """Read the whole prefix and emit the difference from what we have."""
        kvs, revision = await self._discovery._client.get_prefix(self.prefix)
        seen = {kv.key for kv in kvs}
        for key in [k for k in self._raw if k not in seen]:
            self._apply_delete(key)
        for kv in kvs:
            self._apply_put(kv)
        self.revision = revision
        await self._notify()

    def _start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"etcd-watch:{self.prefix}")

    async def _run(self) -> None:
        client = self._discovery._client
        backoff = _Backoff()
        need_relist = self.revision == 0
        failing = False
        while not self._closed:
            try:
                if need_relist:
                    await self._relist()
                    need_relist = False
                stream = await client.watch_prefix(
                    self.prefix, self.revision + 1,
                    liveness_s=self._discovery._watch_liveness_s)
                try:
                    if stream.created_revision < self.revision:
                        # The store went backwards (etcd restored or replaced): our revision
                        # means nothing there any more.
                        log.warning("etcd revision went backwards; re-listing",
                                    prefix=self.prefix, had=self.revision,
                                    now=stream.created_revision)
                        self.revision = 0
                        need_relist = True
                        continue
                    self.connected = True
                    if failing:
                        log.info("etcd watch resumed", prefix=self.prefix,
                                 from_revision=self.revision + 1)
                        failing = False
                    backoff.reset()
                    async for batch in stream.batches():
                        if self._closed:
                            return
                        await self._apply_batch(batch)
                finally:
                    stream.close()
                    self.connected = False
            except EtcdCompacted as exc:
                log.info("watch revision compacted; re-listing", prefix=self.prefix,
                         revision=self.revision, compacted=exc.compact_revision)
                need_relist = True
            except EtcdError as exc:
                if not failing:
                    log.warning("etcd watch lost; keeping last membership and retrying",
                                prefix=self.prefix, items=len(self.items), error=str(exc))
                failing = True
                await asyncio.sleep(backoff.next())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("etcd watch failed unexpectedly; retrying", prefix=self.prefix)
                failing = True
                await asyncio.sleep(backoff.next())

    async def _apply_batch(self, batch) -> None:
        # A batch holds whole revisions; anything at or below our revision was already applied
        # (by the list we started from, or before a reconnect).
        applied = self.revision
        top = applied
        for ev in batch:
            rev = ev.kv.mod_revision
            if rev <= applied:
                continue
            top = max(top, rev)
            if ev.kind == "put":
                self._apply_put(ev.kv)
            else:
                self._apply_delete(ev.kv.key)
        self.revision = top
        await self._notify()


class _ChangeQueue:
    """A bounded per-consumer queue; overflowing ends that consumer with ChangesOverflow
    rather than blocking the watcher (which would stall every other consumer)."""

    _END = object()

    def __init__(self, membership: Membership, maxsize: int):
        self._membership = membership
        self._queue: asyncio.Queue = asyncio.Queue()
        self._maxsize = maxsize
        self._overflow = False
        self._ended = False

    def push(self, item) -> None:
        if self._ended:
            return
        if self._queue.qsize() >= self._maxsize:
            self._overflow = True
            self._ended = True
            self._detach()
            self._queue.put_nowait(self._END)
            return
        self._queue.put_nowait(item)

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(self._END)

    def _detach(self) -> None:
        with contextlib.suppress(ValueError):
            self._membership._queues.remove(self)

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is self._END:
            self._detach()
            if self._overflow:
                raise ChangesOverflow(
                    f"changes() consumer of {self._membership.prefix!r} fell more than "
                    f"{self._maxsize} changes behind; re-read items and start again")
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self._ended = True
        self._detach()
