"""Choosing the frontend's router: `genset.routing.api.create_router` for the mode given by
`--router` (see `genset.routing.api.ROUTER_MODES`), with `auto` resolved here.

Every mode gives the same `Router` protocol (route / on_first_token / on_done), so the pipeline
never cares which one it got. The baselines (`--router round-robin`, `least-loaded`, ...) are
the routing library's policies run embedded, the same code the router service and the replay
run.
"""

from __future__ import annotations

import structlog

from genset.routing.api import MODE_AUTO, MODE_EMBEDDED, MODE_SERVICE, create_router, router_mode
from proto import keys

log = structlog.get_logger("frontend.routing")


async def create(mode: str, *, bus, discovery, namespace: str):
    """`mode`: a router mode in any accepted spelling. auto = service when a router service is
    registered in etcd, else embedded."""
    mode = router_mode(mode)
    if mode == MODE_AUTO:
        routers = await discovery.get_prefix(keys.instances_prefix(namespace, "router"))
        mode = MODE_SERVICE if routers else MODE_EMBEDDED
    router = create_router(mode, bus=bus, namespace=namespace, discovery=discovery)
    log.info("router", mode=mode)
    return router
