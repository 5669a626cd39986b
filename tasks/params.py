"""Parameters of a federated training run, validated once at the flow's door.

These are the flow's pydantic parameters, so Prefect renders them as a form in
the UI and ``prefect deployment run ... -p rounds=10`` is checked before any
work starts. Everything below the flow receives plain, already-valid values.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from aggregation.strategies.config import StrategyConfig
from aggregation.topology import TreeShape
from edge.data.config import DatasetConfig
from edge.data.partition import PartitionScheme

if TYPE_CHECKING:  # edge.jobs imports torch; a leaf run on an edge worker needs none of it
    from edge.jobs import JobSpec, TrainHyperparams


class TrainingParams(BaseModel):
    """One federated training run: which job, how many rounds, which tree and strategy."""

    model_config = ConfigDict(extra="forbid")

    job: str = Field(
        description="Job name (hello-mobile, xor-mobile, cifar10-mobile) or module:ATTR."
    )
    run_id: str = Field(
        default="default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Run id; running again with the same id resumes from the last commit.",
    )
    runtime: Literal["executorch", "pytorch"] = Field(
        default="executorch", description="What devices train with."
    )
    rounds: int = Field(default=5, ge=1, le=10_000, description="Rounds to commit in total.")
    tree: TreeShape = Field(default_factory=TreeShape)
    cohort_size: int = Field(default=10, ge=1, description="Reports that close a round.")
    over_selection: float = Field(
        default=1.3, ge=1.0, le=5.0, description="Devices asked per report needed."
    )
    min_reports: int = Field(
        default=2, ge=1, description="Fewest reports for a round to count; below it is abandoned."
    )
    round_deadline_s: float = Field(
        default=120.0, gt=0, description="Seconds a round waits for reports before closing."
    )
    registry_wait_s: float = Field(
        default=60.0, ge=0, description="Seconds to wait for enough devices to enrol."
    )
    local_epochs: int | None = Field(
        default=None, ge=1, le=1000, description="Local passes over device data (None: job's)."
    )
    max_steps: int | None = Field(
        default=None, ge=1, description="Cap on local steps per round (None: the job's)."
    )
    batch_size: int | None = Field(
        default=None, ge=1, le=4096, description="Local batch size (None: the job's)."
    )
    lr: float | None = Field(default=None, gt=0, le=10, description="Device SGD lr (None: job's).")
    momentum: float | None = Field(
        default=None, ge=0, lt=1, description="Device SGD momentum (None: the job's)."
    )
    strategy: StrategyConfig = Field(default_factory=lambda: StrategyConfig(name="fedavg"))
    partition: PartitionScheme | None = Field(
        default=None, description="How simulated devices split the data (None: the job's)."
    )
    num_devices: int = Field(
        default=40, ge=1, description="Simulated devices the training data is split across."
    )
    dataset: DatasetConfig | None = Field(
        default=None, description="Evaluation and simulated-device data (None: the job's)."
    )
    norm_bound: float | None = Field(
        default=None, gt=0, description="Clip device updates to this L2 norm (None: no bound)."
    )
    max_device_samples: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000_000,
        description="Largest weight (examples) one device may claim; larger claims are "
        "refused (None: the largest simulated partition).",
    )
    seed: int = Field(default=0, ge=0)
    eval_samples: int = Field(default=1000, ge=1, description="Held-out samples to evaluate on.")
    eval_every: int | None = Field(
        default=None,
        ge=1,
        description="Federated evaluation every K rounds: devices evaluate the new global "
        "model on their own held-out data and report metrics only (None: never).",
    )
    eval_cohort_size: int | None = Field(
        default=None,
        ge=1,
        description="Device evaluations that close a federated evaluation (None: cohort_size).",
    )
    eval_holdout: float = Field(
        default=0.2,
        gt=0,
        le=0.5,
        description="Simulated devices: fraction of each partition held out (never trained on) "
        "for federated evaluation; only with eval_every.",
    )
    leaf_mode: Literal["in-process", "edge-pool"] = Field(
        default="in-process",
        description="Where each leaf collects its devices' updates: in this flow's process, "
        "or as an edge-leaf run on the 'edge' work pool, whose workers sit beside the "
        "gateways (flows/edge_leaf.py). Same results bit for bit.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingParams:
        if self.min_reports > self.cohort_size:
            raise ValueError(
                f"min_reports ({self.min_reports}) cannot exceed cohort_size ({self.cohort_size})"
            )
        return self

    @property
    def selected_per_round(self) -> int:
        return math.ceil(self.cohort_size * self.over_selection)

    @property
    def evaluation_cohort(self) -> int:
        """Device evaluations that close a federated evaluation."""
        return self.eval_cohort_size or self.cohort_size

    @property
    def holdout(self) -> float:
        """The fraction of each simulated device's data held out (0 without federated eval)."""
        return self.eval_holdout if self.eval_every is not None else 0.0

    def evaluates_on_devices(self, rnd: int) -> bool:
        """Whether round ``rnd`` ends with a federated evaluation of its new model.

        Every ``eval_every``-th round: rounds K-1, 2K-1, ... (after K, 2K, ... rounds).
        """
        return self.eval_every is not None and (rnd + 1) % self.eval_every == 0


def local_hyperparams(params: TrainingParams, job: JobSpec) -> TrainHyperparams:
    """The job's default local training, overridden by what the run sets."""
    from edge.jobs import TrainHyperparams  # see the TYPE_CHECKING import above

    overrides = {
        name: getattr(params, name)
        for name in ("local_epochs", "max_steps", "batch_size", "lr", "momentum")
        if getattr(params, name) is not None
    }
    return TrainHyperparams.model_validate({**job.hyperparams.model_dump(), **overrides})
