"""Serve every deployment in prefect.yaml from one local runner process.

`canopy up` runs this; it is the local stand-in for a process work pool and
worker. Flow runs execute in subprocesses of this runner, with the runner's
environment (S3 endpoint, Prefect API URL).
"""

from __future__ import annotations

from prefect import serve

from flows.deployments import load_deployment_specs
from flows.federated import federated_training


def main() -> None:
    deployments = [
        federated_training.to_deployment(
            name=spec.name,
            description=spec.description,
            tags=spec.tags,
            parameters=spec.parameters,
        )
        for spec in load_deployment_specs()
    ]
    serve(*deployments, limit=2)


if __name__ == "__main__":
    main()
