"""Device trainers: sign convention, sample counts, metrics, momentum, determinism,
federated XOR on the ExecuTorch runtime, CIFAR program training, evaluation, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from aggregation.tensors import TensorDict
from edge.data import DatasetConfig, device_partition
from edge.data.synthetic import XOR_LABELS, XOR_POINTS, synthetic_cifar10_shaped
from edge.jobs import JobSpec, TrainHyperparams, get_job
from edge.training import (
    ExecuTorchTrainer,
    ExportedProgram,
    ProgramError,
    PyTorchTrainer,
    RoundModel,
    TrainingError,
    evaluate,
    export_job_program,
    get_trainer,
    initial_state,
    model_from_state,
)
from edge.training.batching import batch_plan
from infra.errors import ConfigError, ValidationError


def _xor_data(repeats: int = 4) -> tuple[np.ndarray, np.ndarray]:
    return np.tile(XOR_POINTS, (repeats, 1)), np.tile(XOR_LABELS, repeats)


def _apply(state: TensorDict, update: TensorDict) -> TensorDict:
    return {k: state[k] + update[k] for k in state}


# ---------------------------------------------------------------- sign and counts


@pytest.mark.parametrize("runtime", ["pytorch", "executorch"])
def test_update_is_new_minus_old(
    runtime: str, xor: JobSpec, xor_state: TensorDict, xor_pte: bytes
) -> None:
    """One full-batch SGD step without momentum: update == -lr * gradient at the global model."""
    # Prepare: the gradient at the global state, computed independently with autograd.
    x, y = XOR_POINTS, XOR_LABELS
    network = model_from_state(xor, xor_state)
    F.cross_entropy(network(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    gradient = {n: p.grad.numpy() for n, p in network.named_parameters()}  # type: ignore[union-attr]
    hp = TrainHyperparams(batch_size=4, max_steps=1, lr=0.1, momentum=0.0)

    # Execute
    result = get_trainer(runtime).train(xor, RoundModel(xor_state, xor_pte), x, y, hp)  # type: ignore[arg-type]

    # Assert
    assert result.runtime == runtime and result.steps == 1
    for name, grad in gradient.items():
        assert result.update[name].dtype == np.float32
        np.testing.assert_allclose(result.update[name], -0.1 * grad, atol=1e-6)


def test_hello_update_moves_the_vector_towards_the_device_target() -> None:
    job = get_job("hello-mobile")
    dataset = job.dataset(DatasetConfig())
    x, y = device_partition(dataset, job.partition, 3, 10, seed=0)
    state = {"vector": np.full(256, 0.5, dtype=np.float32)}
    hp = TrainHyperparams(batch_size=x.shape[0], max_steps=1, lr=0.5, momentum=0.0)

    for runtime in ("pytorch", "executorch"):
        result = get_trainer(runtime).train(job, RoundModel(state), x, y, hp)
        expected = 0.5 * (x.mean(axis=0) - state["vector"])
        np.testing.assert_allclose(result.update["vector"], expected, atol=1e-5)
        distances = ((x - state["vector"]) ** 2).sum(axis=1)
        assert result.metrics["loss"] == pytest.approx(0.5 * distances.mean(), rel=1e-6)
        assert result.num_samples == x.shape[0]


def test_sample_counts_and_steps_follow_epochs_and_max_steps(
    xor: JobSpec, xor_state: TensorDict
) -> None:
    x, y = _xor_data(repeats=3)  # 12 examples: 3 steps of 4 per epoch
    trainer = PyTorchTrainer()
    by_epochs = trainer.train(
        xor, RoundModel(xor_state), x, y, TrainHyperparams(local_epochs=3, batch_size=4)
    )
    capped = trainer.train(
        xor,
        RoundModel(xor_state),
        x,
        y,
        TrainHyperparams(local_epochs=3, max_steps=5, batch_size=4),
    )
    ragged = trainer.train(
        xor, RoundModel(xor_state), x[:10], y[:10], TrainHyperparams(batch_size=4)
    )

    assert (by_epochs.steps, by_epochs.num_samples) == (9, 12)
    assert (capped.steps, capped.num_samples) == (5, 12)
    assert (ragged.steps, ragged.num_samples) == (3, 10)  # last batch wraps around


def test_batch_plan_is_full_batches_from_seeded_permutations() -> None:
    plan = batch_plan(10, 4, local_epochs=2, max_steps=None, seed=3)
    assert len(plan) == 6 and all(b.shape == (4,) for b in plan)
    first_epoch = np.concatenate(plan[:3])
    assert set(first_epoch[:10].tolist()) == set(range(10))
    assert np.array_equal(first_epoch[10:], first_epoch[:2])  # the wrap-around
    again = batch_plan(10, 4, local_epochs=2, max_steps=None, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again, strict=True))


def test_metrics_are_the_mean_loss_and_the_accuracy_of_the_training_steps(
    xor: JobSpec, xor_state: TensorDict
) -> None:
    x, y = XOR_POINTS, XOR_LABELS
    network = model_from_state(xor, xor_state)
    with torch.no_grad():
        logits = network(torch.from_numpy(x))
    expected_loss = float(F.cross_entropy(logits, torch.from_numpy(y)))
    expected_acc = float((logits.argmax(1).numpy() == y).mean())

    one = PyTorchTrainer().train(
        xor, RoundModel(xor_state), x, y, TrainHyperparams(batch_size=4, max_steps=1)
    )
    many = PyTorchTrainer().train(
        xor, RoundModel(xor_state), x, y, TrainHyperparams(batch_size=2, local_epochs=5)
    )

    assert one.metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert one.metrics["accuracy"] == pytest.approx(expected_acc)
    assert set(many.metrics) == {"loss", "accuracy"}
    assert np.isfinite(many.metrics["loss"]) and 0.0 <= many.metrics["accuracy"] <= 1.0


def test_momentum_carries_across_batches(xor: JobSpec, xor_state: TensorDict) -> None:
    """The trainer equals one SGD optimizer over all steps, not one per batch."""
    x, y = _xor_data()
    hp = TrainHyperparams(batch_size=4, local_epochs=2, lr=0.2, momentum=0.9)
    plan = batch_plan(16, 4, local_epochs=2, max_steps=None, seed=5)

    def reference(one_optimizer: bool) -> TensorDict:
        network = model_from_state(xor, xor_state)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.2, momentum=0.9)
        for idx in plan:
            if not one_optimizer:
                optimizer = torch.optim.SGD(network.parameters(), lr=0.2, momentum=0.9)
            optimizer.zero_grad()
            F.cross_entropy(network(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
            optimizer.step()
        return {k: v.detach().numpy() for k, v in network.state_dict().items()}

    result = PyTorchTrainer().train(xor, RoundModel(xor_state), x, y, hp, seed=5)
    trained = _apply(xor_state, result.update)
    kept, reset = reference(True), reference(False)

    for name in xor_state:
        np.testing.assert_allclose(trained[name], kept[name], atol=1e-6)
    assert max(np.abs(trained[n] - reset[n]).max() for n in xor_state) > 1e-3


def test_executorch_matches_pytorch_with_momentum_over_epochs(
    xor: JobSpec, xor_state: TensorDict, xor_pte: bytes
) -> None:
    x, y = _xor_data()
    hp = TrainHyperparams(batch_size=4, local_epochs=3, lr=0.2, momentum=0.9)
    et = ExecuTorchTrainer().train(xor, RoundModel(xor_state, xor_pte), x, y, hp, seed=2)
    pt = PyTorchTrainer().train(xor, RoundModel(xor_state), x, y, hp, seed=2)

    assert et.steps == pt.steps == 12
    assert et.metrics["accuracy"] == pt.metrics["accuracy"]
    assert et.metrics["loss"] == pytest.approx(pt.metrics["loss"], abs=1e-5)
    for name in xor_state:
        np.testing.assert_allclose(et.update[name], pt.update[name], atol=1e-5)


def test_batch_order_is_deterministic_given_the_seed(xor: JobSpec, xor_state: TensorDict) -> None:
    x, y = _xor_data()
    hp = TrainHyperparams(batch_size=4, local_epochs=2, lr=0.2, momentum=0.9)
    a = PyTorchTrainer().train(xor, RoundModel(xor_state), x, y, hp, seed=1)
    b = PyTorchTrainer().train(xor, RoundModel(xor_state), x, y, hp, seed=1)
    c = PyTorchTrainer().train(xor, RoundModel(xor_state), x, y, hp, seed=2)

    assert all(np.array_equal(a.update[k], b.update[k]) for k in xor_state)
    assert any(not np.array_equal(a.update[k], c.update[k]) for k in xor_state)


# ---------------------------------------------------------------- federated learning


def test_xor_reaches_full_accuracy_with_fedavg_on_the_executorch_runtime(xor: JobSpec) -> None:
    """Four devices, FedAvg, a fresh program exported from the global model every round."""
    dataset = xor.dataset(DatasetConfig())
    x_test, y_test = dataset.split_arrays("test")
    state = initial_state(xor, 1)
    trainer = ExecuTorchTrainer()
    accuracy = []
    for rnd in range(4):
        exported = export_job_program(xor, state)
        assert exported is not None
        results = [
            trainer.train(
                xor,
                RoundModel(state, exported.pte),
                *device_partition(dataset, xor.partition, device, 4, seed=0),
                xor.hyperparams,
                seed=100 * rnd + device,
            )
            for device in range(4)
        ]
        total = sum(r.num_samples for r in results)
        mean_update = {k: sum(r.update[k] * r.num_samples for r in results) / total for k in state}
        state = _apply(state, mean_update)
        accuracy.append(evaluate(xor, state, x_test, y_test)["accuracy"])
        if accuracy[-1] == 1.0:
            break
    assert accuracy[-1] == 1.0, accuracy


def test_exported_cifar_program_trains_on_the_executorch_runtime(
    cifar_program: ExportedProgram,
) -> None:
    """The program `canopy export` writes: loss falls and stays finite."""
    job = get_job("cifar10-mobile")
    state = initial_state(job, 0)
    dataset = synthetic_cifar10_shaped(train_size=640, test_size=10, seed=0)
    x, y = dataset.split_arrays("train")
    hp = job.hyperparams.model_copy(update={"max_steps": 20, "lr": 0.05})

    result = ExecuTorchTrainer().train(job, RoundModel(state, cifar_program.pte), x, y, hp)
    before = evaluate(job, state, x, y)
    after = evaluate(job, _apply(state, result.update), x, y)

    assert result.steps == 20 and result.num_samples == 640
    assert np.isfinite(result.metrics["loss"])
    assert all(np.isfinite(u).all() for u in result.update.values())
    assert after["loss"] < before["loss"] - 0.02, (before, after)
    assert after["accuracy"] > before["accuracy"] + 0.05, (before, after)


# ---------------------------------------------------------------- evaluation


def test_evaluate_reports_loss_and_accuracy() -> None:
    job = get_job("cifar10-mobile")
    dataset = synthetic_cifar10_shaped(train_size=10, test_size=300, seed=1)
    x, y = dataset.split_arrays("test")
    metrics = evaluate(job, initial_state(job, 0), x, y, batch_size=128)

    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"] == pytest.approx(np.log(10), abs=0.2)  # untrained: near uniform
    assert 0.0 <= metrics["accuracy"] <= 1.0

    hello = get_job("hello-mobile")
    points = np.ones((5, 256), dtype=np.float32)
    at_target = evaluate(
        hello, {"vector": np.ones(256, dtype=np.float32)}, points, np.zeros(5, int)
    )
    assert at_target == {"loss": 0.0, "accuracy": 1.0}
    with pytest.raises(ValidationError, match="empty"):
        evaluate(hello, {"vector": np.ones(256, dtype=np.float32)}, points[:0], np.zeros(0, int))


# ---------------------------------------------------------------- bad input


def test_wrong_shapes_and_labels_are_refused_clearly(xor: JobSpec, xor_state: TensorDict) -> None:
    trainer = PyTorchTrainer()
    hp = TrainHyperparams(batch_size=4)
    model = RoundModel(xor_state)
    x, y = XOR_POINTS, XOR_LABELS
    cases = [
        (np.zeros((4, 3), np.float32), y, r"shape \(4, 3\), expected \('n', 2\)"),
        (x, y[:3], r"labels have shape \(3,\), expected \(4,\)"),
        (x, np.array([0, 1, 2, 0]), r"labels must lie in 0\.\.1"),
        (x, y.astype(np.float32), "labels must be integers"),
        (np.full((4, 2), np.nan, np.float32), y, "NaN"),
        (x[:0], y[:0], "empty partition"),
    ]
    for xs, ys, message in cases:
        with pytest.raises(ValidationError, match=message):
            trainer.train(xor, model, xs, ys, hp)


def test_executorch_refuses_mismatched_programs(
    xor: JobSpec, xor_state: TensorDict, xor_pte: bytes
) -> None:
    trainer = ExecuTorchTrainer()
    x, y = XOR_POINTS, XOR_LABELS
    other_state = {k: v + 0.5 for k, v in xor_state.items()}

    with pytest.raises(ProgramError, match="exported for batch size 4"):
        trainer.train(xor, RoundModel(xor_state, xor_pte), x, y, TrainHyperparams(batch_size=2))
    with pytest.raises(ProgramError, match="differ from the round's global model"):
        trainer.train(xor, RoundModel(other_state, xor_pte), x, y, TrainHyperparams(batch_size=4))
    with pytest.raises(ProgramError, match="needs the round's program"):
        trainer.train(xor, RoundModel(xor_state), x, y, TrainHyperparams(batch_size=4))


def test_state_that_does_not_fit_the_model_is_refused(xor: JobSpec, xor_state: TensorDict) -> None:
    bad = dict(xor_state)
    bad["fc1.weight"] = np.zeros((3, 2), np.float32)
    with pytest.raises(ValidationError, match=r"fc1\.weight"):
        PyTorchTrainer().train(
            xor, RoundModel(bad), XOR_POINTS, XOR_LABELS, TrainHyperparams(batch_size=4)
        )


def test_diverging_training_raises_instead_of_reporting_nan() -> None:
    job = get_job("hello-mobile")
    x = np.ones((4, 256), dtype=np.float32)
    hp = TrainHyperparams(batch_size=4, max_steps=200, local_epochs=200, lr=10.0, momentum=0.9)
    with pytest.raises(TrainingError, match="training loss became"):
        PyTorchTrainer().train(job, RoundModel(initial_state(job)), x, np.zeros(4, int), hp)


def test_runtimes_are_checked(xor_state: TensorDict) -> None:
    with pytest.raises(ConfigError, match="unknown runtime"):
        get_trainer("tflite")
    pytorch_only = JobSpec(
        **{
            **get_job("xor-mobile").__dict__,
            "name": "xor-pytorch-only",
            "runtimes": frozenset({"pytorch"}),
        }
    )
    with pytest.raises(ConfigError, match="does not run on executorch"):
        ExecuTorchTrainer().train(
            pytorch_only,
            RoundModel(xor_state),
            XOR_POINTS,
            XOR_LABELS,
            TrainHyperparams(batch_size=4),
        )
