"""Prefect process workers of the ``edge`` work pool: how the stack starts them and knows them up.

In production a worker runs beside each gateway (``prefect worker start --pool
edge --type process``), so a leaf's collection reads its gateways' batches from
nearby and only its outcome crosses to the central flow. Locally ``canopy up
--edge-workers N`` and the tests start N of them on this machine. Each worker
starts one fresh process per leaf run (``flows.edge_leaf``), with the worker's
environment: ``PREFECT_API_URL`` and the ``CANOPY_S3_*`` settings.

The worker polls for scheduled runs every ``WORKER_QUERY_SECONDS``; Prefect's
default (10 s) would be most of a round's leaf level, and one small read of the
API twice a second costs a local server nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

EDGE_POOL = "edge"
WORKER_QUERY_SECONDS = 0.5
WORKER_TUNING = {
    "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_SECONDS),
    "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    # flow-run subprocesses log to the API as the central flow does, with no console noise
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def worker_name(index: int) -> str:
    """The name of the stack's ``index``-th edge worker (how the API lists it)."""
    return f"edge-worker-{index}"


def register_command(pool: str = EDGE_POOL) -> list[str]:
    """Create ``pool`` if absent and (re-)apply the ``edge-leaf`` deployment on it, as one
    short process (``python -m flows.edge_leaf``) with the caller's ``PREFECT_API_URL``."""
    return [sys.executable, "-m", "flows.edge_leaf", "--pool", pool]


def worker_command(name: str, pool: str = EDGE_POOL) -> list[str]:
    """``prefect worker start`` for one process worker of ``pool``, in this interpreter."""
    prefect = str(Path(sys.executable).parent / "prefect")
    return [prefect, "worker", "start", "--pool", pool, "--type", "process", "--name", name]


def worker_env(base: Mapping[str, str], api_url: str) -> dict[str, str]:
    """A worker's whole environment: ``base`` (with ``CANOPY_S3_*``), the API and the tuning."""
    return {**base, **WORKER_TUNING, "PREFECT_API_URL": api_url}


def online_workers(api_url: str, pool: str = EDGE_POOL) -> set[str]:
    """Names of ``pool``'s workers the API reports online (none if the pool is absent)."""
    resp = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=5.0)
    if resp.status_code != 200:
        return set()
    return {w["name"] for w in resp.json() if w.get("status") == "ONLINE"}


def workers_online(api_url: str, names: Sequence[str], pool: str = EDGE_POOL) -> Callable[[], bool]:
    """A check, for ``wait_until``: every named worker has sent the API a heartbeat."""

    def check() -> bool:
        try:
            return set(names) <= online_workers(api_url, pool)
        except httpx.HTTPError:
            return False

    return check
