"""structlog setup shared by every service.

JSON lines (one object per line, to stderr) for services, a readable console renderer on a
terminal. Every line carries `service` and `instance`; anything bound with `bind_request` (a
request id, typically) rides along on every line logged by the same asyncio task and the
tasks it starts, because it lives in contextvars. Standard-library loggers (nats, grpc,
uvicorn, asyncio) are routed through the same renderer so a service emits one format.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


def _resolve_format(fmt: str, stream) -> str:
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format {fmt!r} is not one of: auto, json, console")
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return "console" if isatty is not None and isatty() else "json"
    return fmt


def configure_logging(fmt: str = "auto", level: str = "info", *, service: str,
                      instance_id: int | None = None, stream=None) -> None:
    """Configure structlog and the standard logging module for this process.

    fmt: "json" | "console" | "auto" (console when `stream` is a terminal).
    level: debug | info | warning | error | critical.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of: {', '.join(LEVELS)}")
    stream = sys.stderr if stream is None else stream
    fmt = _resolve_format(fmt, stream)
    numeric = LEVELS[level.lower()]

    fixed: dict[str, Any] = {"service": service}
    if instance_id is not None:
        fixed["instance"] = f"{instance_id:x}"

    def add_identity(_logger, _name, event_dict):
        for key, value in fixed.items():
            event_dict.setdefault(key, value)
        return event_dict

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_identity,
    ]
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer()
        # In JSON the traceback becomes a string field instead of a multi-line dump.
        shared = [*shared, structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=getattr(stream, "isatty", lambda: False)(),
            exception_formatter=structlog.dev.plain_traceback)  # compact, no locals dump

    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.ExtraAdder(),
            *shared,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # Libraries that are chatty at INFO; their warnings still come through.
    for noisy in ("asyncio", "grpc", "aetcd", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


@contextlib.contextmanager
def bind_request(request_id: str | None = None, **fields: Any) -> Iterator[None]:
    """Bind a request id (and any other fields) to every log line in this context."""
    if request_id is not None:
        fields["request_id"] = request_id
    with structlog.contextvars.bound_contextvars(**fields):
        yield


def get_logger(name: str | None = None, **initial: Any):
    return structlog.get_logger(name, **initial)


class LogThrottle:
    """When a repeated failure is worth a log line: the first one, then at most one every
    `every_s` seconds, each standing for the failures since the line before (pure; the clock
    is injected). Thread-safe."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: float | None = None
        self._count = 0
        self._lock = threading.Lock()

    def hit(self) -> int:
        """Count one failure; how many failures to log now (this one and those not logged
        since the last line), or 0: stay quiet."""
        with self._lock:
            self._count += 1
            now = self.clock()
            if self._last is not None and now - self._last < self.every_s:
                return 0
            self._last = now
            n, self._count = self._count, 0
            return n
