"""The ingress figures of several Gateway replicas add up in one scrape (no Ray: the
MetricsStore and IngressMetrics objects themselves, their figures pickled as Ray sends them)."""

from __future__ import annotations

import pickle

from raymed.serve import metrics
from raymed.serve.metrics import IngressMetrics, MetricsStore


def _sample(text: str, series: str) -> float:
    values = [float(line.rpartition(" ")[2]) for line in text.splitlines() if line.rpartition(" ")[0] == series]
    assert len(values) == 1, (series, values)
    return values[0]


def _requests(families) -> float:
    return sum(sample.value for family in families if family.name == "raymed_requests"
               for sample in family.samples if sample.name == "raymed_requests_total")


def test_counters_and_histograms_sum_over_gateway_replicas():
    mine, other = IngressMetrics(), IngressMetrics()
    mine.requests.labels("chat", "200").inc(2)
    other.requests.labels("chat", "200").inc(3)
    other.requests.labels("models", "200").inc()
    mine.latency.labels("chat").observe(0.2)
    other.latency.labels("chat").observe(3)
    other.completion_tokens.inc(7)
    text = mine.render({}, [pickle.loads(pickle.dumps(other.families()))]).decode()
    assert _sample(text, 'raymed_requests_total{route="chat",status="200"}') == 5
    assert _sample(text, 'raymed_requests_total{route="models",status="200"}') == 1
    assert _sample(text, 'raymed_request_latency_seconds_bucket{le="0.25",route="chat"}') == 1
    assert _sample(text, 'raymed_request_latency_seconds_bucket{le="5.0",route="chat"}') == 2
    assert _sample(text, 'raymed_request_latency_seconds_count{route="chat"}') == 2
    assert _sample(text, "raymed_completion_tokens_total") == 7
    assert text.count("# TYPE raymed_requests_total counter") == 1


def test_the_store_gives_the_other_gateways_figures_while_they_are_fresh(monkeypatch):
    store, now = MetricsStore(), [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    first, second = IngressMetrics(), IngressMetrics()
    first.requests.labels("chat", "200").inc()
    second.requests.labels("chat", "200").inc(4)
    store.report_ingress("a", first.families())
    store.report_ingress("b", second.families())
    assert [_requests(families) for families in store.ingress("a")] == [4]
    assert sorted(_requests(families) for families in store.ingress("nobody")) == [1, 4]
    now[0] += metrics.STALE_AFTER_S
    assert store.ingress("nobody") == []
