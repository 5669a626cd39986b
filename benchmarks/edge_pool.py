"""What running the leaves on the ``edge`` work pool costs, measured beside in-process leaves.

The real stack on 127.0.0.1 (a Prefect server on SQLite tuned like ``canopy
up``, moto S3, two gateway threads, the device simulator in its own process,
``--workers`` real ``prefect worker start --pool edge --type process``
workers) and the ``federated-training`` flow in this process. hello-mobile
(devices that barely compute), the same seed and fleet, runs alternated:
leaves in the flow's process, then as ``edge-leaf`` runs on the pool.

Printed: median round time of each mode and their difference; for the edge
runs, each leaf run's time from creation to a worker taking it (Pending), from
there to running (a fresh process, imports, the engine's API calls) and its
running time, from Prefect's own state timestamps; the import time of the leaf
flow's module in a fresh interpreter (what a worker's process pays per leaf
run) beside Prefect's own and the round flow's. Round 0 of each run (simulator start) is excluded.
Last line: the edge/in-process round time ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.stack import ALWAYS_ON, run_flow, start_simulator  # noqa: E402


def import_seconds(module: str, repeats: int) -> float:
    """Median wall time of ``python -c 'import module'`` in a fresh interpreter."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def leaf_run_times(run_id: str) -> list[tuple[float, float, float]]:
    """(created -> Pending, Pending -> Running, Running -> end) of every edge-leaf run of
    ``run_id``'s rounds > 0: the worker's pickup, the run's process start, its work."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="-leaf-")), limit=200
        )
        out = []
        for r in runs:
            params = r.parameters.get("params") or {}
            if params.get("run_id") != run_id or r.name.startswith("r0000-"):
                continue
            states = await client.read_flow_run_states(r.id)
            first = {}
            for state in sorted(states, key=lambda st: st.timestamp):
                first.setdefault(state.type.value, state.timestamp)
            if r.created and r.end_time and "PENDING" in first and "RUNNING" in first:
                out.append(
                    (
                        (first["PENDING"] - r.created).total_seconds(),
                        (first["RUNNING"] - first["PENDING"]).total_seconds(),
                        (r.end_time - first["RUNNING"]).total_seconds(),
                    )
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4, help="Rounds per run (round 0 excluded).")
    parser.add_argument("--pairs", type=int, default=2, help="Alternated in-process/edge pairs.")
    parser.add_argument("--workers", type=int, default=1, help="Edge workers.")
    parser.add_argument("--width", type=int, default=2, help="Leaves (tree depth 1).")
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.settings import GatewaySettings, S3Settings
    from infra.store import S3ObjectStore
    from tests.support.harness import GatewayThread
    from tests.support.stack import PrefectServer, bench_env, edge_workers, moto_server

    imports = {m: import_seconds(m, 3) for m in ("prefect", "flows.edge_leaf", "flows.federated")}
    print(
        "import in a fresh interpreter (median of 3): "
        + ", ".join(f"{m} {s:.2f}s" for m, s in imports.items())
    )
    folder = Path(tempfile.mkdtemp(prefix="canopy-edge-bench-"))
    with moto_server() as s3_url, PrefectServer(folder) as prefect:
        os.environ.update({**bench_env(s3_url), "PREFECT_API_URL": prefect.url})
        s3 = S3Settings()
        store = S3ObjectStore(s3)
        with (
            temporary_settings(updates={PREFECT_API_URL: prefect.url}),
            GatewayThread(GatewaySettings(), store) as a,
            GatewayThread(GatewaySettings(), store) as b,
            edge_workers(prefect.url, s3, args.workers, folder),
        ):
            sim = start_simulator(
                "hello-mobile",
                args.devices,
                [a.url, b.url],
                folder,
                name="fleet",
                forever=True,
                **ALWAYS_ON,
            )
            rounds: dict[str, list[float]] = {"in-process": [], "edge-pool": []}
            leaf_runs: list[tuple[float, float, float]] = []
            params: dict[str, Any] = {
                "job": "hello-mobile",
                "runtime": "pytorch",
                "rounds": args.rounds + 1,
                "tree": {"depth": 1, "width": args.width},
                "cohort_size": args.devices,
                "over_selection": 1.0,
                "min_reports": args.devices,
                "num_devices": args.devices,
                "partition": {"kind": "iid"},
                "registry_wait_s": 60,
            }
            try:
                for _ in range(args.pairs):
                    for mode in rounds:
                        run_id = f"{mode}-{uuid.uuid4().hex[:6]}"
                        reports = run_flow(run_id=run_id, leaf_mode=mode, **params)
                        rounds[mode] += [
                            r.duration_s
                            for r in reports
                            if r.round > 0 and r.outcome == "committed"
                        ]
                        if mode == "edge-pool":
                            leaf_runs += asyncio.run(leaf_run_times(run_id))
            finally:
                sim.stop()
    here, edge = (statistics.median(rounds[m]) for m in ("in-process", "edge-pool"))
    pickup, start, running = (statistics.median(t[i] for t in leaf_runs) for i in range(3))
    print(
        f"hello-mobile, {args.devices} devices, {args.width} leaves, {args.workers} worker(s), "
        f"{len(rounds['in-process'])}+{len(rounds['edge-pool'])} measured rounds"
    )
    print(f"round time median: in-process {here:.2f}s, edge-pool {edge:.2f}s (+{edge - here:.2f}s)")
    print(
        f"edge-leaf run median ({len(leaf_runs)} runs): created->pending {pickup:.2f}s (worker "
        f"pickup), pending->running {start:.2f}s (fresh process, imports), running->end "
        f"{running:.2f}s"
    )
    print(f"edge/in-process round time ratio: {edge / here:.2f}")


if __name__ == "__main__":
    main()
