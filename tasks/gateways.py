"""Talk to the gateways beside S3: read their late-upload counters, nudge their round watch.

Gateways keep no state in S3 for refused uploads, so the round report reads
their Prometheus counters (``canopy_gateway_late_results_total{job=...}``) when
a round opens and when it ends; the difference is the number of late uploads
the fleet sent while the round ran. A gateway that cannot be reached is left
out of both readings rather than failing the round.

After writing a round's pointer the flow nudges every gateway
(``POST /v1/jobs/{job}/wake``, docs/protocol.md): its watch reads the pointer at
once, so devices holding a long poll hear of the round one GET after the write
instead of up to a watch period later. A hint only, sent in the background;
a gateway that misses it reads the pointer on its own schedule.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

import httpx
from prefect import task
from prefect.cache_policies import NONE
from prometheus_client.parser import text_string_to_metric_families

from infra.settings import GatewaySettings
from tasks.context import RunContext

LATE_METRIC = "canopy_gateway_late_results"
WAKE_TIMEOUT_S = 1.0
log = logging.getLogger(__name__)
_waking: set[asyncio.Future[None]] = set()  # nudges in flight (kept referenced until done)


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


async def wake_gateways(settings: GatewaySettings, job: str) -> None:
    """Nudge every gateway's watch of ``job``; failures are logged, never raised."""

    async def one(client: httpx.AsyncClient, url: str) -> None:
        try:
            resp = await client.post(
                f"{url.rstrip('/')}/v1/jobs/{quote(job, safe='')}/wake", timeout=WAKE_TIMEOUT_S
            )
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            log.debug("gateway %s did not take the wake-up for %s: %s", url, job, exc)

    async with httpx.AsyncClient(verify=False) as client:  # internal hint, like /metrics
        await asyncio.gather(*(one(client, u) for u in settings.urls))


def wake_soon(settings: GatewaySettings, job: str) -> None:
    """``wake_gateways`` in the background: the caller (open-round) returns at once."""
    nudge = asyncio.ensure_future(wake_gateways(settings, job))
    _waking.add(nudge)
    nudge.add_done_callback(_waking.discard)
