"""Prometheus metrics of disaggregation: every prefill decision with its reason, and every KV
transfer with its outcome, size and time. Labels come from fixed sets (decision reasons,
transfer error codes; anything else a peer reports counts as "other"), so a hostile or buggy
peer cannot grow the label space. The worker's, not the replay's: this module (unlike the rest
of genset.disagg) imports the Prometheus client and the transfer hub."""

from __future__ import annotations

from genset.disagg.decision import LOCAL, REASONS, REMOTE, Decision
from genset.runtime.metrics import Metrics
from genset.transfer.errors import CODES, TransferError
from genset.transfer.hub import NATS, TCP, TransferResult

_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0)
# The resume gap's stages are tens of ms: 5 ms steps to 200 ms, so a bench can read p50/p99
# off the buckets (bench/bench_disagg_mixed.py)
_RESUME_BUCKETS = (*(i / 1000 for i in range(5, 205, 5)), 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0)
# genset_disagg_resume_seconds{stage}: a remote prefill's first token sent -> the KV complete
# (every block in and imported) -> the request submitted to the engine -> its next token out
RESUME_STAGES = ("kv", "submit", "step", "total")


class DisaggMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.decisions = metrics.counter(
            "disagg_decisions_total", "Prefill decisions: where and why", ("mode", "reason"))
        self.transfers = metrics.counter(
            "kv_transfers_total", "KV transfers ended, by side, transport and outcome (ok or "
            "the error code)", ("side", "transport", "outcome"))
        self.transfer_bytes = metrics.counter(
            "kv_transfer_bytes_total", "KV bytes moved by finished transfers",
            ("side", "transport"))
        self.transfer_seconds = metrics.histogram(
            "kv_transfer_seconds", "Duration of finished KV transfers (header to ack)",
            ("side", "transport"), buckets=_TRANSFER_BUCKETS)
        self.tcp_fallbacks = metrics.counter(
            "kv_transfer_tcp_fallbacks_total", "Transfers that went over NATS because the "
            "receiver's TCP endpoint could not be reached")
        self.tcp_untrusted = metrics.counter(
            "kv_transfer_tcp_untrusted_total", "Sends that went over NATS because the target's "
            "TCP endpoint was not the one its decode worker publishes in its InstanceRecord "
            "(another address, or a record not seen yet)")
        self.pins_expired = metrics.counter(
            "kv_pins_expired_total", "Exported blocks unpinned by their deadline, not an ack")
        self.bandwidth = metrics.gauge(
            "kv_transfer_bandwidth_bytes_per_second", "Estimated KV transfer bandwidth the "
            "prefill decision uses")
        self.fallbacks = metrics.counter(
            "disagg_fallbacks_total", "Remote prefills given up on, by stage (first_token: the "
            "request ran aggregated; transfer: the prompt was recomputed here after the remote "
            "first token) and reason", ("stage", "reason"))
        self.remote_done = metrics.counter(
            "disagg_remote_prefills_total", "Remote prefills whose KV this decode worker "
            "imported and continued from")
        self.tails = metrics.counter(
            "disagg_kv_tails_total", "Remote prefills whose first-token reply carried the "
            "prompt's last partial block, handed to this decode worker's engine with the "
            "import (it computes those tokens only if a full block went missing)")
        self.served = metrics.counter(
            "disagg_prefills_served_total", "Remote-prefill requests this prefill worker "
            "answered, by outcome (ok, or the error code it refused with)", ("outcome",))
        self.resume = metrics.histogram(
            "disagg_resume_seconds", "A remote prefill's resume gap on the decode worker, by "
            "stage: kv (first token sent to the KV complete), submit (to the request handed to "
            "the engine), step (to its next token), total (first token sent to the next); "
            "prompt: long when its transfer carried >= 64 blocks", ("stage", "prompt"),
            buckets=_RESUME_BUCKETS)
        self.pipelined = metrics.counter(
            "kv_blocks_pipelined_total", "Blocks a prefill worker's sends took on (read, or "
            "put on the modelled link) before the prefill had ended: the transfer pipelined "
            "with the prefill's later chunks")
        self.pinned = metrics.gauge(
            "kv_pinned_transfers", "Transfers whose exported blocks this worker holds pinned")
        for stage in RESUME_STAGES:
            for size in ("short", "long"):
                self.resume.labels(stage, size)
        for mode in (LOCAL, REMOTE):  # every series exists from the start
            for reason in REASONS:
                self.decisions.labels(mode, reason)

    def decision(self, d: Decision) -> None:
        self.decisions.labels(d.mode, d.reason).inc()

    def transfer(self, side: str, transport: str, result: TransferResult | None = None,
                 error: BaseException | None = None) -> None:
        """One ended transfer: `result` when it succeeded, else the error it failed with."""
        transport = transport if transport in (NATS, TCP) else "none"
        if result is not None:
            self.transfers.labels(side, transport, "ok").inc()
            self.transfer_bytes.labels(side, transport).inc(result.bytes)
            self.transfer_seconds.labels(side, transport).observe(result.seconds)
            if result.fallback:
                self.tcp_fallbacks.inc()
            return
        code = error.code if isinstance(error, TransferError) else "other"
        self.transfers.labels(side, transport, code if code in CODES else "other").inc()

    def fallback(self, stage: str, reason: str) -> None:
        """A remote prefill given up on (`stage`: first_token | transfer)."""
        reason = reason if reason in FALLBACK_REASONS else "other"
        self.fallbacks.labels(stage, reason).inc()


# Why a remote prefill was given up on: a transfer's error code, or what went wrong asking
# the prefill worker (labels from this fixed set; anything else counts as "other").
FALLBACK_REASONS = (*CODES, "no_responders", "timeout", "remote_error", "overloaded",
                    "prefill_gone", "disconnected", "bad_reply", "other")
