"""Every deployment in prefect.yaml passes the check a new run makes before round 0.

The README tells users to run these deployments as they are (``prefect deployment
run federated-training/xor-mobile --watch``); a deployment whose partition cannot
cover its ``num_devices`` would fail its first task instead.
"""

from __future__ import annotations

import pytest

from edge.jobs.registry import get_job
from edge.training.validate import validate_job
from flows.deployments import DeploymentSpec, load_deployment_specs
from tasks.params import TrainingParams

SPECS = load_deployment_specs()


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_a_shipped_deployment_passes_the_job_check(spec: DeploymentSpec) -> None:
    params = TrainingParams.model_validate(spec.parameters)
    job = get_job(params.job)

    validate_job(  # what the flow's check-job task runs
        job,
        job.dataset(params.dataset or job.default_dataset, store=None),
        scheme=params.partition or job.partition,
        num_devices=params.num_devices,
        seed=params.seed,
    )
