"""A federated evaluation through the real stack: Prefect server, moto, two gateways, and
simulated phones in their own process that see only the public protocol.

Every ``eval_every`` rounds the round reopens with evaluate tasks once its new
global model exists; phones evaluate it on data they never trained on and post
metrics only. Their sums must reach the round report beside the server's
evaluation, the Prefect round artifact and ``canopy report``'s table.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from rich.console import Console

from edge.update_batch import decode_update_batch
from infra.keys import device_evaluation_key, device_evaluation_prefix
from infra.lineage import read_lineage
from infra.round_table import RoundTable
from infra.store import get_json
from tasks.ui import artifact_key
from tests.support.stack import ALWAYS_ON, LocalStack, run_flow, small_run

pytestmark = pytest.mark.slow


async def artifact_data(key: str) -> str:
    async with get_client() as client:
        [artifact] = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1
        )
    return str(artifact.data)


def test_a_federated_evaluation_puts_device_metrics_beside_the_servers(
    local_stack: LocalStack,
) -> None:
    # Prepare: six phones holding a fifth of their data out; rounds 0 and 1, devices
    # evaluate every second round (so round 1 only)
    stack, job, run_id = local_stack, "hello-mobile", f"feval-{uuid.uuid4().hex[:6]}"
    sim = stack.simulate(job, 6, runtime="pytorch", **ALWAYS_ON)

    # Execute
    reports = run_flow(
        **small_run(
            job=job,
            run_id=run_id,
            rounds=2,
            cohort_size=4,
            min_reports=3,
            num_devices=6,
            partition={"kind": "iid"},
            eval_every=2,
            eval_cohort_size=3,
        )
    )
    summary = sim.finish(timeout=60)

    # Assert: round 1's report has the devices' metrics beside the server's
    first, second = reports
    assert [r.outcome for r in reports] == ["committed", "committed"]
    assert first.device_metrics == {} and first.devices_evaluated == 0
    assert set(second.device_metrics) == set(second.test_metrics) == {"loss", "accuracy"}
    assert second.devices_evaluated >= 3 and second.device_eval_samples > 0
    assert "device-evaluation" in second.timings and "device-evaluation" not in first.timings
    print(f"{job} round 1: server {second.test_metrics}, devices {second.device_metrics}")

    # They are the means, weighted by examples, of the results the leaves read (the
    # lineage names those batches; one that landed after the close is not among them)
    key = device_evaluation_key(job, run_id, 1)
    assert get_json(stack.store, key)["metrics"] == pytest.approx(second.device_metrics)
    record = read_lineage(stack.store, key)
    assert record is not None and record.kind == "device-evaluation"
    assert second.global_model.uri in {i.uri for i in record.inputs}
    inputs = [i.uri.removeprefix(f"s3://{stack.store.bucket}/") for i in record.inputs]
    results_prefix = f"{device_evaluation_prefix(job, run_id, 1)}results/"
    batches = [k for k in inputs if k.startswith(results_prefix)]
    results = [r for k in batches for r in decode_update_batch(stack.store.get(k).data, k)]
    counted = {r.device_id: r for r in results}  # a retry stored twice counts once
    assert len(counted) == second.devices_evaluated
    assert sum(r.num_samples for r in counted.values()) == second.device_eval_samples
    for name, value in second.device_metrics.items():
        weighted = sum(r.metrics[name] * r.num_samples for r in counted.values())
        assert value == pytest.approx(weighted / second.device_eval_samples)
    # (a result whose write the close overtook is answered 409 yet may be read: "sent")
    assert summary["evaluations_sent"] >= second.devices_evaluated >= 3
    assert summary["evaluations_accepted"] >= 1 and summary["stop_reason"] == "done"

    # ...and in the Prefect round artifact and canopy report's table
    row = asyncio.run(artifact_data(artifact_key(job, run_id, "round-0001")))
    assert "device metrics" in row and "accuracy" in row
    console = Console(width=140, record=True, color_system=None)
    console.print(RoundTable(reports, title=f"{job} / {run_id}"))
    table = console.export_text()
    assert "device" in table and "device acc" in table
