"""Per-process knobs of a gateway that are not fleet settings (``GatewaySettings``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayTuning:
    """Defaults suit most deployments; tests and benchmarks shrink or stretch them."""

    registry_cache_seconds: float = 300.0  # how long "device X is enrolled for job J" is trusted
    unknown_device_cache_seconds: float = 2.0  # how long "not enrolled" is trusted
    no_job_retry_seconds: float = 5.0
    long_poll_max_seconds: float = 25.0  # the longest a poll may wait (?wait=); under proxies' 30 s
    watch_interval_seconds: float = 0.1  # how often a watched job's round is re-read (one GET)
    # ... and how often in the first seconds after a close, when the next open is imminent
    # and the phones of the next round wait for it (edge.gateway.watch.next_read_in)
    watch_soon_interval_seconds: float = 0.05
    watch_soon_window_seconds: float = 10.0
    # reads a nudge (POST /v1/jobs/{job}/wake) may cause: at most one per this, per job
    watch_min_gap_seconds: float = 0.02
    # A leaf's task manifest never changes for one opening of a round (a redone round is a
    # new opening, with a new opened_at), so it is kept for the round's life, not re-read.
    leaf_task_cache_seconds: float = 3600.0
    recent_results: int = 100_000  # (task, device) pairs remembered for duplicate answers
    artifact_cache_bytes: int = 512 * 1024 * 1024
    io_threads: int = 16  # S3 calls and large tensor checks run here, off the event loop
    inline_check_bytes: int = 256 * 1024  # smaller updates are checked on the loop (no hop)
    body_budget_bytes: int = 256 * 1024 * 1024  # upload bodies held at once (then 503)
    # How long a batch waits for company when no other upload of its leaf is arriving
    # (group_commit_max_wait_ms when some are; edge.gateway.batch_policy)
    group_commit_idle_wait_seconds: float = 0.02
