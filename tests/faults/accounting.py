"""Bookkeeping for the fault tests: what was acknowledged, what was aggregated, and the gap.

The fault tests (and ``benchmarks/faults.py``) judge a run by two ledgers kept
apart from the code under test:

* ``ReceiptLedger`` sits on the wire in front of every gateway (a
  ``FaultyProxy`` with no faults, used as a tap) and records each upload
  receipt a gateway sent a device: ``(run, round, device)``. The simulator's
  ``--summary-json`` only counts its acknowledgements; the tap names them, and
  the test checks that both agree.
* ``account_run`` reads S3 only: each committed round's report, then its
  lineage from the new global model down to the leaf partials and the update
  batches each leaf read, then the device records in those batches. It
  rebuilds, independently of ``aggregation.collector``, which devices' updates a
  leaf could have summed (selected for it, answering its task and model), and
  checks that against the device count and total weight stored in the leaf's
  partial: a partial holding more devices or more weight than distinct devices
  is an update counted twice.

``reconcile`` then says, per run: acknowledged updates missing from their
committed round (lost), updates counted twice (doubled), acknowledgements in
abandoned rounds (discarded by design, reported), and aggregated updates the
device never heard back about (allowed: the close fence answers ``409`` for a
batch already written, "it may or may not be aggregated").
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from aggregation.partial import PartialAggregate
from edge.manifests import LeafTask
from edge.update_batch import decode_update_batch
from infra.keys import parse_s3_uri, round_prefix, task_manifest_key
from infra.lineage import read_lineage
from infra.run_state import RoundReport, read_commit, read_reports
from infra.store import ObjectStore, get_json
from tests.support.faulty_s3 import Exchange

_RESULT_PATH = re.compile(
    r"^/v1/jobs/(?P<job>[^/]+)/devices/(?P<device>[^/]+)/tasks/(?P<task>[^/?]+)/result$"
)

RoundDevice = tuple[int, str]


@dataclass(frozen=True)
class Receipt:
    """One upload receipt as a gateway sent it to a device."""

    job: str
    run_id: str
    round: int
    device_id: str
    task_id: str
    duplicate: bool


def run_of_task(job: str, task_id: str) -> str:
    """The run id inside a task id ``{job}.{run}.r{round:05d}.{leaf}`` (edge.manifests)."""
    if not task_id.startswith(f"{job}."):
        raise ValueError(f"task id {task_id!r} does not start with job {job!r}")
    run_id, rnd, _leaf = task_id[len(job) + 1 :].rsplit(".", 2)
    if not re.fullmatch(r"r\d{5}", rnd):
        raise ValueError(f"task id {task_id!r} has no round part")
    return run_id


class ReceiptLedger:
    """Every upload answer the taps relayed; thread-safe (taps call it from their loops)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._receipts: list[Receipt] = []
        self.answers: Counter[str] = Counter()  # upload answers by status (and error code)

    def observe(self, exchange: Exchange) -> None:
        """A ``FaultyProxy`` observer: keep upload receipts, count the other answers."""
        path = exchange.target.split("?", 1)[0]
        found = _RESULT_PATH.match(path)
        if exchange.method != "POST" or found is None:
            return
        if exchange.status != 200:
            try:
                code = str(json.loads(exchange.body).get("code", "?"))
            except (ValueError, AttributeError):
                code = "?"
            with self._lock:
                self.answers[f"{exchange.status} {code}"] += 1
            return
        body = json.loads(exchange.body)
        receipt = Receipt(
            job=found["job"],
            run_id=run_of_task(found["job"], body["task_id"]),
            round=int(body["round"]),
            device_id=str(body["device_id"]),
            task_id=str(body["task_id"]),
            duplicate=bool(body["duplicate"]),
        )
        with self._lock:
            self._receipts.append(receipt)
            self.answers["200 duplicate" if receipt.duplicate else "200 accepted"] += 1

    def receipts(self, run_id: str | None = None) -> list[Receipt]:
        with self._lock:
            return [r for r in self._receipts if run_id is None or r.run_id == run_id]

    def acknowledged(self, run_id: str) -> set[RoundDevice]:
        """Distinct (round, device) pairs a gateway acknowledged for ``run_id``."""
        return {(r.round, r.device_id) for r in self.receipts(run_id)}


@dataclass
class RoundAccount:
    """One round of a run as S3 tells it."""

    round: int
    outcome: str
    devices_reported: int
    devices_selected: int
    aggregated: set[str] = field(default_factory=set)
    batches: int = 0
    doubled: int = 0


@dataclass
class RunAccount:
    """Every round a run recorded in its commit pointer, and what went wrong reading them."""

    job: str
    run_id: str
    rounds: list[RoundAccount]
    reports: list[RoundReport]
    problems: list[str] = field(default_factory=list)

    @property
    def committed(self) -> dict[int, set[str]]:
        return {r.round: r.aggregated for r in self.rounds if r.outcome == "committed"}

    @property
    def abandoned(self) -> set[int]:
        return {r.round for r in self.rounds if r.outcome == "abandoned"}

    @property
    def doubled(self) -> int:
        return sum(r.doubled for r in self.rounds)

    @property
    def aggregated(self) -> set[RoundDevice]:
        return {(r, d) for r, devices in self.committed.items() for d in devices}


def _partials_and_batches(
    store: ObjectStore, report: RoundReport, prefix: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """Leaf partials (key, sha256) under the committed global model, and any broken links."""
    problems: list[str] = []
    record = read_lineage(store, report.global_model.key)
    if record is None or record.kind != "global-aggregation":
        return [], [f"round {report.round}: global model has no global-aggregation lineage"]
    leaves: list[tuple[str, str]] = []
    todo = [i for i in record.inputs if parse_s3_uri(i.uri)[1].startswith(f"{prefix}partials/")]
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        key = parse_s3_uri(node.uri)[1]
        if key in seen:
            continue
        seen.add(key)
        head = store.head(key)
        if head is None or head.sha256 != node.sha256:
            problems.append(f"round {report.round}: partial {key} missing or replaced")
            continue
        rec = read_lineage(store, key)
        if rec is None:
            problems.append(f"round {report.round}: partial {key} has no lineage")
            continue
        if rec.parameters.get("level") == 0:
            leaves.append((key, node.sha256))
            continue
        todo += [i for i in rec.inputs if parse_s3_uri(i.uri)[1].startswith(f"{prefix}partials/")]
    return leaves, problems


def _account_leaf(
    store: ObjectStore, job: str, run_id: str, rnd: int, key: str, sha256: str, acc: RoundAccount
) -> list[str]:
    """Rebuild one leaf's intake from its batches; compare with its stored partial."""
    problems: list[str] = []
    rec = read_lineage(store, key)
    assert rec is not None
    leaf = str(rec.parameters["node"])
    task = LeafTask.model_validate(get_json(store, task_manifest_key(job, run_id, rnd, leaf)))
    selected = set(task.selected_device_ids)
    first_weight: dict[str, int] = {}
    for ref in rec.inputs:
        batch_key = parse_s3_uri(ref.uri)[1]
        if "/updates/" not in batch_key:
            continue
        acc.batches += 1
        obj = store.get(batch_key, expected_sha256=ref.sha256)
        for u in decode_update_batch(obj.data, source=ref.uri):
            if (
                u.device_id in selected
                and u.task_id == task.task_id
                and u.model_version == task.model_version
            ):
                first_weight.setdefault(u.device_id, u.num_samples)
    partial = PartialAggregate.from_bytes(
        store.get(key, expected_sha256=sha256).data, source=f"s3://{store.bucket}/{key}"
    )
    if partial.count > len(first_weight):
        acc.doubled += partial.count - len(first_weight)
        problems.append(
            f"round {rnd} {leaf}: partial counts {partial.count} devices, "
            f"its batches hold {len(first_weight)} distinct ones"
        )
    elif partial.count < len(first_weight):
        problems.append(
            f"round {rnd} {leaf}: partial counts {partial.count} devices of the "
            f"{len(first_weight)} its batches offer (refused: {rec.parameters.get('rejected')})"
        )
    expected_weight = float(sum(first_weight.values()))
    if partial.count == len(first_weight) and abs(partial.weight - expected_weight) > 1e-6:
        acc.doubled += 1
        problems.append(
            f"round {rnd} {leaf}: partial weight {partial.weight} is not the "
            f"{expected_weight} of its distinct devices"
        )
    dup = acc.aggregated & first_weight.keys()
    if dup:
        acc.doubled += len(dup)
        problems.append(f"round {rnd}: devices {sorted(dup)} summed by two leaves")
    acc.aggregated |= first_weight.keys()
    return problems


def account_run(store: ObjectStore, job: str, run_id: str) -> RunAccount:
    """Read a run's committed rounds from S3: who was aggregated, and anything doubled.

    ``store`` must see S3 as it is (not through a fault proxy): this is the judge.
    """
    commit = read_commit(store, job, run_id)
    if commit is None:
        return RunAccount(job, run_id, [], [], ["no commit.json"])
    reports = read_reports(store, commit)
    account = RunAccount(job, run_id, [], reports)
    rounds_seen = [r.round for r in reports]
    if rounds_seen != list(range(len(reports))) or commit.next_round != len(reports):
        account.problems.append(
            f"commit records rounds {rounds_seen}, next {commit.next_round}: a round "
            "is missing or was recorded twice"
        )
    for report in reports:
        acc = RoundAccount(
            report.round, report.outcome, report.devices_reported, report.devices_selected
        )
        account.rounds.append(acc)
        if report.outcome != "committed":
            continue
        prefix = round_prefix(job, run_id, report.round)
        leaves, problems = _partials_and_batches(store, report, prefix)
        account.problems += problems
        for key, sha in leaves:
            account.problems += _account_leaf(store, job, run_id, report.round, key, sha, acc)
        if len(acc.aggregated) != report.devices_reported:
            account.problems.append(
                f"round {report.round}: report says {report.devices_reported} devices, "
                f"the lineage holds {len(acc.aggregated)}"
            )
    return account


@dataclass(frozen=True)
class Reconciliation:
    """Acknowledged versus aggregated, for one run."""

    acknowledged: int
    aggregated: int
    lost: list[RoundDevice]
    doubled: int
    acked_in_abandoned: int
    aggregated_unacked: int
    problems: list[str]

    def line(self) -> str:
        return (
            f"acked {self.acknowledged}, aggregated {self.aggregated}, lost {len(self.lost)}, "
            f"doubled {self.doubled}, acked in abandoned rounds {self.acked_in_abandoned}, "
            f"aggregated without ack {self.aggregated_unacked}"
        )


def reconcile(acked: Iterable[RoundDevice], account: RunAccount) -> Reconciliation:
    """Every acknowledged update must sit in its committed round's aggregate, once.

    An acknowledgement for a round the run abandoned is discarded with the
    round (the protocol promises storage, and a round below ``min_reports``
    applies nothing); one for a round the run never finished counts as lost.
    """
    acked_set = set(acked)
    committed = account.committed
    lost = sorted(
        (rnd, dev)
        for rnd, dev in acked_set
        if rnd not in account.abandoned and dev not in committed.get(rnd, set())
    )
    in_abandoned = sum(1 for rnd, _ in acked_set if rnd in account.abandoned)
    aggregated = account.aggregated
    return Reconciliation(
        acknowledged=len(acked_set),
        aggregated=len(aggregated),
        lost=lost,
        doubled=account.doubled,
        acked_in_abandoned=in_abandoned,
        aggregated_unacked=len(aggregated - acked_set),
        problems=list(account.problems),
    )


def deadline_overruns(
    reports: Sequence[RoundReport], deadline_s: float, slack_s: float
) -> list[str]:
    """Rounds that kept waiting for devices past their deadline (plus ``slack_s``)."""
    return [
        f"round {r.round} waited {r.timings.get('devices', 0.0):.1f}s for devices "
        f"(deadline {deadline_s:g}s)"
        for r in reports
        if r.timings.get("devices", 0.0) > deadline_s + slack_s
    ]
