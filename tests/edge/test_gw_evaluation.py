"""Evaluate tasks over real HTTP: the offer, the metrics-only upload and its refusals.

A round's federated evaluation reopens the round with ``kind="evaluate"``
tasks (docs/orchestration.md): devices get the weights, evaluate them on their
own held-out data and post an ``EvaluationResult`` JSON. The gateway checks
it like an update (headers, cohort, model version, sample cap, then the body)
and stores it through the same group commit and close fence, under the
round's ``device-evaluation/`` prefix.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from edge.gateway.rounds import RoundDirectory, StoreCalls
from edge.gateway.tuning import GatewayTuning
from edge.manifests import Runtime
from edge.protocol import ProtocolError, parse_evaluation
from edge.update_batch import BatchContext, decode_update_batch
from infra.keys import evaluation_results_prefix
from infra.lineage import read_lineage
from infra.store import S3ObjectStore
from tests.edge.devices import (
    JOB,
    RUN,
    Device,
    batches,
    devices_on,
    error,
    offered_device,
    open_test_round,
    update_like,
)
from tests.support.harness import read_active, set_round_status

METRICS = ["loss", "accuracy"]
# What opens a round's federated evaluation rather than its training (write_round's options).
EVALUATION: dict[str, Any] = {"kind": "evaluate", "metrics": METRICS, "max_num_samples": 100}


def evaluation_batches(store: S3ObjectStore, leaf: str, rnd: int = 0) -> list[str]:
    return store.list_keys(evaluation_results_prefix(JOB, RUN, rnd, leaf))


def post_result(
    device: Device,
    offer: dict[str, object],
    body: bytes | str,
    *,
    samples: str = "40",
    content_type: str = "application/json",
    **headers: str,
) -> httpx.Response:
    return device.client.post(
        str(offer["upload_url"]),
        content=body,
        headers={
            **device.auth,
            "Content-Type": content_type,
            "X-Canopy-Model-Version": str(offer["model_version"]),
            "X-Canopy-Num-Samples": samples,
            **headers,
        },
    )


def open_evaluation(
    store: S3ObjectStore, selected: list[str], rnd: int = 0, runtime: Runtime = "pytorch"
) -> None:
    """Open round ``rnd``'s federated evaluation as the flow's open-evaluation task does."""
    open_test_round(store, selected, rnd=rnd, runtime=runtime, **EVALUATION)


def test_an_evaluate_task_is_offered_and_its_metrics_are_stored(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    # Prepare: a training round 0 already closed; its evaluation opens on two devices.
    a, b = devices_on("leaf-0", 2)
    devices = {d: Device(client, d, runtimes=("executorch",)) for d in (a, b)}
    for device in devices.values():
        assert device.enrol().status_code == 200
    open_evaluation(s3_store, [a, b], runtime="executorch")

    # Execute
    offer = devices[a].offer()
    weights = client.get(str(offer["model"]["url"]), headers=devices[a].auth)  # type: ignore[index]
    pte = client.get(
        str(offer["model"]["url"]).replace("safetensors", "pte"),  # type: ignore[index]
        headers=devices[a].auth,
    )
    receipt = post_result(devices[a], offer, json.dumps({"metrics": {"loss": 0.5, "accuracy": 1}}))
    again = post_result(devices[a], offer, json.dumps({"metrics": {"loss": 0.5, "accuracy": 1}}))
    after = devices[a].poll().json()

    # Assert: the offer says evaluate, names the metrics, and serves weights only
    assert offer["kind"] == "evaluate" and offer["metrics"] == METRICS
    assert offer["runtime"] == "executorch"
    assert ".eval." in str(offer["task_id"])
    assert offer["model"] == offer["weights"]  # even an ExecuTorch device evaluates weights
    assert weights.status_code == 200 and error(pte) == (404, "no_program")
    assert receipt.status_code == 200 and receipt.json()["duplicate"] is False
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert after["status"] == "retry" and after["reason"] == "already_submitted"
    # one evaluation batch, no update batch; a record with metrics and no tensors
    [key] = evaluation_batches(s3_store, "leaf-0")
    assert batches(s3_store, "leaf-0") == []
    [result] = decode_update_batch(s3_store.get(key).data, source=key)
    assert (result.device_id, result.num_samples) == (a, 40)
    assert result.metrics == {"loss": 0.5, "accuracy": 1.0} and result.tensors == {}
    record = read_lineage(s3_store, key)
    assert record is not None and record.kind == "device-evaluation-batch"


OK = b'{"metrics": {"loss": 1, "accuracy": 1}}'
JSON = "application/json"
BAD_RESULTS = [
    # label, body, content type, X-Canopy-Num-Samples, status, code
    (
        "an update to an evaluate task",
        b"\x00" * 64,
        "application/octet-stream",
        "40",
        415,
        "unsupported_media_type",
    ),
    ("not JSON", b"{nope", JSON, "40", 422, "malformed_evaluation"),
    ("not an object", b"[1, 2]", JSON, "40", 422, "malformed_evaluation"),
    ("an extra field", OK[:-1] + b', "x": 1}', JSON, "40", 422, "malformed_evaluation"),
    ("metrics not an object", b'{"metrics": [1]}', JSON, "40", 422, "malformed_evaluation"),
    ("a metric missing", b'{"metrics": {"loss": 0.4}}', JSON, "40", 422, "bad_metrics"),
    ("an unknown metric", OK[:-2] + b', "f1": 1}}', JSON, "40", 422, "bad_metrics"),
    ("NaN", b'{"metrics": {"loss": NaN, "accuracy": 1}}', JSON, "40", 422, "bad_metrics"),
    ("a string", b'{"metrics": {"loss": "0.4", "accuracy": 1}}', JSON, "40", 422, "bad_metrics"),
    ("more examples than the cap", OK, JSON, "101", 422, "too_many_samples"),
    ("no examples", OK, JSON, "0", 422, "bad_num_samples"),
    ("over 16 KiB", OK + b" " * 17_000, JSON, "40", 413, "body_too_large"),
]


@pytest.mark.parametrize(
    ("label", "body", "content_type", "samples", "status", "code"),
    BAD_RESULTS,
    ids=[row[0] for row in BAD_RESULTS],
)
def test_bad_evaluation_results_are_refused_with_a_typed_4xx(
    s3_store: S3ObjectStore,
    client: httpx.Client,
    label: str,
    body: bytes,
    content_type: str,
    samples: str,
    status: int,
    code: str,
) -> None:
    device, offer = offered_device(client, s3_store, leaf="leaf-1", **EVALUATION)

    response = post_result(device, offer, body, content_type=content_type, samples=samples)

    assert error(response) == (status, code), label
    assert evaluation_batches(s3_store, "leaf-1") == []  # nothing refused is stored
    # the device can still report properly afterwards
    good = post_result(device, offer, b'{"metrics": {"loss": 0.2, "accuracy": 0.5}}')
    assert good.status_code == 200, good.text


def test_metrics_sent_to_a_training_task_and_updates_to_an_evaluation_are_refused(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    trainer, evaluator = devices_on("leaf-0", 2)
    devices = {d: Device(client, d) for d in (trainer, evaluator)}
    for device in devices.values():
        device.enrol()
    open_test_round(s3_store, [trainer])
    train_offer = devices[trainer].offer()

    metrics_to_training = post_result(devices[trainer], train_offer, b'{"metrics": {"loss": 1}}')
    set_round_status(s3_store, read_active(s3_store, JOB), "closed")
    open_evaluation(s3_store, [trainer, evaluator])
    late_update = devices[trainer].upload(train_offer, update_like(0.1))
    eval_offer = devices[evaluator].offer()
    update_to_evaluation = devices[evaluator].upload(eval_offer, update_like(0.1))

    assert error(metrics_to_training) == (415, "unsupported_media_type")
    assert metrics_to_training.json()["details"]["task_kind"] == "train"
    # the round's training is over once its evaluation opened: the update is late
    assert error(late_update) == (409, "late")
    assert error(update_to_evaluation) == (415, "unsupported_media_type")
    assert update_to_evaluation.json()["details"]["task_kind"] == "evaluate"
    assert batches(s3_store, "leaf-0") == [] and evaluation_batches(s3_store, "leaf-0") == []


def test_the_close_fence_refuses_a_training_batch_once_the_evaluation_is_open(
    s3_store: S3ObjectStore,
) -> None:
    """A training batch whose PUT returns after the round's evaluation opened is not acked:
    the fence compares the pointer's kind, not only its run and round."""
    device = devices_on("leaf-0", 1)[0]
    open_evaluation(s3_store, [device])
    rounds = RoundDirectory(
        StoreCalls(s3_store, ThreadPoolExecutor(1)), manifest_ttl=0.0, tuning=GatewayTuning()
    )
    train = BatchContext(JOB, RUN, 0, "leaf-0", "gw-test")
    evaluate = BatchContext(JOB, RUN, 0, "leaf-0", "gw-test", "evaluate")

    with pytest.raises(ProtocolError) as refused:
        asyncio.run(rounds.confirm_open(train))
    asyncio.run(rounds.confirm_open(evaluate))  # the evaluation's own batch passes

    assert refused.value.status == 409
    assert refused.value.details == {"reason": "round_closed_during_write"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"metrics": {"loss": 0.25, "accuracy": 1}}', {"loss": 0.25, "accuracy": 1.0}),
        (b'{"metrics": {"accuracy": 0.5, "loss": 2e-3}}', {"accuracy": 0.5, "loss": 0.002}),
    ],
)
def test_parse_evaluation_accepts_exactly_the_tasks_metrics(
    body: bytes, expected: dict[str, float]
) -> None:
    assert parse_evaluation(body, METRICS) == expected
    assert np.isfinite(list(parse_evaluation(body, METRICS).values())).all()
