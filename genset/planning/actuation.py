"""What acting on a decision means, independent of how it is done (types and protocols only).

`ScaleChange` is one decision to carry out: the pool sizes wanted (absolute, for connectors
that set a replica count: compose, Kubernetes) and the deltas (workers to start, workers to
drain, for a launcher that starts and stops processes). `WorkerLauncher` is what a local
process launcher provides so the planner can start and stop `genset worker` processes; the
planner service has one of its own, and `genset up` can hand it its own launcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class DrainRequest:
    """A worker to take out of service (it finishes its requests in flight first)."""

    worker_id: int
    role: str
    host: str = ""  # from its InstanceRecord (in Kubernetes: the pod name)
    pid: int = 0


@dataclass
class ScaleChange:
    decision_id: int
    targets: dict[str, int]
    start: dict[str, int] = field(default_factory=dict)  # role -> workers to start
    drain: list[DrainRequest] = field(default_factory=list)
    reason: str = ""

    def done(self) -> bool:
        return not any(self.start.values()) and not self.drain


@runtime_checkable
class WorkerHandle(Protocol):
    """A started worker process."""

    @property
    def pid(self) -> int: ...

    @property
    def alive(self) -> bool: ...


@runtime_checkable
class WorkerLauncher(Protocol):
    """Starts and stops `genset worker` processes on this machine.

    Both calls may block briefly (a fork, a signal). They are called on the event loop's
    thread, not in a worker thread: Linux's parent-death signal, which takes a child down
    with a killed planner, is tied to the thread that forked it. `stop_worker` asks the worker to stop (SIGTERM: it drains and exits on its own) and
    returns without waiting; `close` stops every worker started and waits for them."""

    def start_worker(self, role: str) -> WorkerHandle: ...

    def stop_worker(self, handle: WorkerHandle) -> None: ...

    def close(self, timeout_s: float) -> None: ...
