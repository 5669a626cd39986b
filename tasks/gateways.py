"""Read what only the gateways know: how many uploads they refused as late.

Gateways keep no state in S3 for refused uploads, so the round report reads
their Prometheus counters (``canopy_gateway_late_results_total{job=...}``) when
a round opens and when it ends; the difference is the number of late uploads
the fleet sent while the round ran. A gateway that cannot be reached is left
out of both readings rather than failing the round.
"""

from __future__ import annotations

import asyncio

import httpx
from prefect import task
from prefect.cache_policies import NONE
from prometheus_client.parser import text_string_to_metric_families

from infra.settings import GatewaySettings
from tasks.context import RunContext

LATE_METRIC = "canopy_gateway_late_results"


def late_count(metrics_text: str, job: str) -> float:
    """Pure: the late-results counter for ``job`` in one gateway's /metrics text."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != LATE_METRIC:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("job") == job:
                total += sample.value
    return total


async def read_late_counts(settings: GatewaySettings, job: str) -> dict[str, float]:
    """Late-results counter per reachable gateway URL."""

    async def one(client: httpx.AsyncClient, url: str) -> tuple[str, float | None]:
        try:
            resp = await client.get(f"{url.rstrip('/')}/metrics", timeout=2.0)
            resp.raise_for_status()
        except httpx.HTTPError:
            return url, None
        return url, late_count(resp.text, job)

    async with httpx.AsyncClient(verify=False) as client:  # loopback/internal scrape only
        results = await asyncio.gather(*(one(client, u) for u in settings.urls))
    return {url: value for url, value in results if value is not None}


def late_between(before: dict[str, float], after: dict[str, float]) -> int:
    """Late uploads between two readings, over the gateways seen in both."""
    return int(sum(max(0.0, after[u] - before[u]) for u in before.keys() & after.keys()))


@task(name="read-late-counts", cache_policy=NONE)
async def late_counts(ctx: RunContext) -> dict[str, float]:
    """The gateways' late-upload counters for the job: read as a round opens, and as it
    commits unless the next round opened first (``late_between`` the two readings)."""
    return await read_late_counts(ctx.gateway, ctx.job)
