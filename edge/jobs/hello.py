"""hello-mobile: the whole pipeline without a neural network.

The model state is one float32 vector ``{"vector": (N,)}``. A device's data are
points around its target (the mean of its partition, fixed by the dataset seed,
the device index and the number of devices); the loss is ``½‖v − x‖²`` averaged
over a batch, so the gradient is ``v − mean(x)`` and one plain SGD step moves the
vector by exactly ``lr · (mean(x) − v)``. Updates, sample counts and metrics are
deterministic and cheap, which lets the simulator, gateway and flows be tested
at thousands of devices.

hello-mobile has no ExecuTorch program: export returns ``None`` and every runtime
trains it with the numpy code below, so "parity" holds by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aggregation.tensors import TensorDict
from edge.data.config import DatasetConfig
from edge.data.dataset import Dataset
from edge.data.errors import DatasetUnavailableError
from edge.data.partition import PartitionScheme
from edge.data.synthetic import hello_vectors
from edge.jobs.spec import ClosedFormStep, JobSpec, TrainHyperparams
from infra.store import ObjectStore

VECTOR_SIZE = 256


@dataclass(frozen=True)
class VectorModel:
    """A single vector pulled towards the points it sees.

    ``radius``: a sample counts as "correct" (for the accuracy metric) when the
    vector lies within this Euclidean distance of it.
    """

    size: int
    radius: float

    def initial_state(self, seed: int) -> TensorDict:
        # Zeros whatever the seed: the starting point is part of the job, not random.
        del seed
        return {"vector": np.zeros(self.size, dtype=np.float32)}

    def loss_and_gradient(self, state: TensorDict, x: np.ndarray, y: np.ndarray) -> ClosedFormStep:
        del y  # the labels only shape the partition
        vector = state["vector"]
        # A diverging run overflows to inf here; the trainer refuses non-finite losses.
        with np.errstate(over="ignore", invalid="ignore"):
            diff = vector[None, :] - x  # (B, N)
            sq = np.sum(diff * diff, axis=1, dtype=np.float64)  # (B,)
        return ClosedFormStep(
            loss=float(0.5 * sq.mean()),
            correct=int(np.count_nonzero(sq <= self.radius**2)),
            gradient={"vector": diff.mean(axis=0, dtype=np.float64).astype(np.float32)},
        )


def _dataset(config: DatasetConfig, *, store: ObjectStore | None = None) -> Dataset:
    del store
    if config.source != "synthetic":
        raise DatasetUnavailableError(
            f"hello-mobile trains on generated vectors only; source {config.source!r} "
            "does not apply (use source=synthetic)"
        )
    return hello_vectors(
        size=VECTOR_SIZE,
        train_size=config.train_size or 4_000,
        test_size=config.test_size or 400,
        seed=config.seed,
    )


HELLO_MOBILE = JobSpec(
    name="hello-mobile",
    description="No network: a float32 vector pulled towards each device's target (numpy).",
    input_shape=(VECTOR_SIZE,),
    num_classes=10,
    dataset=_dataset,
    hyperparams=TrainHyperparams(local_epochs=1, max_steps=None, batch_size=32, lr=0.5),
    closed_form=VectorModel(size=VECTOR_SIZE, radius=4.0),
    partition=PartitionScheme(kind="shards", labels_per_device=1),
)
