"""The planner's Prometheus metrics: every decision's numbers, exported."""

from __future__ import annotations

from genset.planning import Decision


class PlannerMetrics:
    def __init__(self, metrics) -> None:
        m = metrics
        self.target = m.gauge("planner_target_workers", "Workers the planner wants per pool",
                              ["pool"])
        self.ready = m.gauge("planner_ready_workers", "Registered workers per pool", ["pool"])
        self.starting = m.gauge("planner_starting_workers",
                                "Workers asked for and not registered yet", ["pool"])
        self.draining = m.gauge("planner_draining_workers", "Workers being drained", ["pool"])
        self.events = m.counter("planner_scale_events", "Pool changes decided",
                                ["pool", "action"])
        self.kv_usage = m.gauge("planner_kv_usage", "Mean KV use of a pool's workers", ["pool"])
        self.queue = m.gauge("planner_waiting_prefill_tokens",
                             "Prompt tokens waiting for prefill in a pool", ["pool"])
        self.rate = m.gauge("planner_arrival_rate",
                            "Requests per second: observed (last bucket), smoothed, forecast",
                            ["kind"])
        self.ttft = m.gauge("planner_ttft_ms", "Mean TTFT: observed and predicted by the model",
                            ["kind"])
        self.itl = m.gauge("planner_itl_ms", "Mean ITL: observed and predicted by the model",
                           ["kind"])
        self.startup = m.gauge("planner_startup_seconds",
                               "Worker start-up time the planner plans ahead of")
        self.stale = m.gauge("planner_inputs_stale", "1 while the planner holds for lack of data")
        self.applies = m.counter("planner_connector_applies", "Changes handed to the connector",
                                 ["connector", "outcome"])
        self.etcd_writes = m.counter("planner_target_writes", "Target records written to etcd",
                                     ["outcome"])
        self.bad = m.counter("planner_bad_messages", "Messages that failed to decode", ["kind"])
        self.ignored = m.counter("planner_ignored_messages",
                                 "Messages that decoded but were not used", ["kind", "reason"])

    def record(self, d: Decision) -> None:
        stale = 0.0
        for role, p in d.pools.items():
            self.target.labels(role).set(p.target)
            self.ready.labels(role).set(p.ready)
            self.starting.labels(role).set(p.starting + p.start)
            self.draining.labels(role).set(p.draining + len(p.drain))
            if p.changed:
                self.events.labels(role, p.action).inc()
            if p.action == "hold" and p.reason.startswith("holding"):
                stale = 1.0
            self.kv_usage.labels(role).set(d.inputs.get(f"{role}.kv_usage", 0.0))
            self.queue.labels(role).set(d.inputs.get(f"{role}.queue_tokens", 0.0))
        self.stale.set(stale)
        i = d.inputs
        self.rate.labels("observed").set(i.get("rate_observed", 0.0))
        self.rate.labels("smoothed").set(i.get("rate", 0.0))
        self.rate.labels("forecast").set(i.get("rate_forecast", 0.0))
        self.startup.set(i.get("startup_s", 0.0))
        for gauge, name in ((self.ttft, "ttft"), (self.itl, "itl")):
            for kind in ("observed", "predicted"):
                v = i.get(f"{name}_{kind}_ms")
                if v is not None:
                    gauge.labels(kind).set(v)
