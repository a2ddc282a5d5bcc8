"""The worker's Prometheus metrics (names get the genset_ prefix)."""

from __future__ import annotations


class WorkerMetrics:
    def __init__(self, metrics) -> None:
        self.started = metrics.counter("worker_requests_started", "generate requests accepted")
        self.finished = metrics.counter(
            "worker_requests_finished",
            "generate requests ended, by reason (stop, length, cancelled, deadline, error, drain)",
            ["reason"])
        self.cancelled = metrics.counter(
            "worker_requests_cancelled", "generate requests cancelled by the requester")
        self.rejected = metrics.counter(
            "worker_requests_rejected", "generate requests refused, by error code", ["code"])
        self.tokens = metrics.counter("worker_generated_tokens", "output tokens generated")
        self.prompt_tokens = metrics.counter("worker_prompt_tokens", "prompt tokens received")
        self.cached_tokens = metrics.counter(
            "worker_cached_prompt_tokens", "prompt tokens served from the prefix cache")
        self.running = metrics.gauge("worker_requests_running", "generate streams in progress")
        self.kv_usage = metrics.gauge("worker_kv_usage", "fraction of KV blocks in use (0-1)")
        self.kv_used = metrics.gauge("worker_kv_used_blocks", "KV blocks in use")
        self.kv_total = metrics.gauge("worker_kv_total_blocks", "KV capacity in blocks")
        self.waiting = metrics.gauge("worker_requests_waiting", "requests queued in the engine")
        self.kv_batches = metrics.counter("worker_kv_event_batches", "KV event batches published")
        self.kv_resyncs = metrics.counter("worker_kv_resyncs", "KV snapshots sent on request")
        self.bad_messages = metrics.counter(
            "worker_bad_messages", "malformed or invalid bus messages received", ["subject"])
        self.hook_errors = metrics.counter(
            "worker_hook_errors", "worker hooks that raised or overran, by hook", ["hook"])
