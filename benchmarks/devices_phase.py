"""The devices phase of a round, through the real edge, beside its lower bound (issue 11).

The *devices phase* is what a round spends between the flow's write of the open
``ActiveRound`` pointer and the moment its close task counts ``cohort_size``
uploads in S3. This benchmark measures exactly that, without Prefect: this
process plays the flow's part with the flow's own code (``tasks.planning.plan_round``,
``edge.round_control.open_round``, then ``tasks.intake.count_reports`` every
``--close-poll`` seconds, as ``tasks.collect.close_when_due`` does, and tells
each gateway right after the pointer write, ``POST /v1/jobs/{job}/wake``, unless
``--no-nudge``), against

* moto's S3 as the stack serves it (``python -m infra.s3_server``) and two
  gateway processes (``python -m edge.gateway``, default settings, as ``canopy
  up`` runs them), and
* the device simulator in a process of its own (``run_simulation``, an all-fast
  fleet, two spawned training workers), which reports every device's steps
  (``edge.simulator.trace``) so the phase can be split: long-poll wake-up,
  download, hand-off to a worker, training, upload and group commit, count.

The **lower bound**, measured in the same round right after the close, with the
devices idle in their long polls: the same cohort's training requests (same
weights, hyperparameters, data and seeds) submitted at once to *the same two
worker processes*, plus one S3 PUT of all their updates. Nothing the edge does
can make the phase shorter than that; the printed ratio is phase / lower bound.

Workloads (``--workloads``): ``lenet`` (cifar10-mobile, PyTorch, 100 devices x 50
generated CIFAR-shaped images, 10 reporting, 1 local epoch, batch 16, 4 leaves:
round_speed.py's LeNet round) and ``hello5``/``hello20`` (hello-mobile, closed
form, cohorts 5 and 20 of 40 devices). Round 0 of each warms up and is not counted.

    .venv/bin/python benchmarks/devices_phase.py            # ~1 minute
    .venv/bin/python benchmarks/devices_phase.py --rounds 8 --workloads lenet
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._stack import free_port  # noqa: E402
from edge.simulator.trace import StepEvent  # noqa: E402

# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    job: str
    devices: int
    cohort: int
    depth: int
    params: dict[str, Any] = field(default_factory=dict)


WORKLOADS = {
    "lenet": Workload(
        "LeNet (PyTorch), 10 of 100 devices x 50 images",
        "cifar10-mobile",
        100,
        10,
        2,
        {
            "local_epochs": 1,
            "batch_size": 16,
            "partition": {"kind": "iid"},
            "dataset": {"source": "synthetic", "train_size": 5000, "test_size": 1000},
        },
    ),
    "hello5": Workload("hello-mobile, 5 of 40 devices", "hello-mobile", 40, 5, 2),
    "hello20": Workload("hello-mobile, 20 of 40 devices", "hello-mobile", 40, 20, 2),
}


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- the simulator's process


def simulator_process(conn: Connection, job: str, devices: int, gateways: list[str]) -> None:
    """The simulator (all fast, two workers) plus a door to its workers for the lower bound.

    Commands from the parent: ``("events", None)`` -> the steps traced since the last
    call; ``("train", [TrainRequest])`` -> (wall seconds to train them all at once on
    the simulator's own pool, the updates); ``("stop", None)``.
    """
    asyncio.run(_simulate(conn, job, devices, gateways))


async def _simulate(conn: Connection, job: str, devices: int, gateways: list[str]) -> None:
    from edge.simulator import SimulationConfig, run_simulation, training_pool
    from edge.simulator.work import train_in_worker, warm_worker

    pool = training_pool(2)
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(pool, warm_worker, job) for _ in range(2)))
    config = SimulationConfig(
        job=job,
        devices=devices,
        gateways=gateways,
        until_done=False,
        dropout=0.0,
        slow_fraction=0.0,
        offline_fraction=0.0,
        workers=2,
        progress=False,
        max_seconds=3600.0,
    )
    events: list[StepEvent] = []
    simulation = asyncio.ensure_future(run_simulation(config, pool=pool, trace=events.append))
    conn.send(("ready", None))
    try:
        while True:
            command, payload = await loop.run_in_executor(None, conn.recv)
            if command == "events":
                conn.send(("events", list(events)))
                events.clear()
            elif command == "train":
                started = time.perf_counter()
                replies = await asyncio.gather(
                    *(loop.run_in_executor(pool, train_in_worker, r) for r in payload)
                )
                wall = time.perf_counter() - started
                conn.send(("trained", (wall, [r.update for r in replies])))
            else:
                break
    finally:
        simulation.cancel()
        await asyncio.gather(simulation, return_exceptions=True)
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the stand-in flow


@dataclass
class RoundMeasure:
    """One round: the phase, its lower bound, and the devices' steps in it."""

    round: int
    phase: float  # pointer PUT returned -> count_reports saw the target
    lower_bound: float  # training alone on the same workers + one PUT
    train_wall: float
    put_seconds: float
    last_answer: float  # pointer PUT returned -> the last counted device's upload answered
    steps: dict[str, list[float]]  # step name -> per-device seconds


def step_split(events: Sequence[StepEvent], opened: float, rnd: int) -> dict[str, list[float]]:
    """Per device: where its time went between the round's open and its upload's answer."""
    by_device: dict[str, dict[str, StepEvent]] = defaultdict(dict)
    for e in events:
        if e.round == rnd:
            by_device[e.device_id].setdefault(e.step, e)
    out: dict[str, list[float]] = defaultdict(list)
    for steps in by_device.values():
        if not {"offered", "downloaded", "training", "trained", "answered"} <= steps.keys():
            continue
        trained = steps["trained"]
        compute = trained.seconds or 0.0
        out["open -> offered (long poll wakes)"].append(steps["offered"].at - opened)
        out["offered -> downloaded"].append(steps["downloaded"].at - steps["offered"].at)
        out["downloaded -> worker answered, minus compute"].append(
            trained.at - steps["downloaded"].at - compute
        )
        out["compute in the worker"].append(compute)
        out["upload -> acknowledged (group commit)"].append(
            steps["answered"].at - steps["uploading"].at
        )
        out["open -> acknowledged"].append(steps["answered"].at - opened)
    return dict(out)


class StandIn:
    """Opens rounds as the flow's open task does and counts uploads as its close task does."""

    def __init__(
        self,
        w: Workload,
        store: Any,
        close_poll: float,
        conn: Connection,
        nudge: list[str] | None = None,
    ) -> None:
        from edge.jobs import get_job
        from edge.simulator.profiles import simulated_device_id
        from edge.training import initial_state
        from tasks.params import TrainingParams

        self.w, self.store, self.close_poll, self.conn = w, store, close_poll, conn
        self.nudge = nudge or []  # gateway URLs told of each open
        self._http: Any = None  # a keep-alive client for the nudges
        self.run_id = f"dp-{uuid.uuid4().hex[:8]}"
        self.params = TrainingParams.model_validate(
            {
                "job": w.job,
                "run_id": self.run_id,
                "runtime": "pytorch",
                "rounds": 100,
                "tree": {"depth": w.depth, "width": 2},
                "cohort_size": w.cohort,
                "over_selection": 1.0,
                "min_reports": 1,
                "round_deadline_s": 120.0,
                "num_devices": w.devices,
                **w.params,
            }
        )
        self.job = get_job(w.job)
        self.state = initial_state(self.job, seed=0)
        self.index_of = {simulated_device_id(0, i): i for i in range(w.devices)}

    def _ask(self, command: str, payload: Any = None) -> Any:
        self.conn.send((command, payload))
        return self.conn.recv()[1]

    def play(self, rnd: int) -> RoundMeasure:
        from aggregation.tensors import encode_tensors
        from aggregation.topology import build_tree
        from edge import round_control
        from infra.keys import global_model_key
        from tasks.intake import count_reports
        from tasks.planning import plan_round

        # A new model each round, as after an aggregation: no gateway holds its bytes yet.
        state = {k: (v + np.float32(1e-4 * rnd)).astype(v.dtype) for k, v in self.state.items()}
        data = encode_tensors(state)
        ref = self.store.put_bytes(
            global_model_key(self.w.job, self.run_id, rnd), data, kind="global-model"
        )
        plan = plan_round(
            self.params,
            self.job,
            rnd=rnd,
            devices=sorted(self.index_of),
            leaves=build_tree(self.params.tree).leaves,
            global_model=ref,
            tensor_spec={k: (list(v.shape), v.dtype.name) for k, v in state.items()},
            now=__import__("datetime").datetime.now(__import__("datetime").UTC),
            program=None,
        )
        self._ask("events")  # forget the steps of earlier rounds
        round_control.open_round(self.store, plan.tasks, plan.active)
        opened = time.time()
        self.wake_gateways()
        while count_reports(self.store, self.w.job, self.run_id, rnd) < plan.target:
            if time.time() - opened > 120:
                raise TimeoutError(f"round {rnd}: {plan.target} uploads never arrived")
            time.sleep(self.close_poll)
        seen = time.time()
        round_control.set_round_status(self.store, plan.active, "closed")
        events: list[StepEvent] = self._ask("events")
        steps = step_split(events, opened, rnd)
        wall, put = self.lower_bound(plan, data, rnd)
        return RoundMeasure(
            rnd,
            seen - opened,
            wall + put,
            wall,
            put,
            max(steps.get("open -> acknowledged", [float("nan")])),
            steps,
        )

    def wake_gateways(self) -> None:
        """What the flow would do after the pointer write: nudge each gateway's watch."""
        if not self.nudge:
            return
        import httpx

        from edge.protocol import wake_path

        if self._http is None:
            self._http = httpx.Client(timeout=1.0)
        for url in self.nudge:
            try:
                self._http.post(f"{url}{wake_path(self.w.job)}")
            except httpx.HTTPError as exc:  # a hint: a gateway that missed it polls anyway
                print(f"  (nudge to {url} failed: {exc})")

    def lower_bound(self, plan: Any, weights: bytes, rnd: int) -> tuple[float, float]:
        """The same cohort trained at once on the simulator's two workers, then one PUT."""
        from edge.simulator.work import TrainRequest

        requests = []
        for task in plan.tasks.values():
            for device in task.selected_device_ids:
                requests.append(
                    TrainRequest(
                        job=self.w.job,
                        runtime="pytorch",
                        device_index=self.index_of[device],
                        weights=weights,
                        hyperparams=dict(task.hyperparams),
                        data_hint=task.data_hint.model_dump() if task.data_hint else None,
                        fleet_size=self.w.devices,
                        fleet_seed=0,
                    )
                )
        time.sleep(0.2)  # let the gateways' last lineage writes end: the PUT gets moto alone
        wall, updates = self._ask("train", requests)
        started = time.perf_counter()
        self.store.put_bytes(
            f"bench/{self.run_id}/lower-bound-{rnd:05d}", b"".join(updates), kind="bench"
        )
        return wall, time.perf_counter() - started


# ---------------------------------------------------------------- the stack


class Edge:
    """moto and two gateway processes (default settings), and the simulator's process."""

    def __init__(self, root: Path) -> None:
        from infra.health import wait_http_ok
        from infra.process import spawn

        self.root = root
        s3_port = free_port()
        self.env = {
            **os.environ,
            "CANOPY_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
            "CANOPY_S3_BUCKET": "canopy",
            "CANOPY_S3_ACCESS_KEY_ID": "testing",
            "CANOPY_S3_SECRET_ACCESS_KEY": "testing",
            "CANOPY_S3_CREATE_BUCKET": "true",
        }
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("CANOPY_")})
        moto = spawn(
            [sys.executable, "-m", "infra.s3_server", "-H", "127.0.0.1", "-p", str(s3_port)],
            root / "moto.log",
            self.env,
        )
        self.procs = [moto]
        wait_http_ok(f"http://127.0.0.1:{s3_port}/moto-api/", moto, timeout=60)
        self.gateways = []
        for i in range(2):
            port = free_port()
            cmd = [sys.executable, "-m", "edge.gateway", "--host", "127.0.0.1", "--port", str(port)]
            proc = spawn([*cmd, "--log-level", "warning"], root / f"gateway-{i}.log", self.env)
            self.procs.append(proc)
            self.gateways.append(f"http://127.0.0.1:{port}")
            wait_http_ok(f"{self.gateways[-1]}/healthz", proc, timeout=60)

    def metrics(self) -> dict[str, float]:
        """Batch counters, and upload and download latency at the door, summed over the
        gateways."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        wanted = {
            "canopy_gateway_batch_writes_total",
            "canopy_gateway_batch_write_seconds_sum",
            "canopy_gateway_batch_updates_sum",
            "canopy_gateway_batch_updates_count",
        }
        out: dict[str, float] = defaultdict(float)
        for url in self.gateways:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in wanted:
                        out[sample.name] += sample.value
                    route = sample.labels.get("route", "")
                    if sample.name.startswith("canopy_gateway_request_seconds_") and (
                        route.endswith("/result") or route.endswith("/model")
                    ):
                        what = "upload" if route.endswith("/result") else "download"
                        out[f"{what}_{sample.name.rsplit('_', 1)[1]}"] += sample.value
        return dict(out)

    def stop(self) -> None:
        from infra.process import stop_group

        for proc in reversed(self.procs):
            stop_group(proc.pid, timeout_s=15.0)


def run_workload(
    edge: Edge, w: Workload, rounds: int, close_poll: float, nudge: bool
) -> list[RoundMeasure]:
    from infra.settings import S3Settings
    from infra.store import S3ObjectStore

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    sim = context.Process(
        target=simulator_process, args=(child, w.job, w.devices, edge.gateways), daemon=False
    )
    sim.start()
    try:
        if not parent.poll(300):
            raise TimeoutError("the simulator did not warm up")
        parent.recv()
        store = S3ObjectStore(S3Settings())
        stand_in = StandIn(w, store, close_poll, parent, edge.gateways if nudge else None)
        deadline = time.monotonic() + 120
        while len(store.list_keys(f"devices/{w.job}/")) < w.devices:
            if time.monotonic() > deadline:
                raise TimeoutError("devices did not enrol")
            time.sleep(0.2)
        time.sleep(1.0)  # every device is in its long poll
        before = edge.metrics()
        out = [stand_in.play(r) for r in range(rounds)]
        after = edge.metrics()
        writes = after.get("canopy_gateway_batch_writes_total", 0) - before.get(
            "canopy_gateway_batch_writes_total", 0
        )
        put_s = after.get("canopy_gateway_batch_write_seconds_sum", 0) - before.get(
            "canopy_gateway_batch_write_seconds_sum", 0
        )
        updates = after.get("canopy_gateway_batch_updates_sum", 0) - before.get(
            "canopy_gateway_batch_updates_sum", 0
        )
        if writes:
            print(
                f"  gateways: {writes:.0f} batch PUTs, {updates / writes:.1f} updates each, "
                f"{1000 * put_s / writes:.1f} ms per encode+PUT"
            )
        for what in ("download", "upload"):
            n = after.get(f"{what}_count", 0) - before.get(f"{what}_count", 0)
            total = after.get(f"{what}_sum", 0) - before.get(f"{what}_sum", 0)
            if n:
                print(f"  gateways: {n:.0f} {what}s, {1000 * total / n:.1f} ms each at the door")
        return out
    finally:
        with contextlib.suppress(OSError):
            parent.send(("stop", None))  # it stops its simulation and its workers
        sim.join(timeout=30)
        if sim.is_alive():  # SIGKILL: the simulator takes SIGTERM as "finish cleanly"
            sim.kill()
            sim.join(timeout=10)


def report(w: Workload, measures: Sequence[RoundMeasure]) -> float:
    """Print the rounds after the warm-up; return the median phase / lower bound ratio."""
    counted = measures[1:] or measures
    print(f"\n== {w.name}: {len(counted)} rounds (round 0 warms up)")
    print("  round  phase   last ack  lower bound (train + PUT)  ratio")
    for m in counted:
        print(
            f"  {m.round:>5}  {1000 * m.phase:5.0f}ms  {1000 * m.last_answer:5.0f}ms  "
            f"{1000 * m.lower_bound:5.0f}ms ({1000 * m.train_wall:.0f} + "
            f"{1000 * m.put_seconds:.0f})  {m.phase / m.lower_bound:5.2f}x"
        )
    steps: dict[str, list[float]] = defaultdict(list)
    for m in counted:
        for name, values in m.steps.items():
            steps[name].extend(values)
    print("  per device (median / max over devices and rounds):")
    for name, values in steps.items():
        print(f"    {name:<46} {1000 * median(values):6.1f} / {1000 * max(values):6.1f} ms")
    phase = median([m.phase for m in counted])
    bound = median([m.lower_bound for m in counted])
    last = median([m.last_answer for m in counted])
    print(
        f"  median: devices phase {1000 * phase:.0f} ms (last upload acknowledged at "
        f"{1000 * last:.0f} ms, counted {1000 * (phase - last):.0f} ms later), lower bound "
        f"{1000 * bound:.0f} ms, ratio {phase / bound:.2f}x"
    )
    return phase / bound


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="Rounds per workload (1 warm-up).")
    parser.add_argument("--workloads", default="lenet,hello5,hello20")
    from tasks.collect import CLOSE_POLL_SECONDS

    parser.add_argument(
        "--close-poll",
        type=float,
        default=CLOSE_POLL_SECONDS,
        help="Seconds between the stand-in close task's LISTs (default: the flow's, "
        "tasks/collect.py's CLOSE_POLL_SECONDS).",
    )
    parser.add_argument(
        "--nudge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Tell the gateways of each open (POST /v1/jobs/{job}/wake), as the flow does "
        "(--no-nudge: the gateways hear of it from their watch alone).",
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="canopy-devices-phase-"))
    print(
        f"devices phase: close poll {args.close_poll:g} s, nudge {'on' if args.nudge else 'off'}"
        f", {args.rounds} rounds per workload, logs in {root}"
    )
    edge = Edge(root)
    ratios = {}
    try:
        for name in args.workloads.split(","):
            w = WORKLOADS[name]
            measures = run_workload(edge, w, args.rounds, args.close_poll, args.nudge)
            ratios[name] = report(w, measures)
    finally:
        edge.stop()
    print("\n" + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"devices phase / lower bound (lenet): {ratios.get('lenet', float('nan')):.2f}x")


if __name__ == "__main__":
    main()
