"""Disaggregated serving's pure parts, shared by the worker and the offline replay: the
per-request local/remote prefill decision (decision.py), the learnt transfer bandwidth
(bandwidth.py), and the mocker's roles and modelled transfer time (sim.py)."""

from genset.disagg.bandwidth import BandwidthEstimator
from genset.disagg.decision import (
    LOCAL,
    REASONS,
    REMOTE,
    CostModel,
    Decision,
    DecodeState,
    PrefillState,
    SpareGate,
    decide,
)
from genset.disagg.sim import DisaggSimConfig, role_behaviour, transfer_ms

__all__ = [
    "LOCAL",
    "REASONS",
    "REMOTE",
    "BandwidthEstimator",
    "CostModel",
    "Decision",
    "DecodeState",
    "DisaggSimConfig",
    "PrefillState",
    "SpareGate",
    "decide",
    "role_behaviour",
    "transfer_ms",
]
