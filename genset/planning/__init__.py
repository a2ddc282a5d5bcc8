"""The planner's pure core: how many workers each pool (decode, prefill, both) needs.

No I/O and an injected clock, so the same code runs in `services/planner` (live), in tests and
inside `genset replay`. See `core.PlannerCore` for how to feed it and read its decisions.
"""

from genset.planning.core import (
    POLICIES,
    Decision,
    PlannerConfig,
    PlannerCore,
    PoolBounds,
    PoolDecision,
)
from genset.planning.observations import ROLE_BOTH, ROLE_DECODE, ROLE_PREFILL, ROLES
from genset.planning.perf_model import PerfModel, StepTimePrior
from genset.planning.policies import LoadPolicyConfig, SloPolicyConfig

__all__ = [
    "POLICIES",
    "ROLES",
    "ROLE_BOTH",
    "ROLE_DECODE",
    "ROLE_PREFILL",
    "Decision",
    "LoadPolicyConfig",
    "PerfModel",
    "PlannerConfig",
    "PlannerCore",
    "PoolBounds",
    "PoolDecision",
    "SloPolicyConfig",
    "StepTimePrior",
]
