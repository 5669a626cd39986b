"""Round reports count late uploads from the gateways' Prometheus counters."""

from __future__ import annotations

from prometheus_client import generate_latest

from edge.gateway.metrics import GatewayMetrics
from tasks.gateways import late_between, late_count


def test_late_count_reads_one_job_from_real_gateway_metrics() -> None:
    metrics = GatewayMetrics()
    metrics.late_results.labels(job="xor-mobile").inc(3)
    metrics.late_results.labels(job="hello-mobile").inc()
    text = generate_latest(metrics.registry).decode()
    assert late_count(text, "xor-mobile") == 3
    assert late_count(text, "cifar10-mobile") == 0


def test_late_between_uses_gateways_seen_in_both_readings() -> None:
    before = {"http://a": 2.0, "http://b": 5.0}
    after = {"http://a": 6.0, "http://c": 9.0}  # b unreachable now, c was unreachable before
    assert late_between(before, after) == 4
    assert late_between({}, after) == 0
