"""Per-request timelines: when a request reached each stage of the serving path.

Off by default and free when off (the frontend checks one attribute per stage). A frontend
started with `--timeline FILE` (`GENSET_TIMELINE`) gives every request a `Timeline`, asks the
worker to time its own stages (`GenerateRequest.timeline`), and appends one JSON line per
finished request to FILE: `{"id", "ok", "stages": {stage: ms since arrival}, ...}`.
`bench/timeline_report.py` turns a run's file into a breakdown of TTFT by stage (p50/p99 of
each stage's share).

Stages, in path order (a stage a request never reached is absent):

| stage | where | when |
|---|---|---|
| `received` | frontend | the HTTP handler (or NATS service) got the request: 0 ms |
| `tokenized` | frontend | template + tokenize + limits done (`Pipeline.prepare`) |
| `routed` | frontend | the router's decision is back (embedded: computed; service: answered) |
| `sent` | frontend | the GenerateRequest is queued on the NATS connection |
| `w_received` | worker | its stream handler decoded the request |
| `w_admitted` | worker | the engine queued it (`Engine.submit` returned) |
| `w_first_step` | worker | the engine step that computed the request's first token started |
| `w_first_token` | worker | that step's output reached the host (mocker: after the modelled step time) |
| `w_first_sent` | worker | the frame with the first token was queued on the NATS connection |
| `first_token` | frontend | that frame reached the pipeline |
| `first_written` | frontend | the first SSE event was written to the client's socket (HTTP) |
| `done` | frontend | the last frame was handled |

Values beside the stamps: `worker` (the first attempt's worker id), `intake_cpu_ms` (HTTP
requests: the frontend thread's CPU from the handler's start to `sent`, `Timeline.stamp_cpu`:
what one request's intake costs, apart from the waits a busy machine adds to the stamps).

Worker stamps are unix times (seconds) taken on the worker's clock and turned into ms since
arrival with the frontend's clock: exact on one host, off by the clock offset across hosts.
"""

from __future__ import annotations

import contextlib
import gc
import time

import msgspec
import structlog

log = structlog.get_logger("genset.timeline")

FRONTEND_BEFORE = ("received", "tokenized", "routed", "sent")
WORKER_STAGES = ("w_received", "w_admitted", "w_first_step", "w_first_token", "w_first_sent")
FRONTEND_AFTER = ("first_token", "first_written", "done")
STAGES = FRONTEND_BEFORE + WORKER_STAGES + FRONTEND_AFTER
# Extra numbers a worker may report beside its stamps (not times): the modelled or measured
# duration of the first token's step, ms.
WORKER_VALUES = ("w_step_ms",)
_WORKER_KEYS = frozenset(WORKER_STAGES + WORKER_VALUES)


class Timeline:
    """One request's stamps (ms since its arrival), taken in the frontend, plus the worker's.

    The first stamp of a stage wins: after a migration, `routed`/`sent` stay the first
    attempt's (the wait is part of the request's TTFT), the worker's stages are those of the
    attempt that finished.
    """

    __slots__ = ("_cpu0", "_t0", "request_id", "stages", "values")

    def __init__(self, request_id: str, arrival_perf: float, arrival_cpu: float = 0.0) -> None:
        self.request_id = request_id
        # unix time of arrival: `arrival_perf` is a perf_counter() reading
        self._t0 = time.time() - (time.perf_counter() - arrival_perf)
        # time.thread_time() at arrival (0: not taken): see `stamp_cpu`
        self._cpu0 = arrival_cpu
        self.stages: dict[str, float] = {"received": 0.0}
        self.values: dict[str, float] = {}

    def stamp(self, stage: str) -> None:
        if stage not in self.stages:
            self.stages[stage] = (time.time() - self._t0) * 1000.0

    def stamp_cpu(self, name: str) -> None:
        """CPU time of the frontend's thread since arrival (ms) as value `name`, first call
        wins. It is the request's own work only while its handler did not wait (no router
        service asked, no tokenize thread): one task step, as for every short prompt routed
        locally; a wait lets other tasks' CPU in."""
        if self._cpu0 and name not in self.values:
            self.values[name] = round((time.thread_time() - self._cpu0) * 1000.0, 4)

    def merge_worker(self, reported: dict[str, float] | None) -> None:
        """The worker's `usage.timeline` (unix seconds); unknown names are ignored (it is
        bus input)."""
        if not reported:
            return
        t0 = self._t0
        for name, value in reported.items():
            if name not in _WORKER_KEYS or not isinstance(value, float | int):
                continue
            if name in WORKER_VALUES:
                self.values[name] = float(value)
            elif name not in self.stages:
                self.stages[name] = (value - t0) * 1000.0

    def record(self, ok: bool, **extra) -> dict:
        rec = {"id": self.request_id, "ok": ok, "t0": round(self._t0, 6),
               "stages": {k: round(v, 3) for k, v in self.stages.items()}}
        if self.values:
            rec["values"] = self.values
        rec.update(extra)
        return rec


class TimelineSink:
    """Appends finished requests' timelines to a file, one JSON object per line.

    Line-buffered (one write per request, nothing lost if the process dies); at most
    `max_records` lines per process (then it stops writing and says so once), so a timeline
    left on cannot fill a disk.
    """

    # A garbage collection at least this long is written too (`{"gc": generation, "ms",
    # "t"}`): a collection stops every stream of the process, so a stage that took far longer
    # than it should is explained when one ran then.
    GC_PAUSE_MS = 5.0

    def __init__(self, path: str, *, max_records: int = 1_000_000) -> None:
        self.path = path
        self.max_records = max_records
        self.written = 0
        self._encode = msgspec.json.Encoder().encode
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # closed in close()
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def new(self, request_id: str, arrival_perf: float, arrival_cpu: float = 0.0) -> Timeline:
        return Timeline(request_id, arrival_perf, arrival_cpu)

    def write(self, timeline: Timeline, ok: bool, **extra) -> None:
        if self._file is None or self.written >= self.max_records:
            return
        self.written += 1
        try:
            self._file.write(self._encode(timeline.record(ok, **extra)).decode() + "\n")
        except (OSError, ValueError) as exc:  # a full disk must not fail requests
            log.warning("timeline not written", path=self.path, error=str(exc))
            self.close()
            return
        if self.written == self.max_records:
            log.warning("timeline file reached its limit; no more records", path=self.path,
                        records=self.written)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_started) * 1000.0
        if ms >= self.GC_PAUSE_MS and self._file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._file.write(self._encode({"gc": info.get("generation"), "ms": round(ms, 3),
                                               "t": round(time.time(), 6)}).decode() + "\n")

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


def worker_stamp(stamps: dict[str, float] | None, stage: str) -> None:
    """A worker's stamp (unix seconds) into a request's stamps; None (not timed): nothing."""
    if stamps is not None and stage not in stamps:
        stamps[stage] = time.time()
