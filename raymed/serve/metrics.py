"""Prometheus figures for `/metrics`: the ingress's own, plus every model replica's.

Each model replica pushes a snapshot of its engine counters (queue depth, running rows,
batch-size histogram, tokens, cancellations) to one `MetricsStore` (a small Serve
deployment) every half second while it works and every few seconds while idle. The
ingress renders the ingress figures and the stored snapshots, labelled `replica`, so one
scrape of `/metrics` covers every replica, autoscaled ones included. A replica that stops
reporting (scaled down) drops out after `STALE_AFTER_S`.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from raymed.serve.engine import BATCH_SIZE_BUCKETS

disable_created_metrics()  # no `_created` series: they double the output and nobody reads them

STALE_AFTER_S = 30.0
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class MetricsStore:
    """The latest snapshot from each model replica (the body of a Serve deployment)."""

    def __init__(self):
        self._latest: dict[str, tuple[float, dict]] = {}

    def report(self, replica: str, snapshot: dict) -> None:
        self._latest[replica] = (time.monotonic(), snapshot)

    def snapshots(self) -> dict[str, dict]:
        now = time.monotonic()
        self._latest = {r: (t, s) for r, (t, s) in self._latest.items() if now - t < STALE_AFTER_S}
        return {replica: snapshot for replica, (_, snapshot) in self._latest.items()}


class IngressMetrics:
    """What the ingress itself measures: requests by route and status, latencies, tokens."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("raymed_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("raymed_request_latency_seconds", "End-to-end latency of generation requests",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("raymed_time_to_first_token_seconds", "Time to the first generated token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("raymed_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("raymed_completion_tokens", "Generated tokens of finished requests",
                                         registry=self.registry)
        self.cancelled = Counter("raymed_requests_cancelled", "Streams whose client went away before the end",
                                 ["route"], registry=self.registry)

    def render(self, replica_snapshots: dict[str, dict]) -> bytes:
        replicas = CollectorRegistry(auto_describe=False)
        replicas.register(_ReplicaCollector(replica_snapshots))
        return generate_latest(self.registry) + generate_latest(replicas)


class _ReplicaCollector:
    """Prometheus families built from the replicas' snapshots (raymed.serve.engine.EngineStats)."""

    GAUGES = {
        "waiting": ("raymed_replica_queue_depth", "Requests on the replica waiting to join its batch"),
        "running": ("raymed_replica_running", "Sequences in the replica's running batch"),
    }
    COUNTERS = {
        "prefills": ("raymed_replica_prefills", "Prefill steps (newcomers joining the batch)"),
        "decode_steps": ("raymed_replica_decode_steps", "Decode steps"),
        "prompt_tokens": ("raymed_replica_prompt_tokens", "Prompt tokens prefilled"),
        "generated_tokens": ("raymed_replica_generated_tokens", "Tokens generated"),
        "cancelled": ("raymed_replica_cancelled", "Requests cancelled (client gone or timed out)"),
        "step_seconds": ("raymed_replica_busy_seconds", "Seconds spent in model steps"),
    }

    def __init__(self, snapshots: dict[str, dict]):
        self.snapshots = snapshots

    def collect(self):
        for key, (name, doc) in self.GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["replica"])
            for replica, snap in self.snapshots.items():
                family.add_metric([replica], snap[key])
            yield family
        for key, (name, doc) in self.COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["replica"])
            for replica, snap in self.snapshots.items():
                family.add_metric([replica], snap[key])
            yield family
        finished = CounterMetricFamily("raymed_replica_finished", "Requests finished, by reason",
                                       labels=["replica", "reason"])
        batch = HistogramMetricFamily("raymed_replica_batch_size", "Rows per decode step", labels=["replica"])
        for replica, snap in self.snapshots.items():
            for reason, count in snap["finished"].items():
                finished.add_metric([replica, reason], count)
            buckets = [(str(b), n) for b, n in zip(BATCH_SIZE_BUCKETS, snap["batch_size_buckets"])]
            batch.add_metric([replica], [*buckets, ("+Inf", snap["decode_steps"])], snap["batch_size_sum"])
        yield finished
        yield batch
