"""What a worker does around its engine, shared by the decode, prefill and both roles.

- `host.py`: `WorkerHost` (generate streams, validation, model card, drain, close) and
  `HostConfig`;
- `kv_feed.py`: KV event batches on the bus, resync snapshots, evictions for `on_evict`;
- `load.py`: periodic `LoadReport`s;
- `metrics.py`: `WorkerMetrics`;
- `hooks.py`: `WorkerHooks`, the points where disaggregation and offload plug in;
- `roles.py`: decode | prefill | both, and the role a worker registers under;
- `clock.py`: deadline-bounded waits.

`services/decode` runs a `WorkerHost` inside the service lifecycle; tests and benchmarks run
it in-process.
"""

from genset.worker.hooks import (
    EvictedBlock,
    HookChain,
    KvImport,
    PrefillDone,
    RemotePrefill,
    WorkerContext,
    WorkerHooks,
)
from genset.worker.host import HostConfig, WorkerHost
from genset.worker.metrics import WorkerMetrics
from genset.worker.roles import ROLE_BOTH, ROLE_DECODE, ROLE_PREFILL, WORKER_ROLES, registered_role

__all__ = [
    "ROLE_BOTH",
    "ROLE_DECODE",
    "ROLE_PREFILL",
    "WORKER_ROLES",
    "EvictedBlock",
    "HookChain",
    "HostConfig",
    "KvImport",
    "PrefillDone",
    "RemotePrefill",
    "WorkerContext",
    "WorkerHooks",
    "WorkerHost",
    "WorkerMetrics",
    "registered_role",
]
