"""What a worker does with requests: its role, and the role it registers under.

- `decode`: serves generate streams, prefilling locally (today's aggregated worker; the
  default). Disaggregation will let it decode after a remote prefill when that pays.
- `prefill`: computes a prompt's KV and ships it to the decode worker that continues
  (the `after_prefill` hook); routers never send it ordinary traffic.
- `both`: prefills and decodes every request itself, never remote (aggregated). Registers
  as `decode`, so routers and frontends treat it exactly as today's workers.
"""

from __future__ import annotations

from proto.values import ROLE_BOTH, ROLE_DECODE, ROLE_PREFILL
from proto.values import ROLES as WORKER_ROLES

__all__ = ["ROLE_BOTH", "ROLE_DECODE", "ROLE_PREFILL", "WORKER_ROLES", "registered_role"]


def registered_role(role: str) -> str:
    """The role named in a worker's records, subjects and `ModelCard.role` (what routers
    filter on): `both` is registered as `decode`."""
    if role not in WORKER_ROLES:
        raise ValueError(f"unknown worker role {role!r} (use {', '.join(WORKER_ROLES)})")
    return ROLE_DECODE if role == ROLE_BOTH else role
