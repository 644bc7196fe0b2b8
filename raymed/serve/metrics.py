"""Prometheus figures for `/metrics`: the ingress's own, plus every model replica's.

Each model replica pushes a snapshot of its engine counters (queue depth, running rows,
batch-size histogram, tokens, cancellations) to one `MetricsStore` (a small Serve
deployment) every half second while it works and every few seconds while idle; so does
each Gateway replica with its ingress figures. The Gateway replica that answers a scrape
renders the ingress figures summed over the Gateway replicas (its own live, the others' as
last pushed) and the model replicas' snapshots, labelled `replica`, so one scrape of
`/metrics` covers every replica, autoscaled ones included. A replica that stops reporting
(scaled down) drops out after `STALE_AFTER_S`.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from raymed.serve.engine import BATCH_SIZE_BUCKETS

disable_created_metrics()  # no `_created` series: they double the output and nobody reads them

STALE_AFTER_S = 30.0
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class MetricsStore:
    """The latest snapshot from each model replica and the latest ingress figures from each
    Gateway replica (the body of a Serve deployment)."""

    def __init__(self):
        self._latest: dict[str, tuple[float, dict]] = {}
        self._ingress: dict[str, tuple[float, list[Metric]]] = {}

    def report(self, replica: str, snapshot: dict) -> None:
        self._latest[replica] = (time.monotonic(), snapshot)

    def snapshots(self) -> dict[str, dict]:
        self._latest = _fresh(self._latest)
        return {replica: snapshot for replica, (_, snapshot) in self._latest.items()}

    def report_ingress(self, gateway: str, families: list[Metric]) -> None:
        self._ingress[gateway] = (time.monotonic(), families)

    def ingress(self, besides: str) -> list[list[Metric]]:
        """The ingress figures of every Gateway replica but `besides` (the one asking)."""
        self._ingress = _fresh(self._ingress)
        return [families for gateway, (_, families) in self._ingress.items() if gateway != besides]


def _fresh(reports: dict[str, tuple[float, object]]) -> dict[str, tuple[float, object]]:
    now = time.monotonic()
    return {source: (at, report) for source, (at, report) in reports.items() if now - at < STALE_AFTER_S}


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

    def families(self) -> list[Metric]:
        """This ingress's figures as Prometheus families (what other Gateway replicas add in)."""
        return list(self.registry.collect())

    def render(self, replica_snapshots: dict[str, dict], other_gateways: list[list[Metric]] = ()) -> bytes:
        """The exposition text: the ingress figures summed with `other_gateways`' (each a
        `families()`), then the model replicas' figures."""
        ingress, replicas = CollectorRegistry(auto_describe=False), CollectorRegistry(auto_describe=False)
        ingress.register(_SummedCollector([self.families(), *other_gateways]))
        replicas.register(_ReplicaCollector(replica_snapshots))
        return generate_latest(ingress) + generate_latest(replicas)


class _SummedCollector:
    """Families of the same names from several sources, each sample (name and labels) summed:
    counters and histogram buckets add up across Gateway replicas."""

    def __init__(self, sources: list[list[Metric]]):
        self.sources = sources

    def collect(self):
        merged: dict[str, tuple[Metric, dict]] = {}
        for families in self.sources:
            for family in families:
                into, sums = merged.setdefault(family.name, (Metric(family.name, family.documentation, family.type,
                                                                    family.unit), {}))
                for sample in family.samples:
                    key = (sample.name, tuple(sample.labels.items()))
                    sums[key] = sums.get(key, 0.0) + sample.value
        for into, sums in merged.values():
            for (name, labels), value in sums.items():
                into.add_sample(name, dict(labels), value)
            yield into


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
