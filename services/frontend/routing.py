"""Choosing the frontend's router: `genset.routing.api.create_router` for the mode given by
`--router` (see `genset.routing.api.ROUTER_MODES`), with `auto` resolved here.

Every mode gives the same `Router` protocol (route / on_first_token / on_done), so the pipeline
never cares which one it got. The baselines (`--router round-robin`, `least-loaded`, ...) are
the routing library's policies run embedded, the same code the router service and the replay
run.

Embedded (`genset up`'s default with one frontend: it passes `--router embedded`), a request
for a model the registry lists but the router has no worker of yet waits for one to join
(`WORKER_WAIT_S`) instead of failing: see `genset.routing.embedded.EmbeddedRouter`.

With the router service (`service`, or `auto` finding one), the frontend keeps the same policy
embedded and warm beside it (`fallback`, on by default): while no router answers within
`timeout` seconds (crashed, restarting, hung, none started) requests are routed here instead of
failing, `genset_frontend_router_fallback` is 1, and the first answer from a router switches
back (`genset.routing.remote`).
"""

from __future__ import annotations

import structlog

from genset.routing.api import (
    DEFAULT_ROUTE_TIMEOUT_S,
    MODE_AUTO,
    MODE_EMBEDDED,
    MODE_SERVICE,
    create_router,
    router_mode,
)
from proto import keys

log = structlog.get_logger("frontend.routing")

# How long a request waits in the embedded router for a worker of its model to join when the
# model registry lists one the router's own etcd watch has not delivered yet (the two watches
# are apart by milliseconds; seconds on an overloaded etcd). Bounded so a worker that never
# shows up here costs a request this much, then a 503 "no worker".
WORKER_WAIT_S = 5.0


async def create(mode: str, *, bus, discovery, namespace: str,
                 route_timeout: float = DEFAULT_ROUTE_TIMEOUT_S, fallback: bool = True,
                 metrics=None, local_first: bool = True):
    """`mode`: a router mode in any accepted spelling. auto = service when a router service is
    registered in etcd, else embedded. `route_timeout` (seconds) and `fallback` apply to the service;
    `metrics` (the service's `genset.runtime.metrics.Metrics`) gets the fallback's metrics."""
    mode = router_mode(mode)
    if mode == MODE_AUTO:
        routers = await discovery.get_prefix(keys.instances_prefix(namespace, "router"))
        mode = MODE_SERVICE if routers else MODE_EMBEDDED
    if mode == MODE_SERVICE:
        router = create_router(mode, bus=bus, namespace=namespace, discovery=discovery,
                               timeout=route_timeout, fallback=fallback, metrics=metrics,
                               caller_reports=True, local_first=local_first)
    else:
        # caller_reports: the pipeline tells an embedded router of first token / done itself
        router = create_router(mode, bus=bus, namespace=namespace, discovery=discovery,
                               caller_reports=True, wait_for_worker_s=WORKER_WAIT_S)
    log.info("router", mode=mode, **({"timeout_s": route_timeout, "fallback": fallback,
                                      "local_first": local_first and fallback}
                                     if mode == MODE_SERVICE else {}))
    return router
