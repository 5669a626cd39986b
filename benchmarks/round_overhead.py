"""Where a round's wall time goes: device compute versus orchestration overhead.

Runs the real stack on 127.0.0.1 (a Prefect server on SQLite tuned like
``canopy up``, a moto S3 server, two gateways under uvicorn, the device
simulator in its own process) and the ``federated-training`` flow in this
process, then reads each round's phase timings from its report:

* ``devices``: from the moment the round is open until enough devices have
  reported (training, plus the devices' poll and upload latency);
* everything else is overhead: ExecuTorch export (with its parity gate),
  dispatch (cohort + manifests), closing the round and collecting the last
  updates, the level subflows summing partials, evaluation, commit.

1. ``hello-mobile`` devices (no compute) for trees of depth 1, 2 and 3: the
   round time is almost all overhead, split by phase.
2. The default ``cifar10-mobile`` deployment shape (prefect.yaml) with
   ExecuTorch devices: the overhead share of round time, printed last.

Round 0 of each run is a warm-up (simulator start, imports) and is excluded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.stack import ALWAYS_ON, run_flow, start_simulator  # noqa: E402

PHASES = ["export", "dispatch", "devices", "close-and-collect", "aggregate", "evaluate"]


def run(
    job: str, devices: int, gateways: list[str], folder: Path, params: dict[str, Any]
) -> list[Any]:
    run_id = f"bench-{uuid.uuid4().hex[:6]}"
    sim = start_simulator(job, devices, gateways, folder, name=run_id, max_seconds=900, **ALWAYS_ON)
    try:
        reports = run_flow(job=job, run_id=run_id, **params)
    except BaseException:
        sim.kill()
        raise
    sim.finish(timeout=60)  # it stops by itself once the run says done
    return [r for r in reports if r.round > 0 and r.outcome == "committed"]


def summarise(label: str, reports: list[Any]) -> dict[str, float]:
    total = statistics.median(r.duration_s for r in reports)
    phases = {p: statistics.median(r.timings.get(p, 0.0) for r in reports) for p in PHASES}
    overhead = total - phases["devices"]
    cells = "  ".join(f"{p} {phases[p]:6.2f}" for p in PHASES)
    print(
        f"{label:<34} round {total:6.2f}s  overhead {overhead:6.2f}s "
        f"({100 * overhead / total:5.1f}%)  | {cells}"
    )
    return {"total": total, "overhead": overhead, **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="Rounds per run (first is warm-up).")
    parser.add_argument("--cifar-rounds", type=int, default=3)
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--skip-hello", action="store_true")
    args = parser.parse_args()

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deployments import load_deployment_specs
    from infra.settings import GatewaySettings, S3Settings
    from infra.store import S3ObjectStore
    from tests.support.harness import GatewayThread
    from tests.support.stack import PrefectServer, bench_env, moto_server

    folder = Path(tempfile.mkdtemp(prefix="canopy-bench-"))
    with moto_server() as s3_url, PrefectServer(folder) as prefect:
        os.environ.update(bench_env(s3_url))
        store = S3ObjectStore(S3Settings())
        with (
            temporary_settings(updates={PREFECT_API_URL: prefect.url}),
            GatewayThread(GatewaySettings(), store) as a,
            GatewayThread(GatewaySettings(), store) as b,
        ):
            gateways = [a.url, b.url]
            print(f"hello-mobile, 16 devices, cohort 8, {args.rounds - 1} measured rounds each")
            for depth in () if args.skip_hello else (1, 2, 3):
                reports = run(
                    "hello-mobile",
                    16,
                    gateways,
                    folder,
                    {
                        "runtime": "pytorch",
                        "rounds": args.rounds,
                        "tree": {"depth": depth, "width": 2},
                        "cohort_size": 8,
                        "min_reports": 4,
                        "num_devices": 16,
                        "partition": {"kind": "iid"},
                        "registry_wait_s": 60,
                    },
                )
                summarise(f"hello-mobile depth {depth} ({2**depth} leaves)", reports)
            if args.skip_cifar:
                return
            spec = next(s for s in load_deployment_specs() if s.name == "cifar10-mobile")
            params = {**spec.parameters, "rounds": args.cifar_rounds, "registry_wait_s": 60}
            params.pop("job")
            devices = int(params.get("num_devices", 40))
            print(
                f"\ncifar10-mobile deployment shape ({params['tree']}, cohort "
                f"{params['cohort_size']}, ExecuTorch devices, {devices} simulated)"
            )
            result = summarise(
                "cifar10-mobile default", run("cifar10-mobile", devices, gateways, folder, params)
            )
            print(f"overhead_share_cifar10_default={result['overhead'] / result['total']:.3f}")


if __name__ == "__main__":
    main()
