"""Prometheus metrics of one gateway process, served at ``/metrics``.

Each app gets its own ``CollectorRegistry`` (not the global default) so several
gateways in one test process do not share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    """Counters and histograms a fleet operator watches."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.enrolments = Counter("canopy_gateway_enrolments", "Devices enrolled.", registry=r)
        self.identity_mismatches = Counter(
            "canopy_gateway_identity_mismatches",
            "Enrolments refused: the device id is bound to another key.",
            registry=r,
        )
        self.poll_answers = Counter(
            "canopy_gateway_poll_answers",
            "Answers to task polls, by answer (task, retry reason, no_job, done).",
            ["answer"],
            registry=r,
        )
        self.tasks_served = Counter(
            "canopy_gateway_tasks_served", "Task offers sent to devices.", ["job"], registry=r
        )
        self.model_downloads = Counter(
            "canopy_gateway_model_downloads", "Model artifact downloads.", ["format"], registry=r
        )
        self.results_accepted = Counter(
            "canopy_gateway_results_accepted",
            "Updates durably written to S3 and acknowledged.",
            ["job"],
            registry=r,
        )
        self.results_duplicate = Counter(
            "canopy_gateway_results_duplicate",
            "Repeated uploads of an already accepted result (answered, not stored twice).",
            registry=r,
        )
        self.results_rejected = Counter(
            "canopy_gateway_results_rejected",
            "Uploads refused, by error code (late results included as 'late').",
            ["reason"],
            registry=r,
        )
        self.late_results = Counter(
            "canopy_gateway_late_results",
            "Uploads for a task or model version that is no longer current (not aggregated).",
            ["job"],
            registry=r,
        )
        self.errors = Counter(
            "canopy_gateway_errors",
            "Error answers by HTTP status and code.",
            ["status", "code"],
            registry=r,
        )
        self.bytes_in = Counter("canopy_gateway_bytes_in", "Request body bytes.", registry=r)
        self.bytes_out = Counter("canopy_gateway_bytes_out", "Response body bytes.", registry=r)
        self.request_seconds = Histogram(
            "canopy_gateway_request_seconds",
            "Request latency by route template and method.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_writes = Counter(
            "canopy_gateway_batch_writes", "Update batches written to S3.", registry=r
        )
        self.batch_failures = Counter(
            "canopy_gateway_batch_failures", "Update batch writes that failed.", registry=r
        )
        self.batch_fenced = Counter(
            "canopy_gateway_batch_fenced",
            "Update batches written but not acknowledged: the round closed during the write.",
            registry=r,
        )
        self.batch_size = Histogram(
            "canopy_gateway_batch_updates",
            "Device updates per group-committed batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_write_seconds = Histogram(
            "canopy_gateway_batch_write_seconds",
            "Time to encode and PUT one update batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pending_updates = Gauge(
            "canopy_gateway_pending_updates",
            "Accepted updates waiting for their batch write.",
            registry=r,
        )
