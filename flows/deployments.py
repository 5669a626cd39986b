"""Deployment specs read from prefect.yaml, so local serving and `prefect deploy` agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from tasks.params import TrainingParams

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


class DeploymentSpec(BaseModel):
    """The parts of a prefect.yaml deployment that a local runner needs."""

    model_config = ConfigDict(extra="ignore")

    name: str
    description: str = ""
    entrypoint: str
    tags: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)


def load_deployment_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """Parse and validate every deployment, including its flow parameters."""
    raw = yaml.safe_load(path.read_text())
    specs = [DeploymentSpec.model_validate(d) for d in raw.get("deployments", [])]
    for spec in specs:
        TrainingParams.model_validate(spec.parameters)  # a bad default fails here, not at run
    return specs
