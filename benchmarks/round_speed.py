"""Round speed: Canopy through its real stack against a plain in-process FedAvg loop.

Issue 11's benchmark. Every figure is measured side by side on this machine, with
runs alternated, so background load (other engineers share the 2 cores) hits both
sides alike; ratios are what to compare.

1. **LeNet round** (``cifar10-mobile``, PyTorch devices by default; ``--runtime
   executorch`` for ExecuTorch): 100 devices x 50 generated CIFAR-shaped images
   (iid), 10 reporting per round, 1 local epoch, batch 16. The *plain loop* is
   the lower bound: the same cohort (``aggregation.cohort.select_cohort``, same
   seed and round), the same data (``edge.data.partition.device_partition``), the
   same device loop and seeds (``edge.training.get_trainer``, as the simulator's
   workers call it), the same leaf intake, FedAvg step, adaptive norm bound and
   evaluation, in one process with no I/O. *Canopy* is the ``federated-training``
   flow run in this process against a real Prefect server (SQLite, tuned like
   ``canopy up``; PostgreSQL with ``--database postgres``), a moto S3 server,
   two gateway processes and the simulator process with an all-fast fleet. A
   round's time is commit to commit (what a run of N rounds costs per round); the
   report's ``duration_s`` (round flow start to commit) is printed too.
2. **Fixed cost** with closed-form devices (``hello-mobile``, instant training) at
   tree depth 1 and 2: round time for cohorts of 5 and 20 reporting devices, fit
   as ``fixed + per_device x reporting`` (and the same over the plain loop), the
   median of each report phase, the pipelined round's critical path from the
   reports' step marks (the round before's model -> handed over -> this round
   has it -> opened -> closed -> every leaf collected -> the new model; the
   evaluation and commit run beside the next round), and a timeline of one round
   from the Prefect API (flow runs, task runs, API calls) and the report's step
   marks.
3. **Deployment start**: ``prefect deployment run federated-training/<name>``
   through a runner serving prefect.yaml (``python -m flows.serve``, as ``canopy
   up`` starts it) until the job's ActiveRound says round 0 is open, split by the
   flow run's states (scheduled, pending: the runner picked it up, running: the
   flow-run subprocess imported the flow).
4. **Peak stack PSS** (``/proc/PID/smaps_rollup``) over every process of the stack,
   sampled twice a second: peak per phase and per process.

Each Canopy run also prints the CPU seconds per round of every process (on 2
cores, a round waits for CPU as much as for anything), and the measured model ->
model and commit -> commit periods beside the sum of the critical path's median
parts. Then issue 11's targets beside what this run measured, met or not, and
last ``canopy/plain round ratio: X.XXx`` for the LeNet round.

Over-selection is 1.0 by default, so both sides train exactly the same devices and
their accuracy must agree round by round (printed); ``--over-selection 1.3`` gives
the flow's default (Canopy then trains 13 and keeps the first 10 reports, the plain
loop trains the first 10 of the 13 in id order).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Prefect's console handlers would print every task's log line; the API still gets them.
for _handler in ("CONSOLE", "CONSOLE_FLOW_RUNS", "CONSOLE_TASK_RUNS"):
    os.environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{_handler}_LEVEL", "WARNING")

from benchmarks._stack import (  # noqa: E402
    BenchStack,
    HttpCall,
    HttpLog,
    PointerWatcher,
    PrefectApi,
    PssPeak,
    PssSampler,
    Simulator,
    cpu_by_root,
    parse_ts,
)

LENET_DEVICES = 100  # x 50 samples each: train_size 5000
SLOW_CALL_S = 0.15  # API calls at least this slow are shown in round timelines
PHASES = ("export", "dispatch", "devices", "close-and-collect", "aggregate", "evaluate")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Workload:
    """One federated configuration, given identically to the flow and to the plain loop."""

    label: str
    job: str
    runtime: str
    devices: int  # simulated phones, and data partitions
    cohort_size: int
    over_selection: float
    tree: dict[str, int]
    local_epochs: int | None = None
    batch_size: int | None = None
    partition: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None
    seed: int = 0
    eval_samples: int = 1000

    def flow_params(self, rounds: int, run_id: str) -> dict[str, Any]:
        """Every parameter the flow takes that shapes a round, so a deployment's own
        defaults (prefect.yaml's lr, max_steps, ...) cannot leak into the comparison."""
        return {
            "job": self.job,
            "run_id": run_id,
            "runtime": self.runtime,
            "rounds": rounds,
            "tree": self.tree,
            "cohort_size": self.cohort_size,
            "over_selection": self.over_selection,
            "min_reports": min(2, self.cohort_size),
            "round_deadline_s": 120.0,
            "registry_wait_s": 60.0,
            "local_epochs": self.local_epochs,
            "max_steps": None,
            "batch_size": self.batch_size,
            "lr": None,
            "momentum": None,
            "strategy": {"name": "fedavg", "server_lr": 1.0},
            "partition": self.partition,
            "num_devices": self.devices,
            "dataset": self.dataset,
            "norm_bound": None,
            "max_device_samples": None,
            "seed": self.seed,
            "eval_samples": self.eval_samples,
        }


def lenet(runtime: str, over_selection: float, tree_depth: int) -> Workload:
    return Workload(
        label=f"LeNet ({runtime})",
        job="cifar10-mobile",
        runtime=runtime,
        devices=LENET_DEVICES,
        cohort_size=10,
        over_selection=over_selection,
        tree={"depth": tree_depth, "width": 2},
        local_epochs=1,
        batch_size=16,
        partition={"kind": "iid"},
        dataset={"source": "synthetic", "train_size": 5000, "test_size": 1000},
    )


def hello(depth: int, cohort: int, devices: int, over_selection: float) -> Workload:
    return Workload(
        label=f"hello depth {depth} cohort {cohort}",
        job="hello-mobile",
        runtime="pytorch",
        devices=devices,
        cohort_size=cohort,
        over_selection=over_selection,
        tree={"depth": depth, "width": 2},
        partition={"kind": "iid"},
    )


# ---------------------------------------------------------------- the plain loop


@dataclass
class PlainRound:
    round: int
    seconds: float
    train_seconds: float
    eval_seconds: float
    test_accuracy: float | None


def plain_fedavg(w: Workload, rounds: int) -> list[PlainRound]:
    """FedAvg in one process: what Canopy computes, without orchestration, I/O or wire.

    The steps are the ones Canopy's round runs, called directly: cohort selection,
    routing to leaves, each device's ``train_locally`` with the simulator's data and
    seeds, the leaf's ``LeafCollector`` (guards, adaptive clipping), the sum, the
    root's one division, the norm bound's next state, the strategy, evaluation.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each simulator worker; 2 threads on 2 busy cores thrash
    try:
        return _plain_rounds(w, rounds)
    finally:
        torch.set_num_threads(threads)  # the in-process flow keeps the runner's default


def _plain_rounds(w: Workload, rounds: int) -> list[PlainRound]:
    import numpy as np

    from aggregation.accumulator import sum_partials
    from aggregation.clipping import AdaptiveNormBound, NormBoundState
    from aggregation.cohort import select_cohort
    from aggregation.collector import LeafCollector
    from aggregation.guards import GuardConfig
    from aggregation.tensors import spec_of
    from aggregation.topology import build_tree
    from edge.data.partition import device_partition, partition_indices
    from edge.jobs import TrainHyperparams, get_job
    from edge.routing import assign_leaves
    from edge.simulator.profiles import simulated_device_id
    from edge.training import RoundModel, evaluate, get_trainer, initial_state
    from tasks.params import TrainingParams
    from tasks.planning import client_hyperparams

    params = TrainingParams.model_validate(w.flow_params(rounds, "plain"))
    job = get_job(params.job)
    data = job.dataset(params.dataset or job.default_dataset, store=None)
    scheme = params.partition or job.partition
    index_of = {simulated_device_id(0, i): i for i in range(w.devices)}
    parts = partition_indices(
        data.y_train, scheme, params.num_devices, params.seed, owners=data.train_owners
    )
    cap = max(int(p.shape[0]) for p in parts)  # the flow's device_weight_cap
    leaves = build_tree(params.tree).leaves
    state = initial_state(job, seed=params.seed)
    strategy = params.strategy.build()
    server_state = strategy.init_state(state)
    norms = NormBoundState()
    trainer = get_trainer(params.runtime)
    x_test, y_test = data.split_arrays("test")
    n_eval = min(params.eval_samples, x_test.shape[0])
    template = _plain_template(job, state, params) if params.runtime == "executorch" else None
    out: list[PlainRound] = []
    for rnd in range(rounds):
        t0 = time.perf_counter()
        selected = select_cohort(
            index_of,
            cohort_size=params.cohort_size,
            over_selection=params.over_selection,
            seed=params.seed,
            rnd=rnd,
        )
        reporting = selected[: params.cohort_size]  # Canopy closes at cohort_size reports
        raw = client_hyperparams(params, job, rnd)
        hyper = TrainHyperparams.model_validate(
            {k: v for k, v in raw.items() if k in TrainHyperparams.model_fields}
        )
        program = None
        if template is not None:
            from edge.training.template import patch_weights

            program = patch_weights(template, state)
        spec = spec_of(state)
        collectors = {}
        for leaf, devices in assign_leaves(reporting, leaves).items():
            collector = LeafCollector(
                spec=spec,
                task_id="plain",
                model_version="plain",
                selected=frozenset(devices),
                guard=GuardConfig(max_norm=params.norm_bound, max_weight=cap),
                norm_state=norms,
            )
            for device in devices:
                index = index_of[device]
                x, y = device_partition(
                    data, scheme, index % params.num_devices, params.num_devices, params.seed
                )
                result = trainer.train(
                    job,
                    RoundModel(state=state, program=program),
                    x,
                    y,
                    hyper,
                    seed=int(raw["seed"]) * 1_000_003 + index,
                )
                collector.offer(
                    device_id=device,
                    task_id="plain",
                    model_version="plain",
                    num_samples=result.num_samples,
                    tensors=result.update,
                    metrics=result.metrics,
                )
            collectors[leaf] = collector
        t1 = time.perf_counter()
        total = sum_partials(c.result() for c in collectors.values())
        mean, _ = total.finalize()
        norms = AdaptiveNormBound().next_state(norms, total.norms)
        state, server_state = strategy.apply(state, mean, server_state)
        t2 = time.perf_counter()
        metrics = evaluate(job, state, x_test[:n_eval], y_test[:n_eval])
        t3 = time.perf_counter()
        acc = metrics.get("accuracy")
        out.append(
            PlainRound(
                rnd, t3 - t0, t1 - t0, t3 - t2, None if acc is None else float(np.float64(acc))
            )
        )
    return out


def _plain_template(job: Any, state: Any, params: Any) -> Any:
    """The plain loop's ExecuTorch program: exported once (parity-gated), patched per round,
    as Canopy does; the one-off export is outside every timed round."""
    from edge.training import export_verified
    from edge.training.template import make_template
    from tasks.params import local_hyperparams

    verified = export_verified(
        job, state, batch_size=local_hyperparams(params, job).batch_size, seed=params.seed
    )
    if verified is None:
        return None
    return make_template(verified.program.pte, state)


# ---------------------------------------------------------------- Canopy runs


@dataclass
class CanopyRun:
    workload: Workload
    run_id: str
    started: float
    ended: float
    reports: list[Any]
    flow_runs: list[dict[str, Any]] = field(default_factory=list)
    task_runs: list[dict[str, Any]] = field(default_factory=list)
    http: list[HttpCall] = field(default_factory=list)
    pointer: dict[tuple[int, str], float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process tree

    def committed(self) -> list[Any]:
        return sorted((r for r in self.reports if r.outcome == "committed"), key=lambda r: r.round)

    def periods(self) -> list[float]:
        """Commit to commit, for every round after the first (round 0 is the warm-up)."""
        done = {r.round: r.finished_at.timestamp() for r in self.reports}
        return [done[r] - done[r - 1] for r in sorted(done) if r >= 1 and r - 1 in done]

    def durations(self) -> list[float]:
        return [r.duration_s for r in self.committed() if r.round >= 1]

    def round_flow(self, rnd: int) -> dict[str, Any] | None:
        name = f"round-{rnd:04d}"
        return next((f for f in self.flow_runs if f["name"] == name), None)


class Bench:
    """The stack, its observers, one simulator per job, and the runs made on them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="canopy-round-speed-"))
        self.stack = BenchStack(self.root, database=args.database)
        self.sims: dict[str, Simulator] = {}
        self.flow_in_process = False
        self.sampler = PssSampler(self._roots)
        self.watcher: PointerWatcher | None = None
        self.http: HttpLog | None = None
        self.targets: list[Target] = []

    def _roots(self) -> dict[str, int]:
        """What the stack is right now: services, running simulators, the flow's process."""
        roots = dict(self.stack.pids())
        roots.update({f"simulator {job}": sim.pid for job, sim in self.sims.items() if sim.running})
        if self.flow_in_process:
            roots["flow (benchmark process)"] = os.getpid()
        return roots

    def start(self) -> None:
        self.stack.start()
        os.environ.update(self.stack.env)
        os.environ["PREFECT_HOME"] = str(self.root / "client-home")
        self.http = HttpLog(self.stack.api)
        self.http.install()
        self.watcher = PointerWatcher([]).__enter__()  # jobs set by the deployment section
        self.sampler.__enter__()

    def stop(self) -> None:
        self.sampler.__exit__()
        if self.watcher is not None:
            self.watcher.__exit__()
        for sim in self.sims.values():
            sim.stop()
        self.stack.stop()

    def simulator(self, job: str, devices: int) -> Simulator:
        """The job's simulator, started and warmed on first use, running (not paused)."""
        sim = self.sims.get(job)
        if sim is not None and sim.devices != devices:
            sim.stop()
            sim = None
        if sim is None:
            sim = Simulator(self.stack, job, devices, max_seconds=3600.0)
            self.sims[job] = sim
            warm = sim.wait_warm()
            print(f"  (simulator for {job}: {devices} devices, warm after {warm:.0f}s)")
        sim.resume()
        return sim

    def prestart(self, fleets: dict[str, int]) -> None:
        """Start every job's simulator at once and wait until all are warm, then pause
        them: their start-ups (torch in each training worker) overlap instead of adding."""
        t0 = time.monotonic()
        for job, devices in fleets.items():
            self.sims[job] = Simulator(self.stack, job, devices, max_seconds=3600.0)
        for sim in self.sims.values():
            sim.wait_warm()
        self.pause_simulators()
        print(
            "  (simulators "
            + ", ".join(f"{job}: {n} devices" for job, n in fleets.items())
            + f"; warm after {time.monotonic() - t0:.0f}s)"
        )

    def pause_simulators(self) -> None:
        for sim in self.sims.values():
            sim.pause()

    def plain(self, w: Workload, rounds: int) -> list[PlainRound]:
        """The plain loop with the simulators stopped, so only the idle servers run beside it."""
        self.pause_simulators()
        return plain_fedavg(w, rounds)

    def canopy(self, w: Workload, rounds: int, phase: str) -> CanopyRun:
        """The flow in this process, the job's simulator in its own, on the shared stack."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.federated import federated_training

        assert self.watcher is not None and self.http is not None
        run_id = f"rs-{uuid.uuid4().hex[:8]}"
        # No pointer polling here: this process is the flow being measured, and the
        # watcher's GETs were a quarter of its botocore time (py-spy). The reports'
        # own marks say when each round opened and closed.
        self.watcher.jobs = []
        self.pause_simulators()
        self.simulator(w.job, w.devices)
        self.sampler.phase = phase
        self.flow_in_process = True
        cpu_before = cpu_by_root(self._roots())
        started = time.time()
        try:
            with temporary_settings(updates={PREFECT_API_URL: self.stack.api}):
                reports = asyncio.run(federated_training(**w.flow_params(rounds, run_id)))
        finally:
            ended = time.time()
            cpu_after = cpu_by_root(self._roots())
            self.sampler.phase = "idle"
            self.flow_in_process = False
            self.pause_simulators()
        run = CanopyRun(w, run_id, started, ended, list(reports))
        run.cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before}
        run.http = self.http.between(started, ended)
        return run

    def read_back(self, run: CanopyRun) -> None:
        """Flow and task runs from the server (task runs arrive through events: wait)."""
        api = PrefectApi(self.stack.api)
        time.sleep(2.0)  # the task-run recorder flushes every second
        runs = []
        for f in api.flow_runs_since(run.started):
            created = parse_ts(f["created"])
            if created is not None and run.started - 1.0 <= created <= run.ended:
                runs.append(f)
        run.flow_runs = runs
        run.task_runs = api.task_runs_of([f["id"] for f in runs])


# ---------------------------------------------------------------- analysis


def phase_medians(reports: Sequence[Any]) -> dict[str, float]:
    measured = [r for r in reports if r.round >= 1 and r.outcome == "committed"]
    return {p: median([r.timings.get(p, 0.0) for r in measured]) for p in PHASES}


def norm_task(name: str) -> str:
    return re.sub(r"\d+", "*", re.sub(r"-[0-9a-f]{3}$", "", name))


def norm_flow(name: str) -> str:
    return re.sub(r"^r\d{4}-", "", re.sub(r"\d{4}$", "*", name))


def round_structure(run: CanopyRun) -> dict[str, Any]:
    """Per measured round: flow runs, task runs, API calls (count, latency) and their kinds."""
    by_round: dict[int, dict[str, Any]] = {}
    creates = sorted(
        (parse_ts(f["created"]) or 0.0, f)
        for f in run.flow_runs
        if re.fullmatch(r"round-\d{4}", f["name"])
    )
    starts = [t for t, _ in creates] + [run.ended]
    for i, (t0, f) in enumerate(creates):
        rnd = int(f["name"][-4:])
        t1 = starts[i + 1]
        if rnd < 1:
            continue
        tag = f"r{rnd:04d}-"
        subflows = [g for g in run.flow_runs if g["name"].startswith(tag)]
        ids = {f["id"], *(g["id"] for g in subflows)}
        tasks = [t for t in run.task_runs if t["flow_run_id"] in ids]
        calls = [c for c in run.http if t0 <= c.at < t1]
        by_round[rnd] = {
            "flow_runs": 1 + len(subflows),
            "task_runs": len(tasks),
            "api_calls": len(calls),
            "api_seconds": sum(c.seconds for c in calls),
            "api_errors": sum(1 for c in calls if c.status >= 400 or c.status == 0),
            "calls": Counter(f"{c.method} {c.path}" for c in calls),
            "call_seconds": _sum_by(calls),
        }
    return by_round


def _sum_by(calls: Sequence[HttpCall]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for c in calls:
        out[f"{c.method} {c.path}"] += c.seconds
    return dict(out)


def timeline(run: CanopyRun, rnd: int) -> list[tuple[float, float | None, str]]:
    """(start, end, what) of one round, in seconds from its round flow run's creation."""
    flow = run.round_flow(rnd)
    if flow is None:
        return []
    base = parse_ts(flow["created"]) or 0.0
    items: list[tuple[float, float | None, str]] = []
    tag = f"r{rnd:04d}-"
    flows = [flow, *(g for g in run.flow_runs if g["name"].startswith(tag))]
    ids = {g["id"]: g["name"] for g in flows}
    for g in flows:
        c, s, e = (parse_ts(g.get(k)) for k in ("created", "start_time", "end_time"))
        if c is not None and s is not None:
            items.append((c - base, s - base, f"flow run {g['name']}: created -> running"))
        if s is not None and e is not None:
            items.append((s - base, e - base, f"flow run {g['name']}: running"))
    for t in run.task_runs:
        if t["flow_run_id"] not in ids:
            continue
        s, e = parse_ts(t.get("start_time")), parse_ts(t.get("end_time"))
        if s is not None:
            items.append((s - base, None if e is None else e - base, f"  task {t['name']}"))
    report = next((r for r in run.reports if r.round == rnd), None)
    for status, mark in (("open", "opened"), ("closed", "closed")):
        if report is not None and report.marks and mark in report.marks:
            items.append((report.marks[mark] - base, None, f"pointer written {status}"))
    end = parse_ts(flow.get("end_time")) or run.ended
    if report is not None:
        items.append((report.finished_at.timestamp() - base, None, "report finished_at (commit)"))
    for c in run.http:  # the API calls that stall a round: slow ones and refused ones
        if base <= c.at <= end and (c.seconds >= SLOW_CALL_S or not 200 <= c.status < 300):
            what = f"    API {c.method} {c.path} -> {c.status or 'no answer'}"
            items.append((c.at - base, c.at + c.seconds - base, what))
    return sorted(items, key=lambda x: x[0])


def startup_timeline(
    run: CanopyRun, states: Sequence[dict[str, Any]], t0: float, opened: float
) -> list[tuple[float, float | None, str]]:
    """A deployment run's start, from ``t0``: its states, then every flow and task run
    that began before round 0 opened (the flow-run subprocess makes them; its API calls
    are not visible from here, the runs it created are)."""
    items: list[tuple[float, float | None, str]] = [
        ((parse_ts(st["timestamp"]) or t0) - t0, None, f"flow run state {st['name']}")
        for st in states
        if (parse_ts(st["timestamp"]) or 0.0) <= opened + 0.5
    ]
    for f in run.flow_runs:
        c, s_, e = (parse_ts(f.get(k)) for k in ("created", "start_time", "end_time"))
        if c is not None and c <= opened and f["name"].startswith(("round-", "r0000-")):
            items.append((c - t0, None if s_ is None else s_ - t0, f"flow run {f['name']} created"))
    for t in run.task_runs:
        s_, e = parse_ts(t.get("start_time")), parse_ts(t.get("end_time"))
        if s_ is not None and s_ <= opened:
            items.append((s_ - t0, None if e is None else e - t0, f"  task {t['name']}"))
    items.append((opened - t0, None, "pointer says round 0 open (seen in S3)"))
    return sorted(items, key=lambda x: x[0])


def subflow_overheads(run: CanopyRun) -> dict[str, dict[str, float]]:
    """Per subflow kind (median over measured rounds): created->running, and the part of its
    run not covered by its own tasks (engine set-up, state changes, result handling)."""
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    tasks_by_flow: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in run.task_runs:
        tasks_by_flow[t["flow_run_id"]].append(t)
    for f in run.flow_runs:
        m = re.match(r"^r(\d{4})-|^round-(\d{4})$", f["name"])
        if m is None or int(m.group(1) or m.group(2)) < 1:
            continue
        c, s, e = (parse_ts(f.get(k)) for k in ("created", "start_time", "end_time"))
        if c is None or s is None or e is None:
            continue
        kind = "round" if f["name"].startswith("round-") else norm_flow(f["name"])
        rows[kind]["created->running"].append(s - c)
        rows[kind]["running"].append(e - s)
        spans = [
            (parse_ts(t["start_time"]), parse_ts(t["end_time"]))
            for t in tasks_by_flow.get(f["id"], [])
            if t.get("start_time") and t.get("end_time")
        ]
        if spans and kind != "round":
            first = min(a for a, _ in spans if a is not None)
            last = max(b for _, b in spans if b is not None)
            rows[kind]["not in tasks"].append((e - s) - (last - first))
            rows[kind]["tasks"].append(float(len(spans)))
    return {k: {m: median(v) for m, v in d.items()} for k, d in rows.items()}


def task_medians(run: CanopyRun) -> dict[str, float]:
    rows: dict[str, list[float]] = defaultdict(list)
    round_ids = {
        f["id"]
        for f in run.flow_runs
        if (m := re.match(r"^r(\d{4})-|^round-(\d{4})$", f["name"])) is not None
        and int(m.group(1) or m.group(2)) >= 1
    }
    for t in run.task_runs:
        if t["flow_run_id"] not in round_ids or not t.get("start_time") or not t.get("end_time"):
            continue
        rows[norm_task(t["name"])].append(
            (parse_ts(t["end_time"]) or 0.0) - (parse_ts(t["start_time"]) or 0.0)
        )
    return {k: median(v) for k, v in sorted(rows.items())}


def fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = a + b x``: (fixed, per unit)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


# ---------------------------------------------------------------- printing


def fmt_phases(phases: dict[str, float]) -> str:
    return "  ".join(f"{p} {phases[p]:.2f}" for p in PHASES)


CYCLE = (
    ("hand-over", "model", "handed"),  # the round before's model -> handed to this round
    ("wake-up", "handed", "start"),  # -> this round has it
    ("open", "start", "opened"),
    ("devices", "opened", "closed"),
    ("collect", "closed", "collected"),
    ("aggregate", "collected", "model"),
)


MEASURED = "model -> model"


@dataclass(frozen=True)
class Target:
    """One of issue 11's targets beside what this run measured (lower is better)."""

    what: str
    measured: float
    limit: float
    unit: str

    def line(self) -> str:
        verdict = "met" if self.measured <= self.limit else "NOT met"
        got, limit = f"{self.measured:.2f}{self.unit}", f"{self.limit:g}{self.unit}"
        return f"  {self.what}: {got} (target {limit}) {verdict}"


def print_targets(targets: Sequence[Target]) -> None:
    if targets:
        print("\n== issue 11's targets, as measured in this run")
        for t in targets:
            print(t.line())


def print_cpu(label: str, runs: Sequence[CanopyRun]) -> None:
    """CPU seconds per round by process (the machine has os.cpu_count() cores to share):
    what the stack burns while a round's critical path waits for its turn."""
    total: dict[str, float] = defaultdict(float)
    rounds = wall = 0.0
    for run in runs:
        rounds += len(run.reports)
        wall += run.ended - run.started
        for name, seconds in run.cpu.items():
            total[name] += seconds
    if not rounds or not total:
        return
    busy = sum(total.values())
    print(
        f"  {label}: {busy / rounds:.2f} CPU s per round over {wall / rounds:.2f} s of wall "
        f"({busy / wall:.2f} of {os.cpu_count()} cores busy): "
        + ", ".join(
            f"{name} {seconds / rounds:.2f}"
            for name, seconds in sorted(total.items(), key=lambda kv: -kv[1])
        )
    )


def print_cycle(label: str, runs: Sequence[Sequence[Any]]) -> None:
    """Rounds are pipelined: one round's critical path runs from the round before's new
    model to its own; evaluation and commit run beside the next round (report marks)."""
    parts: dict[str, list[float]] = defaultdict(list)
    for reports in runs:
        cycle_parts(reports, parts)
    if not parts:
        print(f"  {label}: no step marks in the reports")
        return
    on_path = sum(median(parts[n]) for n, _, _ in CYCLE if parts[n])
    print(
        f"  {label}: model -> model {on_path:.2f}s = "
        + " + ".join(f"{n} {median(parts[n]):.2f}" for n, _, _ in CYCLE if parts[n])
        + "; off the path: "
        + ", ".join(f"{n} {median(v):.2f}" for n, v in parts.items() if "beside" in n)
        + f" (medians of {len(parts['devices'])})"
    )
    if parts[MEASURED]:
        print(
            f"    measured model -> model {median(parts[MEASURED]):.2f}s (median; the sum "
            "above is of each part's median)"
        )


def cycle_parts(reports: Sequence[Any], parts: dict[str, list[float]]) -> None:
    """One run's rounds (round 0 excluded) split along the cycle, added to ``parts``."""
    by_round = {r.round: r.marks for r in reports if r.marks}
    for rnd, marks in by_round.items():
        prev = by_round.get(rnd - 1)
        if rnd < 1 or prev is None:
            continue
        for name, a, b in CYCLE:
            start = prev if name in ("hand-over", "wake-up") else marks
            end = prev if name == "hand-over" else marks
            if a in start and b in end:
                parts[name].append(end[b] - start[a])
        if "model" in marks and "evaluated" in marks:
            parts["evaluate (beside the next round)"].append(marks["evaluated"] - marks["model"])
        commit = r_finished(reports, rnd)
        if commit is not None and "model" in marks:
            parts["model -> commit (beside the next round)"].append(commit - marks["model"])
        if "model" in marks and "model" in prev:
            parts[MEASURED].append(marks["model"] - prev["model"])


def r_finished(reports: Sequence[Any], rnd: int) -> float | None:
    return next((r.finished_at.timestamp() for r in reports if r.round == rnd), None)


def print_structure(label: str, run: CanopyRun, top: int = 8) -> None:
    rounds = round_structure(run)
    if not rounds:
        return
    per = list(rounds.values())
    calls: Counter[str] = Counter()
    secs: dict[str, float] = defaultdict(float)
    for r in per:
        calls.update(r["calls"])
        for k, v in r["call_seconds"].items():
            secs[k] += v
    n = len(per)
    print(
        f"  {label}: per round {median([r['flow_runs'] for r in per]):.0f} flow runs, "
        f"{median([r['task_runs'] for r in per]):.0f} task runs, "
        f"{median([r['api_calls'] for r in per]):.0f} Prefect API calls from the flow process "
        f"({median([r['api_seconds'] for r in per]):.2f}s summed latency, "
        f"{sum(r['api_errors'] for r in per)} errors in {n} rounds)"
    )
    for key, count in calls.most_common(top):
        print(f"      {count / n:5.1f}/round  {secs[key] / n:6.3f}s/round  {key}")
    over = subflow_overheads(run)
    for kind, row in over.items():
        extra = (
            f", {row['not in tasks']:.3f}s of its run outside its {row['tasks']:.0f} task(s)"
            if "not in tasks" in row
            else ""
        )
        print(
            f"      subflow {kind:<16} created->running {row['created->running']:.3f}s, "
            f"running {row['running']:.3f}s{extra}"
        )
    tasks = task_medians(run)
    print("      task medians: " + ", ".join(f"{k} {v:.3f}" for k, v in tasks.items()))


def print_timeline(label: str, run: CanopyRun) -> None:
    measured = [r for r in run.committed() if r.round >= 1]
    if not measured:
        return
    pick = sorted(measured, key=lambda r: r.duration_s)[len(measured) // 2]
    print(f"  timeline of {label} round {pick.round} (s from its round flow run's creation):")
    for start, end, what in timeline(run, pick.round):
        span = f"{start:6.3f}-{end:6.3f}" if end is not None else f"{start:6.3f}       "
        print(f"    {span}  {what}")


def stack_kib(peak: PssPeak) -> int:
    """A phase's peak PSS without the simulated phones (they stand in for the fleet)."""
    phones = sum(kib for label, kib in peak.processes.items() if label.startswith("simulator"))
    return peak.total_kib - phones


def pss_lines(sampler: PssSampler) -> list[str]:
    lines = []
    for phase, peak in sampler.peaks.items():
        if phase == "idle" or not peak.processes:
            continue
        lines.append(
            f"  {phase}: peak {peak.total_kib / 1024:.0f} MiB PSS in {len(peak.processes)} "
            f"processes ({peak.samples} samples); without the simulated phones "
            f"{stack_kib(peak) / 1024:.0f} MiB"
        )
        for label, kib in sorted(peak.processes.items(), key=lambda kv: -kv[1]):
            own = peak.maxima.get(label, kib)
            lines.append(
                f"      {kib / 1024:7.0f} MiB  {label}  (its own peak {own / 1024:.0f} MiB)"
            )
    return lines


# ---------------------------------------------------------------- sections


def lenet_section(bench: Bench, args: argparse.Namespace) -> tuple[float, float, CanopyRun | None]:
    w = lenet(args.runtime, args.over_selection, args.tree_depth)
    print(
        f"\n== {w.label}: {w.devices} devices x 50 samples (iid, generated CIFAR-shaped), "
        f"cohort {w.cohort_size} (over-selection {w.over_selection}), 1 local epoch, batch 16, "
        f"tree depth {args.tree_depth} width 2; {args.rounds} rounds per run (round 0 is "
        f"warm-up), {args.pairs} alternated pairs"
    )
    plain_all: list[float] = []
    canopy_all: list[float] = []
    durations: list[float] = []
    pair_ratios: list[float] = []
    runs: list[CanopyRun] = []
    plain_acc: list[float | None] = []
    for pair in range(args.pairs):
        plain = bench.plain(w, args.rounds)
        p = [r.seconds for r in plain if r.round >= 1]
        plain_all += p
        plain_acc = [r.test_accuracy for r in plain]
        print(
            f"  plain  #{pair + 1}: rounds {' '.join(f'{x:.3f}' for x in p)} s (median "
            f"{median(p):.3f}; train {median([r.train_seconds for r in plain[1:]]):.3f}, "
            f"evaluate {median([r.eval_seconds for r in plain[1:]]):.3f})"
        )
        run = bench.canopy(w, args.rounds, phase=f"{w.label}, flow in-process")
        runs.append(run)
        c = run.periods()
        canopy_all += c
        durations += run.durations()
        print(
            f"  canopy #{pair + 1}: rounds {' '.join(f'{x:.2f}' for x in c)} s commit->commit "
            f"(median {median(c):.2f}; report duration_s median {median(run.durations()):.2f}; "
            f"round 0 took {min(run.reports, key=lambda r: r.round).duration_s:.1f}s)"
        )
        pair_ratios.append(median(c) / median(p))
    plain_med, canopy_med = median(plain_all), median(canopy_all)
    print(
        f"  LeNet median round: plain {plain_med:.3f}s, canopy {canopy_med:.2f}s commit->commit "
        f"({median(durations):.2f}s report duration_s); ratio {canopy_med / plain_med:.2f}x "
        f"(per pair {', '.join(f'{r:.1f}x' for r in pair_ratios)}; by duration_s "
        f"{median(durations) / plain_med:.2f}x)"
    )
    last = runs[-1]
    canopy_acc = {r.round: r.test_accuracy for r in last.reports}
    print(
        "  test accuracy by round, plain vs canopy (last pair): "
        + ", ".join(
            f"r{i} {100 * (a or 0):.1f}/{100 * (canopy_acc.get(i) or 0):.1f}%"
            for i, a in enumerate(plain_acc)
        )
    )
    for run in runs:
        bench.read_back(run)
    all_reports = [r for run in runs for r in run.reports]
    print(f"  phases (median s): {fmt_phases(phase_medians(all_reports))}")
    print_cycle("critical path", [run.reports for run in runs])
    print_cpu("CPU", runs)
    print_structure("Prefect", last)
    print_timeline("LeNet", last)
    return plain_med, canopy_med, last


def hello_fleet(args: argparse.Namespace) -> int:
    cohorts = [int(c) for c in args.hello_cohorts.split(",")]
    return max(args.hello_devices, math.ceil(max(cohorts) * args.over_selection))


def hello_section(bench: Bench, args: argparse.Namespace) -> None:
    cohorts = [int(c) for c in args.hello_cohorts.split(",")]
    devices = hello_fleet(args)
    print(
        f"\n== hello-mobile (closed form, instant training): {devices} devices, cohorts "
        f"{cohorts} (over-selection {args.over_selection}), {args.hello_rounds} rounds per run"
    )
    for depth in args.hello_depths:
        points, over_plain = [], []
        runs: list[CanopyRun] = []
        for cohort in cohorts:
            w = hello(depth, cohort, devices, args.over_selection)
            plain = median([r.seconds for r in bench.plain(w, args.hello_rounds)[1:]])
            run = bench.canopy(w, args.hello_rounds, phase="hello-mobile, flow in-process")
            bench.read_back(run)
            runs.append(run)
            period = median(run.periods())
            points.append((float(cohort), period))
            over_plain.append((float(cohort), period - plain))
            print(
                f"  depth {depth} cohort {cohort:>3}: canopy {period:.2f}s commit->commit "
                f"(duration_s {median(run.durations()):.2f}), plain {1000 * plain:.1f} ms | "
                f"{fmt_phases(phase_medians(run.reports))}"
            )
            print_cycle("critical path", [run.reports])
            print_cpu("CPU", [run])
        fixed, per = fit(points)
        fixed_p, per_p = fit(over_plain)
        print(
            f"  depth {depth} fit: round = {fixed:.2f}s fixed + {1000 * per:.0f} ms x reporting "
            f"devices; over the plain loop {fixed_p:.2f}s + {1000 * per_p:.0f} ms/device"
        )
        if depth == 2:
            bench.targets += [
                Target(
                    "closed-form round at depth 2, fixed cost over the plain loop (fit)",
                    fixed_p,
                    0.5,
                    "s",
                ),
                Target(
                    "closed-form round at depth 2, per reporting device (fit)",
                    1000 * per_p,
                    5.0,
                    " ms",
                ),
            ]
        print_structure(f"depth {depth} cohort {cohorts[-1]}", runs[-1])
        if depth == max(args.hello_depths):
            print_timeline(f"hello depth {depth} cohort {cohorts[-1]}", runs[-1])


def deploy_section(bench: Bench, args: argparse.Namespace) -> None:
    """Deployment run -> round 0 open, with the runner forking warm flow-run processes
    (what `canopy up` runs) and, alternated with it, Prefect's cold start (the lower
    bound's opposite: the same runner with ``--cold-start``)."""
    assert bench.watcher is not None
    w = lenet(args.runtime, args.over_selection, args.tree_depth)
    name = "cifar10-mobile-pt" if args.runtime == "pytorch" else "cifar10-mobile"
    print(f"\n== deployment: prefect deployment run federated-training/{name} -> round 0 open")
    bench.watcher.jobs = [w.job]
    bench.pause_simulators()
    bench.simulator(w.job, w.devices)  # as under `canopy up`: the phones are already polling
    starts: dict[str, list[float]] = {"warm": [], "cold": []}
    modes = ["warm", "cold"] if args.deploy_compare else ["warm"]
    for i in range(args.deploy_runs):
        for mode in modes:
            bench.sampler.phase = "runner start"
            runner_s = bench.stack.start_runner([name], cold=mode == "cold")
            print(f"  [{mode}] runner (python -m flows.serve) registered in {runner_s:.1f}s")
            bench.sampler.phase = f"deployment run ({w.label}, runner + flow subprocess, {mode})"
            try:
                took = deploy_once(bench, args, w, name, i)
                if took is not None:
                    starts[mode].append(took)
            finally:
                bench.sampler.phase = "idle"
                bench.stack.stop_runner()
    if starts["warm"]:
        bench.targets.append(
            Target(
                "prefect deployment run -> round 0 open (warm runner)",
                statistics.median(starts["warm"]),
                10.0,
                " s",
            )
        )
    if starts["warm"] and starts["cold"]:
        warm, cold = statistics.median(starts["warm"]), statistics.median(starts["cold"])
        print(
            f"  deployment run -> round 0 open, medians: warm {warm:.1f}s, cold {cold:.1f}s "
            f"(Prefect's spawn), warm/cold {warm / cold:.2f}"
        )
    bench.pause_simulators()


def deploy_once(
    bench: Bench, args: argparse.Namespace, w: Workload, name: str, i: int
) -> float | None:
    """One deployment run; seconds from the CLI's start to round 0 open (None: it failed)."""
    from infra.run_state import read_commit, read_reports
    from infra.settings import S3Settings
    from infra.store import S3ObjectStore

    assert bench.watcher is not None
    api = PrefectApi(bench.stack.api)
    run_id = f"rs-deploy-{uuid.uuid4().hex[:6]}"
    params = w.flow_params(args.deploy_rounds, run_id)
    cmd = [str(Path(sys.executable).parent / "prefect"), "deployment", "run"]
    cmd += [f"federated-training/{name}", "--params", json.dumps(params)]
    t0 = time.time()
    cli = subprocess.run(
        cmd, env=bench.stack.child_env(), capture_output=True, text=True, timeout=120, check=False
    )
    t_cli = time.time()
    found = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", cli.stdout)
    if cli.returncode != 0 or found is None:
        print(f"  deployment run failed: {cli.stdout[-2000:]} {cli.stderr[-2000:]}")
        return None
    flow_run_id = found.group(0)
    opened = bench.watcher.wait_for(run_id, 0, "open", timeout=args.max_seconds)
    deadline = time.monotonic() + args.max_seconds
    state = ""
    while time.monotonic() < deadline:
        state = api.flow_run(flow_run_id)["state_type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(1.0)
    first: dict[str, float] = {}
    for st in api.states(flow_run_id):
        first.setdefault(st["type"], parse_ts(st["timestamp"]) or 0.0)
    if opened is None:
        print(f"  round 0 never opened (flow run ended {state}); see {bench.root}/runner.log")
        return None
    created = parse_ts(api.flow_run(flow_run_id)["created"]) or t0
    pending, running = first.get("PENDING"), first.get("RUNNING")
    print(f"  run #{i + 1}: deployment run -> round 0 open {opened - t0:.1f}s (flow run {state})")
    print(
        f"      CLI start-up to flow run created: {created - t0:.2f}s (CLI exits {t_cli - t0:.2f}s)"
    )
    if pending is not None:
        print(f"      scheduled -> pending (the runner's poll): {pending - created:.2f}s")
    if pending is not None and running is not None:
        print(f"      pending -> running (subprocess, imports, engine): {running - pending:.2f}s")
    if running is not None:
        print(f"      running -> round 0 open (in the flow): {opened - running:.2f}s")
    store = S3ObjectStore(S3Settings())
    commit = read_commit(store, w.job, run_id)
    run = CanopyRun(w, run_id, t0, time.time(), [])
    bench.read_back(run)
    run.pointer = {
        (e.round, e.status): e.seen_at for e in bench.watcher.events if e.run_id == run_id
    }
    print("      from the CLI's start (s): flow run states, tasks and subflows up to round 0 open")
    for start, end, what in startup_timeline(run, api.states(flow_run_id), t0, opened):
        span = f"{start:6.2f}-{end:6.2f}" if end is not None else f"{start:6.2f}       "
        print(f"        {span}  {what}")
    if commit is not None:
        reports = read_reports(store, commit)
        done = {r.round: r.finished_at.timestamp() for r in reports}
        periods = [done[r] - done[r - 1] for r in sorted(done) if r >= 1]
        print(
            f"      its rounds: duration_s {' '.join(f'{r.duration_s:.2f}' for r in reports)}; "
            f"commit->commit {' '.join(f'{p:.2f}' for p in periods)}"
        )
    return opened - t0


def import_probe() -> None:
    """What a fresh flow-run subprocess pays before the flow starts: its imports."""
    code = (
        "import time,sys;t=time.perf_counter();import torch;a=time.perf_counter();"
        "import prefect;b=time.perf_counter();import flows.federated;c=time.perf_counter();"
        "print(f'{a-t:.2f} {b-a:.2f} {c-b:.2f} '"
        "+str(any(m.startswith('executorch') for m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    parts = out.stdout.split()
    if len(parts) == 4:
        print(
            f"  fresh interpreter imports: torch {parts[0]}s, then prefect {parts[1]}s, then "
            f"flows.federated {parts[2]}s more (ExecuTorch loaded: {parts[3]})"
        )


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=4, help="LeNet rounds per run (round 0 warms up)."
    )
    parser.add_argument("--pairs", type=int, default=2, help="Alternated plain/Canopy LeNet pairs.")
    parser.add_argument("--runtime", choices=["pytorch", "executorch"], default="pytorch")
    parser.add_argument("--over-selection", type=float, default=1.0)
    parser.add_argument("--tree-depth", type=int, default=2, help="LeNet tree depth (width 2).")
    parser.add_argument("--hello-rounds", type=int, default=3)
    parser.add_argument("--hello-cohorts", default="5,20")
    parser.add_argument("--hello-depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hello-devices", type=int, default=40)
    parser.add_argument("--deploy-rounds", type=int, default=1)
    parser.add_argument("--deploy-runs", type=int, default=1)
    parser.add_argument(
        "--deploy-compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Alternate each deployment run with one on a cold-start runner (--cold-start).",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=300.0, help="Give up on a run after this long."
    )
    parser.add_argument(
        "--database",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="Prefect server's database (postgres: one started as `canopy up --database "
        "postgres` starts it).",
    )
    parser.add_argument("--skip-lenet", action="store_true")
    parser.add_argument("--skip-hello", action="store_true")
    parser.add_argument("--skip-deploy", action="store_true")
    parser.add_argument("--skip-import-probe", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.chdir(REPO)  # the runner serves flows/federated.py by a path relative to here
    t_start = time.monotonic()
    bench = Bench(args)
    ratio: float | None = None
    try:
        bench.start()
        fleets = {}
        if not (args.skip_lenet and args.skip_deploy):
            fleets["cifar10-mobile"] = LENET_DEVICES
        if not args.skip_hello:
            fleets["hello-mobile"] = hello_fleet(args)
        bench.prestart(fleets)
        if not args.skip_lenet:
            plain, canopy, _ = lenet_section(bench, args)
            ratio = canopy / plain
            bench.targets.append(Target("LeNet round, Canopy/plain", ratio, 2.0, "x"))
        if not args.skip_hello:
            hello_section(bench, args)
        if not args.skip_deploy:
            deploy_section(bench, args)
            if not args.skip_import_probe:
                import_probe()
    finally:
        bench.stop()
    print("\n== peak stack PSS (sum over every process of the stack, sampled every 0.5 s)")
    for line in pss_lines(bench.sampler):
        print(line)
    for phase, peak in bench.sampler.peaks.items():
        if phase.startswith("deployment run") and phase.endswith("warm)") and peak.processes:
            gb = stack_kib(peak) * 1024 / 1e9
            bench.targets.append(
                Target("peak stack PSS without the phones, deployment run", gb, 1.2, " GB")
            )
    print_targets(bench.targets)
    print(f"\n(benchmark took {time.monotonic() - t_start:.0f}s; logs in {bench.root})")
    if ratio is not None:
        print(f"canopy/plain round ratio: {ratio:.2f}x")


if __name__ == "__main__":
    main()
