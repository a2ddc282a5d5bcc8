"""A thin asyncio etcd v3 client on aetcd's generated gRPC stubs.

aetcd's own `Client` keeps one shared watch stream whose failure tears down every watch, has
no TLS, and gives no per-call deadline control; discovery needs all three. This module keeps
aetcd's wire layer (`aetcd.rpc`) and adds: a deadline on every unary call, TLS and auth
(re-authenticating when the token expires), several endpoints tried in turn, fast gRPC
reconnects, and one independent watch stream per watcher (`WatchStream`).

Errors are mapped to three kinds callers act on: `EtcdUnavailable` (retry later, keep the
last known state), `EtcdCompacted` (re-list), and `EtcdError` (anything else: a bug or a
configuration problem, e.g. wrong password).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

# gRPC defaults back off reconnects up to 120 s; after an etcd restart we want to be back
# within a second or two. Keepalive pings notice a silently dead peer (no RST) in ~15 s;
# etcd refuses pings more often than every 5 s, and pings without an open stream. No BDP
# probes: gRPC pinged etcd after every message it received (each lease keep-alive reply),
# a round trip that woke both sides and gRPC's idle threads for nothing (etcd's messages
# are small; the default 64 KiB window carries them; docs/benchmarks.md 5z).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.bdp_probe", 0),
)

# Every call also gets a deadline on the asyncio side, this much after its gRPC deadline. The
# gRPC deadline is enforced inside gRPC's C core and reaches the event loop through gRPC's
# completion-queue poller thread; if that hand-over is late or lost, nothing else would ever
# wake the caller (the event loop sits idle), so this one still ends the wait.
_LOOP_DEADLINE_GRACE_S = 1.0

_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,  # connection torn down mid-call surfaces as UNKNOWN at times
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class EtcdError(Exception):
    """An etcd call failed for a reason retrying will not fix (bad auth, bad request)."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached or did not answer in time; retry later."""


class EtcdCompacted(EtcdError):
    """The revision a watch asked for was compacted away; the caller must re-list."""

    def __init__(self, compact_revision: int):
        super().__init__(f"revision compacted (oldest kept revision: {compact_revision})")
        self.compact_revision = compact_revision


def _map_error(exc: grpc.aio.AioRpcError, endpoint: str) -> EtcdError:
    detail = exc.details() or exc.code().name
    if exc.code() in _UNAVAILABLE_CODES:
        return EtcdUnavailable(f"etcd at {endpoint}: {exc.code().name}: {detail}")
    return EtcdError(f"etcd at {endpoint}: {exc.code().name}: {detail}")


def parse_endpoints(endpoints: str | list[str]) -> tuple[list[str], bool]:
    """'a:2379,https://b:2379' -> (['a:2379', 'b:2379'], uses_https)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[str] = []
    https = False
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if item.startswith("https://"):
            https = True
            item = item[len("https://"):]
        elif item.startswith("http://"):
            item = item[len("http://"):]
        item = item.rstrip("/")
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint {raw.strip()!r} is not host:port")
        out.append(item)
    if not out:
        raise ValueError(f"no etcd endpoint in {endpoints!r}")
    return out, https


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int


def _kv(raw) -> KeyValue:
    return KeyValue(raw.key.decode(), raw.value, raw.mod_revision, raw.lease)


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" | "delete"
    kv: KeyValue


async def _bounded(call, grpc_deadline_s: float, endpoint: str, what: str):
    """Await a gRPC call, giving up `_LOOP_DEADLINE_GRACE_S` after its own deadline."""
    limit = grpc_deadline_s + _LOOP_DEADLINE_GRACE_S
    try:
        async with asyncio.timeout(limit):
            return await call
    except TimeoutError:
        call.cancel()
        raise EtcdUnavailable(
            f"etcd at {endpoint}: {what}: no answer within {limit:.1f} s "
            f"(gRPC deadline {grpc_deadline_s:.1f} s did not end the call)") from None


class EtcdClient:
    """One gRPC channel to one of the endpoints; every unary call carries `timeout`."""

    def __init__(self, endpoints: str | list[str], *, timeout: float = 3.0, user: str | None = None,
                 password: str | None = None, ca_cert: str | None = None,
                 cert: str | None = None, key: str | None = None):
        self.endpoints, https = parse_endpoints(endpoints)
        if (user is None) != (password is None):
            raise ValueError("etcd auth needs both a user and a password")
        self.timeout = timeout
        self._user, self._password = user, password
        self._tls = https or ca_cert is not None or cert is not None
        self._ca_cert, self._cert, self._key = ca_cert, cert, key
        self._index = 0
        self._closing: set[asyncio.Task] = set()  # old channels being closed after a rotate
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._channel: grpc.aio.Channel | None = None
        # When etcd last answered anything on the current channel (loop clock): a watch
        # that is quiet only because nothing changed need not probe a channel that the lease
        # keep-alive or another watch has just heard from (docs/benchmarks.md 5z: the probes
        # were a quarter of an idle stack's CPU).
        self._heard_at = -math.inf
        self._keepalive_call = self._keepalive_channel = None  # the shared LeaseKeepAlive stream
        self._keepalive_lock = asyncio.Lock()
        self._open_channel()

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._index]

    def _credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(read(self._ca_cert), read(self._key), read(self._cert))

    def _open_channel(self) -> None:
        target = self.endpoint
        if self._tls:
            self._channel = grpc.aio.secure_channel(target, self._credentials(), _CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, _CHANNEL_OPTIONS)
        self._kv = rpc.KVStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self._auth = rpc.AuthStub(self._channel)
        self._metadata = None
        self._heard_at = -math.inf

    def heard(self, channel) -> None:
        """etcd answered on `channel` just now (ignored for a channel this client has left)."""
        if channel is self._channel:
            self._heard_at = asyncio.get_running_loop().time()

    def heard_ago(self, channel) -> float:
        """Seconds since etcd last answered on `channel`; infinite for a channel this client
        has left (a watch still on it after a failover learns nothing from the new one)."""
        if channel is not self._channel:
            return math.inf
        return asyncio.get_running_loop().time() - self._heard_at

    def _rotate(self) -> None:
        """Move to the next endpoint (only when there is more than one)."""
        if len(self.endpoints) < 2:
            return
        old = self._channel
        self._index = (self._index + 1) % len(self.endpoints)
        self._open_channel()
        if old is not None:
            # Calls still running on the old channel fail and are retried by their owners.
            task = asyncio.get_running_loop().create_task(old.close(grace=1.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _authenticate(self) -> None:
        if self._user is None:
            return
        try:
            call = self._auth.Authenticate(
                rpc.AuthenticateRequest(name=self._user, password=self._password),
                timeout=self.timeout)
            resp = await _bounded(call, self.timeout, self.endpoint, "Authenticate")
        except grpc.aio.AioRpcError as exc:
            raise _map_error(exc, self.endpoint) from None
        self._metadata = (("token", resp.token),)

    async def _call(self, method: str, stub: str, request, time_limit: float | None = None):
        timeout = self.timeout if time_limit is None else time_limit
        for attempt in range(2):
            if self._user is not None and self._metadata is None:
                await self._authenticate()
            fn = getattr(getattr(self, stub), method)
            channel = self._channel
            try:
                call = fn(request, timeout=timeout, metadata=self._metadata)
                resp = await _bounded(call, timeout, self.endpoint, method)
                self.heard(channel)
                return resp
            except EtcdUnavailable:
                self._rotate()
                raise
            except grpc.aio.AioRpcError as exc:
                if (exc.code() == grpc.StatusCode.UNAUTHENTICATED and self._user is not None
                        and attempt == 0):
                    self._metadata = None  # the token expired: log in again, once
                    continue
                err = _map_error(exc, self.endpoint)
                if isinstance(err, EtcdUnavailable):
                    self._rotate()
                raise err from None
        raise AssertionError("unreachable")

    # ---- KV ---------------------------------------------------------------------------------
    async def get_prefix(self, prefix: str, *, time_limit: float | None = None
                         ) -> tuple[list[KeyValue], int]:
        """All keys under `prefix` and the store revision they were read at."""
        key = prefix.encode()
        req = rpc.RangeRequest(key=key, range_end=prefix_range_end(key))
        resp = await self._call("Range", "_kv", req, time_limit)
        return [_kv(kv) for kv in resp.kvs], resp.header.revision

    async def get(self, key: str, *, time_limit: float | None = None) -> KeyValue | None:
        resp = await self._call("Range", "_kv", rpc.RangeRequest(key=key.encode()), time_limit)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def put(self, key: str, value: bytes, *, lease: int = 0,
                  time_limit: float | None = None) -> int:
        req = rpc.PutRequest(key=key.encode(), value=value, lease=lease)
        return (await self._call("Put", "_kv", req, time_limit)).header.revision

    async def put_if_changed(self, key: str, value: bytes, *, lease: int,
                             time_limit: float | None = None) -> bool:
        """Put unless the key already holds exactly this value under this lease.

        Used when re-asserting registrations after an outage, so that records that survived
        it do not produce a spurious change for every watcher. Returns True if it wrote.
        """
        k = key.encode()
        compare = [
            rpc.Compare(key=k, target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL, value=value),
            rpc.Compare(key=k, target=rpc.Compare.LEASE, result=rpc.Compare.EQUAL, lease=lease),
        ]
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value, lease=lease))
        resp = await self._call("Txn", "_kv", rpc.TxnRequest(compare=compare, failure=[put]),
                                time_limit)
        return not resp.succeeded

    async def delete(self, key: str, *, time_limit: float | None = None) -> bool:
        resp = await self._call("DeleteRange", "_kv", rpc.DeleteRangeRequest(key=key.encode()),
                                time_limit)
        return resp.deleted > 0

    async def delete_prefix(self, prefix: str, *, time_limit: float | None = None) -> int:
        key = prefix.encode()
        req = rpc.DeleteRangeRequest(key=key, range_end=prefix_range_end(key))
        return (await self._call("DeleteRange", "_kv", req, time_limit)).deleted

    async def compact(self, revision: int, *, time_limit: float | None = None) -> None:
        """Drop history below `revision` (watches asking for older revisions get EtcdCompacted)."""
        await self._call("Compact", "_kv", rpc.CompactionRequest(revision=revision, physical=True),
                         time_limit)

    # ---- leases -----------------------------------------------------------------------------
    async def lease_grant(self, ttl: int, *, time_limit: float | None = None) -> int:
        resp = await self._call("LeaseGrant", "_lease", rpc.LeaseGrantRequest(TTL=ttl), time_limit)
        if resp.error:
            raise EtcdError(f"etcd at {self.endpoint}: lease grant failed: {resp.error}")
        return resp.ID

    async def lease_keepalive(self, lease_id: int, *, time_limit: float | None = None) -> int:
        """Refresh a lease once; returns its new TTL, or <= 0 if the lease no longer exists.

        The refreshes share one LeaseKeepAlive stream, opened on first use and kept: a stream
        per refresh (HTTP/2 stream set-up on both sides, a request iterator, gRPC's call
        objects) was a quarter of an idle stack's CPU (docs/benchmarks.md 5z). Any failure
        drops the stream; the next refresh opens a new one (on the channel current then)."""
        timeout = self.timeout if time_limit is None else time_limit
        limit = timeout + _LOOP_DEADLINE_GRACE_S
        try:
            async with asyncio.timeout(limit):
                async with self._keepalive_lock:  # one request in flight on the stream
                    if self._user is not None and self._metadata is None:
                        await self._authenticate()
                    channel = self._channel
                    call = self._keepalive_stream()
                    await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                    reply = await call.read()
                    if reply is grpc.aio.EOF:
                        self._drop_keepalive_stream()
                        raise EtcdUnavailable(
                            f"etcd at {self.endpoint}: keepalive stream ended without reply")
                    self.heard(channel)
                    return reply.TTL
        except TimeoutError:
            self._drop_keepalive_stream()
            self._rotate()
            raise EtcdUnavailable(
                f"etcd at {self.endpoint}: LeaseKeepAlive: no answer within "
                f"{limit:.1f} s") from None
        except grpc.aio.AioRpcError as exc:
            self._drop_keepalive_stream()
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._metadata = None
            err = _map_error(exc, self.endpoint)
            if isinstance(err, EtcdUnavailable):
                self._rotate()
            raise err from None
        except BaseException:  # cancelled, or anything unforeseen: never reuse a stream
            self._drop_keepalive_stream()  # that may hold an unread reply
            raise

    def _keepalive_stream(self):
        if self._keepalive_call is None or self._keepalive_channel is not self._channel:
            self._drop_keepalive_stream()
            self._keepalive_call = self._lease.LeaseKeepAlive(metadata=self._metadata)
            self._keepalive_channel = self._channel
        return self._keepalive_call

    def _drop_keepalive_stream(self) -> None:
        if self._keepalive_call is not None:
            self._keepalive_call.cancel()
        self._keepalive_call = self._keepalive_channel = None

    async def lease_revoke(self, lease_id: int, *, time_limit: float | None = None) -> None:
        try:
            await self._call("LeaseRevoke", "_lease", rpc.LeaseRevokeRequest(ID=lease_id),
                             time_limit)
        except EtcdError as exc:
            if "not found" not in str(exc):  # already gone is what we wanted
                raise

    # ---- auth administration (genset.runtime.auth) ----------------------------------------
    async def auth_call(self, method: str, request, *, time_limit: float | None = None):
        """One call of etcd's Auth service (AuthStatus, UserAdd, RoleGrantPermission, ...)."""
        return await self._call(method, "_auth", request, time_limit)

    # ---- watch ------------------------------------------------------------------------------
    async def watch_prefix(self, prefix: str, start_revision: int, *,
                           time_limit: float | None = None,
                           liveness_s: float = 5.0) -> WatchStream:
        """Open a watch of `prefix` from `start_revision` (inclusive) on its own stream.
        A stream silent for `liveness_s` is probed, and dropped after another `liveness_s`."""
        if self._user is not None and self._metadata is None:
            await self._authenticate()
        stream = WatchStream(self, prefix, start_revision, idle_s=liveness_s,
                             probe_s=liveness_s)
        try:
            await stream._open(self.timeout if time_limit is None else time_limit)
        except BaseException:  # including cancellation: never leave the stream running
            stream.close()
            raise
        return stream

    async def close(self) -> None:
        self._drop_keepalive_stream()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._closing:  # channels left by a failover: their grace is 1 s, give them 3
            await asyncio.wait(set(self._closing), timeout=3.0)


class WatchStream:
    """One etcd watch on its own gRPC stream. Iterate batches of events (one revision's
    events are never split across batches); any failure raises an EtcdError subclass.

    A hung etcd (process stopped, network black hole) can leave a stream open but silent.
    After `idle_s` without any answer from etcd on the stream's channel (this stream's
    responses, other watches', unary calls', lease keep-alives') the stream asks etcd for a
    progress report; if nothing at all arrives on the stream within `probe_s` after that, it
    is declared dead. A false alarm costs only a reconnect: the owner resumes from its last
    revision.
    """

    def __init__(self, client: EtcdClient, prefix: str, start_revision: int, *,
                 idle_s: float = 5.0, probe_s: float = 5.0):
        self._client = client
        key = prefix.encode()
        self._create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=prefix_range_end(key), start_revision=start_revision))
        self._outbox: asyncio.Queue = asyncio.Queue(maxsize=4)
        self._inbox: asyncio.Queue = asyncio.Queue(maxsize=64)  # reader -> batches()
        self._reader: asyncio.Task | None = None
        self._call = None
        self._channel = None  # the client's channel this stream was opened on
        self._idle_s, self._probe_s = idle_s, probe_s
        self.probes_sent = 0
        self.created_revision = 0  # store revision when the watch was created

    async def _requests(self):
        yield self._create
        # Closing our side of the stream makes etcd end the watch: keep it open until closed.
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    async def _read_all(self) -> None:
        """Move every response (or the error that ended the stream) to the inbox."""
        try:
            while True:
                resp = await self._call.read()
                if resp is not grpc.aio.EOF:
                    self._client.heard(self._channel)
                await self._inbox.put(resp)
                if resp is grpc.aio.EOF:
                    return
        except grpc.aio.AioRpcError as exc:
            await self._inbox.put(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # anything else also ends the stream, visibly
            await self._inbox.put(exc)

    def _error(self, item) -> EtcdError:
        client = self._client
        if isinstance(item, grpc.aio.AioRpcError):
            if item.code() == grpc.StatusCode.UNAUTHENTICATED:
                client._metadata = None
            err = _map_error(item, client.endpoint)
            if isinstance(err, EtcdUnavailable):
                client._rotate()
            return err
        if item is grpc.aio.EOF:
            return EtcdUnavailable(f"etcd at {client.endpoint}: watch stream closed")
        return EtcdUnavailable(f"etcd at {client.endpoint}: watch stream failed: {item!r}")

    async def _next(self, wait_s: float):
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # races with the get() completing, and the watch task would then never stop.
        try:
            async with asyncio.timeout(wait_s):
                item = await self._inbox.get()
        except TimeoutError:
            return None
        if isinstance(item, Exception) or item is grpc.aio.EOF:
            self.close()
            raise self._error(item)
        self._check(item)
        return item

    async def _open(self, time_limit: float) -> None:
        client = self._client
        self._channel = client._channel
        self._call = client._watch.Watch(self._requests(), metadata=client._metadata)
        self._reader = asyncio.create_task(self._read_all(), name="etcd-watch-reader")
        first = await self._next(time_limit)
        if first is None:
            self.close()
            raise EtcdUnavailable(
                f"etcd at {client.endpoint}: watch not created within {time_limit} s")
        if not first.created:
            self.close()
            raise EtcdError(f"etcd at {client.endpoint}: unexpected first watch response")
        self.created_revision = first.header.revision

    def _check(self, resp) -> None:
        if resp.compact_revision:
            self.close()
            raise EtcdCompacted(resp.compact_revision)
        if resp.canceled:
            self.close()
            reason = (resp.cancel_reason or "").lower()
            if "token" in reason or "auth" in reason or "permission" in reason:
                self._client._metadata = None  # log in again on the next attempt
            raise EtcdUnavailable(
                f"etcd at {self._client.endpoint}: watch cancelled: {resp.cancel_reason or '?'}")

    async def batches(self) -> AsyncIterator[list[WatchEvent]]:
        assert self._call is not None
        probing = False
        wait_s = self._idle_s
        while True:
            resp = await self._next(wait_s)
            if resp is None:
                if probing:
                    self.close()
                    raise EtcdUnavailable(
                        f"etcd at {self._client.endpoint}: watch silent for "
                        f"{self._idle_s + self._probe_s:.0f} s, no answer to a progress request")
                # Quiet because nothing changed under the prefix, on a channel etcd answered
                # lately (a lease keep-alive, another watch): no probe yet. A hung etcd or a
                # black-holed connection silences the whole channel, which is probed then.
                heard_ago = self._client.heard_ago(self._channel)
                if heard_ago < self._idle_s:
                    wait_s = self._idle_s - heard_ago
                    continue
                probing = True
                wait_s = self._probe_s
                self.probes_sent += 1
                with contextlib.suppress(asyncio.QueueFull):
                    self._outbox.put_nowait(
                        rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
                continue
            probing = False  # any response shows the stream is alive
            wait_s = self._idle_s
            if resp.events:
                yield [
                    WatchEvent("delete" if ev.type == rpc.Event.DELETE else "put", _kv(ev.kv))
                    for ev in resp.events
                ]

    def close(self) -> None:
        # End the request generator even when unsent probes fill the outbox: gRPC does not
        # cancel its request-consuming task for a call that already ended with an error, and
        # that task would otherwise wait on the outbox for ever.
        while not self._outbox.empty():
            self._outbox.get_nowait()
        self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        if self._call is not None:
            with contextlib.suppress(Exception):
                self._call.cancel()
