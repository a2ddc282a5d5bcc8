"""The lifecycle every genset service shares.

    class Echo(Service):
        component = "echo"
        async def start(self):   # subscribe, register extra records; raise to abort start-up
            ...
        async def drain(self):   # stop taking work, finish what is in flight
            ...

    raise SystemExit(service_main(argv, Echo, prog="genset echo"))

`run_service` does, in order: logging; the /metrics + /health server; NATS (`Bus`); etcd
(`Discovery`, one lease); `service.start()`; the service's InstanceRecord in etcd; then waits
for SIGTERM/SIGINT. On the signal it takes the InstanceRecord out of etcd first (so routers
stop picking this instance while it drains), runs `drain()` under `drain_timeout`, then
`stop()`, revokes the lease (every other record of the process vanishes at once), closes the
bus and the HTTP server. A second signal skips the rest of the drain.

Exit codes: 0 after a clean drain; 1 when start-up failed or the drain failed or overran its
deadline; 2 for bad configuration (from `service_main`); `request_stop(code)` sets another.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

import proto
from genset.runtime.bus_errors import BusError
from genset.runtime.config import (
    CommonConfig,
    ConfigError,
    DefaultsHelpFormatter,
    add_common_args,
    add_dataclass_args,
    common_config,
    dataclass_from_args,
)
from genset.runtime.discovery import Discovery, DiscoveryError
from genset.runtime.logging import configure_logging
from genset.runtime.metrics import Metrics
from genset.runtime.status_http import StatusServer, json_response
from proto import keys

if TYPE_CHECKING:
    from genset.runtime.bus import Bus

__all__ = [
    "CommonConfig",
    "ConfigError",
    "Service",
    "add_common_args",
    "build_instance_record",
    "common_config",
    "configure_logging",
    "run_service",
    "service_main",
    "service_parser",
]

# Each shutdown step after the drain (stop(), revoke, bus close). A step cut off here skips
# the rest of it: what a service's stop() waits on must fit (a worker's close does:
# genset.worker.host.CLOSE_TIMEOUT_S), and long work belongs in drain(), under drain_timeout.
_STOP_STEP_TIMEOUT_S = 5.0


class Service:
    """Base class: subclasses set `component` and implement `start()` and `drain()`."""

    component: str = "service"

    def __init__(self, config: CommonConfig):
        self.config = config
        self.namespace = config.namespace
        # A fixed id comes with a worker slot's credentials (genset.runtime.auth): its NATS
        # subjects and etcd keys end in it, and its permissions name them.
        self.instance_id: int = (int(config.instance_id, 16) if config.instance_id
                                 else random.getrandbits(63) or 1)
        self.log = structlog.get_logger(f"genset.{self.component}")
        self.metrics = Metrics()
        self.bus: Bus = None  # type: ignore[assignment]  # set by run_service before start()
        self.discovery: Discovery = None  # type: ignore[assignment]
        self.http: StatusServer | None = None
        self.http_url: str | None = None
        # Filled by start(); published in this instance's InstanceRecord.
        self.subjects: dict[str, str] = {}
        self.labels: dict[str, str] = {}
        self.state = "starting"  # starting | ready | draining | stopped
        self.started_ms = int(time.time() * 1000)
        self.exit_code = 0
        self._stop_event: asyncio.Event | None = None

    # ---- for subclasses -------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe, load, register records. Raising aborts start-up (exit code 1)."""

    async def drain(self) -> None:
        """Stop taking new work and finish in-flight work; cut off after drain_timeout."""

    async def stop(self) -> None:
        """Release resources after the drain (engines, files); the bus is still open."""

    def metrics_tokens(self) -> list[str]:
        """Bearer tokens /metrics accepts (none: open). `--metrics-token` when given, else
        the service's API keys when it has some (`options.api_key`: the frontend's)."""
        text = self.config.metrics_token or getattr(getattr(self, "options", None),
                                                    "api_key", None) or ""
        return [t.strip() for t in text.split(",") if t.strip()]

    def health(self) -> dict[str, Any]:
        """The /health body. HTTP status is 200 while `status` is "ok", else 503."""
        return {
            "status": "ok" if self.state == "ready" else self.state,
            "ready": self.state == "ready",
            "component": self.component,
            "instance_id": self.instance_id,
            "namespace": self.namespace,
            "nats_connected": bool(self.bus is not None and self.bus.connected),
            "etcd_reachable": bool(self.discovery is not None and self.discovery.reachable),
        }

    # ---- helpers --------------------------------------------------------------------------------
    @property
    def instance_key(self) -> str:
        return keys.instance(self.namespace, self.component, self.instance_id)

    def instance_record(self) -> proto.InstanceRecord:
        return build_instance_record(
            instance_id=self.instance_id, component=self.component, namespace=self.namespace,
            subjects=self.subjects, labels=self.labels, http_url=self.http_url,
            started_ms=self.started_ms)

    def request_stop(self, exit_code: int = 0) -> None:
        """Begin the same shutdown a SIGTERM would (e.g. after a fatal error)."""
        self.exit_code = max(self.exit_code, exit_code)
        if self._stop_event is not None:
            self._stop_event.set()


def build_instance_record(*, instance_id: int, component: str, namespace: str,
                          subjects: dict[str, str], labels: dict[str, str],
                          http_url: str | None = None,
                          started_ms: int | None = None) -> proto.InstanceRecord:
    """The one place an `InstanceRecord` is built: `Service.instance_record`, and parts that
    register their own when run without a Service (an embedded `genset.worker.WorkerHost`).
    Host name and pid are this process's."""
    return proto.InstanceRecord(
        instance_id=instance_id, component=component, namespace=namespace,
        subjects=dict(subjects), host=socket.gethostname(), pid=os.getpid(),
        started_ms=int(time.time() * 1000) if started_ms is None else started_ms,
        http_url=http_url, labels=dict(labels))


def _bus_tls(config: CommonConfig) -> ssl.SSLContext | bool | None:
    if config.nats_ca:
        return ssl.create_default_context(cafile=config.nats_ca)
    if any(url.strip().startswith("tls://") for url in config.nats.split(",")):
        return True
    return None


async def _connect_bus(service: Service, config: CommonConfig) -> Bus:
    from genset.runtime.bus import Bus  # imported here: the bus pulls in nats-py

    name = f"{service.component}-{service.instance_id:x}"
    servers = [s.strip() for s in config.nats.split(",") if s.strip()]
    return await Bus.connect(servers, name=name, namespace=config.namespace,
                             user=config.nats_user, password=config.nats_password,
                             token=config.nats_token, tls=_bus_tls(config))


def _add_status_metrics(service: Service) -> None:
    m = service.metrics
    m.gauge("nats_connected", "1 while the NATS connection is up").set_function(
        lambda: float(bool(service.bus is not None and service.bus.connected)))
    m.gauge("etcd_reachable", "1 while etcd answers this process's lease keepalives").set_function(
        lambda: float(bool(service.discovery is not None and service.discovery.reachable)))
    m.gauge("service_ready", "1 while the service is ready (not starting or draining)"
            ).set_function(lambda: float(service.state == "ready"))


async def _startup(service: Service, config: CommonConfig) -> None:
    service.bus = await _connect_bus(service, config)
    service.discovery = await Discovery.connect(
        config.etcd, ttl=config.lease_ttl, user=config.etcd_user, password=config.etcd_password,
        ca_cert=config.etcd_ca)
    await service.start()
    # Everything allocated so far (modules, clients, an engine, a tokenizer) lives as long as
    # the process: keep it out of the cyclic GC's full collections, each of which walked it
    # all and stopped the process for tens to hundreds of ms (a worker 100-180 ms, ~6 times a
    # run of the live mixed load; the router 68-218 ms and the offload store 150-556 ms when
    # they did not freeze: docs/benchmarks.md, issues 11 and 15).
    gc.collect()
    gc.freeze()
    await service.discovery.register(service.instance_key, service.instance_record())
    service.state = "ready"


async def _shutdown_step(what: str, coro, log) -> bool:
    try:
        await asyncio.wait_for(coro, _STOP_STEP_TIMEOUT_S)
        return True
    except TimeoutError:
        log.warning("shutdown step timed out", step=what, timeout_s=_STOP_STEP_TIMEOUT_S)
    except Exception as exc:
        log.warning("shutdown step failed", step=what, error=repr(exc))
    return False


async def _serve(service_factory: Callable[[CommonConfig], Service], config: CommonConfig) -> int:
    loop = asyncio.get_running_loop()
    service = service_factory(config)
    configure_logging(config.log_format, config.log_level, service=service.component,
                      instance_id=service.instance_id)
    log = structlog.get_logger("genset.service")
    stop = asyncio.Event()
    force = asyncio.Event()
    service._stop_event = stop

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("signal received; draining", signal=sig.name,
                     drain_timeout_s=config.drain_timeout)
            stop.set()
        else:
            log.warning("second signal; not waiting for the drain", signal=sig.name)
            force.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    http = service.http = StatusServer(config.host, config.metrics_port)

    def health_route():
        body = service.health()
        return json_response(body, 200 if body.get("status") == "ok" else 503)

    http.route("/health", health_route)
    http.route("/metrics", lambda: (200, service.metrics.content_type, service.metrics.render()),
               tokens=service.metrics_tokens())
    _add_status_metrics(service)

    code = 0
    try:
        await http.start()
        service.http_url = http.url
        log.info("starting", component=service.component, http=http.url,
                 config=config.redacted())
        startup = asyncio.create_task(_startup(service, config), name="service-startup")
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not startup.done():  # a signal during start-up: abandon it
            startup.cancel()
            with contextlib.suppress(BaseException):
                await startup
            log.info("stopped during start-up")
        else:
            startup.result()  # raises what start-up raised
            log.info("ready", http=http.url,
                     subjects=service.subjects)
        await stop_wait
    except Exception as exc:
        # Expected failures (NATS/etcd unreachable, refused) get one clear line, no traceback.
        expected = isinstance(exc, OSError | DiscoveryError | BusError | ConfigError)
        log.error("start-up failed", error=str(exc) or repr(exc), exc_info=not expected)
        code = 1
        stop.set()

    if service.state == "ready":
        service.state = "draining"
        # Out of etcd first, so nobody routes new work here while we drain.
        await _shutdown_step("unregister", service.discovery.unregister(service.instance_key),
                             log)
        drain = asyncio.create_task(service.drain(), name="service-drain")
        forced = asyncio.create_task(force.wait())
        done, _ = await asyncio.wait({drain, forced}, timeout=config.drain_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if drain in done and drain.exception() is None:
            log.info("drained")
        else:
            if drain in done:
                log.error("drain failed", error=repr(drain.exception()))
            else:
                drain.cancel()
                with contextlib.suppress(BaseException):
                    await drain
                log.warning("drain cut off", timeout_s=config.drain_timeout,
                            forced=force.is_set())
            code = 1
    service.state = "stopped"
    await _shutdown_step("service stop", service.stop(), log)
    if service.discovery is not None:
        await _shutdown_step("etcd close", service.discovery.close(revoke=True), log)
    if service.bus is not None:
        await _shutdown_step("bus close", service.bus.close(), log)
    await http.close()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    code = max(code, service.exit_code)
    log.info("exit", code=code)
    return code


def run_service(service_factory: Callable[[CommonConfig], Service], config: CommonConfig, *,
                use_uvloop: bool = True) -> int:
    """Run a service until SIGTERM/SIGINT and return its exit code (see module docstring).

    service_factory(config) builds the Service; it is called inside the event loop.
    """
    coro = _serve(service_factory, config)
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def service_parser(*, prog: str, description: str = "",
                   options_cls: type | None = None) -> argparse.ArgumentParser:
    """The command line `service_main` parses: the common flags plus one per field of
    `options_cls` (a service's `build_parser()` returns it, e.g. for checking commands)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=DefaultsHelpFormatter)
    add_common_args(parser)
    if options_cls is not None:
        add_dataclass_args(parser, options_cls, group_title=f"{prog} options")
    return parser


def service_main(argv: list[str] | None, factory: Callable[..., Service], *, prog: str,
                 description: str = "", options_cls: type | None = None,
                 add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """A service's `main(argv)`: common flags (+ a dataclass of its own options, also from
    GENSET_* env vars), a clear error and exit 2 for a bad value, then `run_service`.

    factory(config) or, with `options_cls`, factory(config, options); with `add_args` it
    gets the parsed argparse namespace as `args=` too.
    """
    parser = service_parser(prog=prog, description=description, options_cls=options_cls)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    try:
        config = common_config(args)
        options = dataclass_from_args(options_cls, args) if options_cls is not None else None
    except ConfigError as exc:
        parser.error(str(exc))  # prints usage and the message, exits 2

    def build(cfg: CommonConfig) -> Service:
        extra: dict[str, Any] = {"args": args} if add_args is not None else {}
        if options_cls is not None:
            return factory(cfg, options, **extra)
        return factory(cfg, **extra)

    return run_service(build, config)
