"""`genset up --planner`: the planner inside the launcher, so the launcher stays in charge of
every process.

The planner service (`services.planner`, the same code as `genset planner`) runs on its own
asyncio loop in a thread of `genset up`, with the local connector handed `StackWorkers`: a
`WorkerLauncher` whose starts and drains are carried out by the launcher's own thread. That
thread forks every worker (Linux's parent-death signal is tied to the forking thread: a worker
forked by the planner's thread would be killed when that thread ends), supervises it like the
workers it started itself, and, for a worker the planner drains, stops supervising it (an exit
after a drain is not a crash to restart) and sends it SIGTERM: the worker unregisters, finishes
its requests and exits.

Like `genset/cli.py`, this names the planner service as a string and imports it only when
`--planner` is given (`genset/` does not depend on `services/`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

PLANNER_SERVICE = "services.planner.service"
PLANNER_CLI = "services.planner.__main__"
CALL_TIMEOUT_S = 30.0  # a start the launcher's thread has not carried out by then failed


class ChildHandle:
    """A worker child as the planner's connector sees it (`WorkerHandle`): its current pid
    (a supervised restart changes it) and whether the launcher still manages it."""

    def __init__(self, child) -> None:
        self.child = child
        self.retired = False

    @property
    def pid(self) -> int:
        proc = self.child.proc
        return proc.pid if proc is not None else 0

    @property
    def alive(self) -> bool:
        return not self.retired


class StackWorkers:
    """`WorkerLauncher` for the planner's local connector, called on the planner's thread;
    `run_on_launcher(fn)` runs `fn` on the launcher's thread and returns a Future."""

    def __init__(self, run_on_launcher: Callable[[Callable[[], Any]], concurrent.futures.Future],
                 add_worker: Callable[[str], Any], retire_worker: Callable[[Any], None]) -> None:
        self._run = run_on_launcher
        self._add = add_worker
        self._retire = retire_worker

    def start_worker(self, role: str) -> ChildHandle:
        # blocks the planner's loop for as long as a fork takes on the launcher's thread
        child = self._run(lambda: self._add(role)).result(timeout=CALL_TIMEOUT_S)
        return ChildHandle(child)

    def stop_worker(self, handle: ChildHandle) -> None:
        handle.retired = True
        self._run(lambda: self._retire(handle.child))

    def close(self, timeout_s: float) -> None:
        pass  # the launcher stops its own children (frontend first, then workers)


def startup_prior(planner_args: list[str], env, measured_s: float) -> float | None:
    """The planner's start-up time until it has timed a start of its own: the one `genset up`
    just measured for the workers it started itself (spawn -> ready, the slowest of them,
    which started side by side), instead of the planner's fixed default (30 s), too short for
    a model that loads for minutes and long for the mocker. None (keep the planner's) when
    the user set `--startup-s` (a `--planner-arg` or GENSET_STARTUP_S) or nothing was
    measured."""
    if not measured_s > 0 or "GENSET_STARTUP_S" in env:
        return None
    if any(a == "--startup-s" or a.startswith("--startup-s=") for a in planner_args):
        return None
    return round(max(measured_s, 0.1), 1)


def planner_options(argv: list[str]):
    """(CommonConfig, PlannerOptions) from `genset planner` flags; SystemExit(2) with argparse's
    message naming the flag on a bad one."""
    cli = importlib.import_module(PLANNER_CLI)
    runtime_config = importlib.import_module("genset.runtime.config")
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    try:
        return (runtime_config.common_config(args),
                runtime_config.dataclass_from_args(
                    importlib.import_module(PLANNER_SERVICE).PlannerOptions, args))
    except runtime_config.ConfigError as exc:
        parser.error(str(exc))


class PlannerThread:
    """The planner service on its own loop in a daemon thread: `start()` returns once it is
    ready (or raises what its start-up raised), `stop()` drains it (deadline bounded)."""

    def __init__(self, config, options, workers: StackWorkers, initial: list, log_path: Path,
                 start_timeout_s: float = 60.0) -> None:
        self.config = config
        self.options = options
        self.workers = workers
        self.initial = initial  # ChildHandles of the workers the launcher started itself
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.service = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # left open: the process's logging writes here from now on (the launcher prints)
        self._log_file = open(self.log_path, "a", encoding="utf-8")
        self._thread = threading.Thread(target=self._main, name="planner", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout_s):
            raise RuntimeError(f"the planner did not start in {self.start_timeout_s:.0f} s "
                               f"(log: {self.log_path})")
        if self._error is not None:
            raise RuntimeError(f"the planner could not start: {self._error} "
                               f"(log: {self.log_path})")

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start() if it happened before ready
            self._error = self._error or exc
            self._ready.set()

    async def _serve(self) -> None:
        from genset.runtime.logging import configure_logging
        from genset.runtime.service import _shutdown_step, _startup

        svc_mod = importlib.import_module(PLANNER_SERVICE)
        connectors = importlib.import_module("services.planner.connectors")
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        import structlog

        log_file = self._log_file
        connector = connectors.LocalConnector(self.workers)
        connector.handles.extend(self.initial)
        service = self.service = svc_mod.PlannerService(self.config, self.options,
                                                        connector=connector, out=log_file)
        configure_logging("json", self.config.log_level, service="planner",
                          instance_id=service.instance_id, stream=log_file)
        log = structlog.get_logger("genset.service")
        try:
            await _startup(service, self.config)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        service.state = "ready"
        self._ready.set()
        await self._stop.wait()
        service.state = "draining"
        await _shutdown_step("unregister", service.discovery.unregister(service.instance_key),
                             log)
        await _shutdown_step("drain", service.drain(), log)
        service.state = "stopped"
        await _shutdown_step("service stop", service.stop(), log)
        await _shutdown_step("etcd close", service.discovery.close(revoke=True), log)
        await _shutdown_step("bus close", service.bus.close(), log)
        log_file.flush()

    def stop(self, timeout_s: float = 15.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
            self._thread.join(timeout_s)

    def status(self) -> dict:
        svc = self.service
        return svc.core.status() if svc is not None else {}
