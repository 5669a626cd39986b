"""Deployment specs: Canopy's own (prefect.yaml) and the user's (``canopy deploy``).

Canopy's deployments live in prefect.yaml, so local serving and ``prefect deploy``
agree. A user's job gets a deployment without editing Canopy's files:
``canopy deploy path/to/file.py:ATTR`` writes a spec of the same shape to a YAML
file of the local stack (``.canopy/stack/deployments.yaml``), which the stack's
runner (``flows.serve``) reads at start and re-reads while it runs. A
prefect.yaml of the user's own, in the same shape, can be loaded the same way
(``canopy deploy --file``) or deployed to a work pool with ``prefect deploy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from edge.jobs.spec import JobSpec
from infra.errors import ConfigError
from infra.keys import check_segment
from infra.settings import EdgePoolSettings
from tasks.params import TrainingParams

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"
USER_DEPLOYMENTS_FILE = "deployments.yaml"  # inside the stack's root folder
# What a deployment of Canopy's flow names as its entrypoint (file and module forms).
FLOW_ENTRYPOINT = "flows/federated.py:federated_training"
FLOW_ENTRYPOINTS = frozenset({FLOW_ENTRYPOINT, "flows.federated:federated_training"})
# The leaves' flow on the edge work pool: in prefect.yaml for `prefect deploy`; never
# served by the runner (its workers run it, flows.edge_leaf).
EDGE_LEAF_ENTRYPOINTS = frozenset({"flows/edge_leaf.py:edge_leaf", "flows.edge_leaf.edge_leaf"})
USER_TAGS = ["canopy", "federated", "user-job"]


class DeploymentSpec(BaseModel):
    """The parts of a prefect.yaml deployment that a local runner needs."""

    model_config = ConfigDict(extra="ignore")

    name: str
    description: str = ""
    entrypoint: str
    tags: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)


def load_deployment_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """Parse and validate every deployment of federated-training, including its flow
    parameters (the edge-leaf deployment is the edge workers', not the runner's)."""
    raw = yaml.safe_load(path.read_text()) or {}
    specs = [DeploymentSpec.model_validate(d) for d in raw.get("deployments") or []]
    specs = [spec for spec in specs if spec.entrypoint not in EDGE_LEAF_ENTRYPOINTS]
    for spec in specs:
        if spec.entrypoint not in FLOW_ENTRYPOINTS:
            raise ConfigError(
                f"{path}: deployment {spec.name!r} has entrypoint {spec.entrypoint!r}; "
                f"Canopy serves its own flow only, entrypoint: {FLOW_ENTRYPOINT}"
            )
        TrainingParams.model_validate(spec.parameters)  # a bad default fails here, not at run
    return specs


def served_parameters(spec: DeploymentSpec, edge: EdgePoolSettings | None = None) -> dict[str, Any]:
    """The parameters a runner serves ``spec`` with: its own, plus the stack's ``leaf_mode``
    (``CANOPY_EDGE_LEAF_MODE``, set by ``canopy up --edge-workers``) unless it sets one."""
    mode = (edge or EdgePoolSettings()).leaf_mode
    return {"leaf_mode": mode, **spec.parameters} if mode is not None else dict(spec.parameters)


def user_deployments_path(root: Path) -> Path:
    """The YAML file of ``canopy deploy``'s deployments in a stack's root folder."""
    return root / USER_DEPLOYMENTS_FILE


def load_user_deployments(path: Path) -> list[DeploymentSpec]:
    """The deployments ``canopy deploy`` recorded (none before the first)."""
    return load_deployment_specs(path) if path.is_file() else []


def save_user_deployments(path: Path, specs: list[DeploymentSpec]) -> None:
    """Write the user's deployments in prefect.yaml's shape (atomically: a runner
    re-reading the file never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"deployments": [spec.model_dump(mode="json") for spec in specs]}
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(
        "# Deployments of federated-training registered by `canopy deploy`; the runner of\n"
        "# `canopy up` serves them beside prefect.yaml's. Same shape as prefect.yaml.\n"
        + yaml.safe_dump(body, sort_keys=False)
    )
    tmp.replace(path)


def record_user_deployments(path: Path, new: list[DeploymentSpec]) -> list[DeploymentSpec]:
    """Add ``new`` to the user's deployments, replacing any of the same name.

    Refuses names that prefect.yaml already uses: the runner could serve only one.
    """
    builtin = {spec.name for spec in load_deployment_specs()}
    for spec in new:
        if spec.name in builtin:
            raise ConfigError(
                f"deployment name {spec.name!r} is one of Canopy's own (prefect.yaml); "
                "give another with --name"
            )
    names = {spec.name for spec in new}
    kept = [spec for spec in load_user_deployments(path) if spec.name not in names]
    specs = kept + new
    save_user_deployments(path, specs)
    return specs


def canonical_reference(reference: str) -> str:
    """``reference`` with a job file's path made absolute; other references unchanged.

    A deployment or a simulator may run from another working directory than the
    command that named the file, so the stack only ever passes absolute paths.
    """
    target, sep, attr = reference.rpartition(":")
    if sep and (target.endswith(".py") or "/" in target or "\\" in target):
        return f"{Path(target).expanduser().resolve()}:{attr}"
    return reference


def default_runtime(job: JobSpec) -> str:
    """ExecuTorch for networks that allow it (what phones run); PyTorch otherwise."""
    if job.has_program and "executorch" in job.runtimes:
        return "executorch"
    return "pytorch" if "pytorch" in job.runtimes else "executorch"


def job_deployment(
    reference: str,
    job: JobSpec,
    *,
    name: str | None = None,
    runtime: str | None = None,
    rounds: int = 5,
    num_devices: int = 40,
    overrides: dict[str, Any] | None = None,
) -> DeploymentSpec:
    """A deployment of ``federated-training`` for one job, with that job's defaults.

    The job's own hyperparameters and partition apply (the flow reads them from
    the spec); the deployment sets what a run needs besides: the runtime, the
    rounds, a cohort that a stack's fleet of ``num_devices`` phones can fill,
    and a flat tree of two leaves. ``overrides`` are further flow parameters.
    """
    runtime = runtime or default_runtime(job)
    if runtime not in job.runtimes:
        raise ConfigError(
            f"job {job.name}: runtime {runtime!r} is not in its runtimes "
            f"{sorted(job.runtimes)}; pick one of those with --runtime"
        )
    cohort = min(8, num_devices)
    parameters: dict[str, Any] = {
        "job": canonical_reference(reference),
        "runtime": runtime,
        "rounds": rounds,
        "tree": {"depth": 1, "width": 2},
        "cohort_size": cohort,
        "min_reports": max(1, cohort // 2),
        "round_deadline_s": 120,
        "num_devices": num_devices,
        **(overrides or {}),
    }
    TrainingParams.model_validate(parameters)
    name = name or job.name
    try:
        check_segment(name, "deployment name")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return DeploymentSpec(
        name=name,
        description=f"{job.description} (job {parameters['job']})".strip(),
        entrypoint=FLOW_ENTRYPOINT,
        tags=USER_TAGS,
        parameters=parameters,
    )
