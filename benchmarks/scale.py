"""One round of 10,000 simulated devices on this machine, through the real stack.

Starts the stack ``benchmarks/_stack.py`` starts for the other benchmarks (a
moto S3 server, a Prefect server on SQLite tuned like ``canopy up``, gateways
under uvicorn, each its own process), a few device simulator processes
(``python -m edge.simulator.crowd``, one per 1,000 phones: all fast, never
offline, enrolling 64 at a time per process, polling once all have enrolled,
long polls held at the gateways), and runs the
``federated-training`` flow in this process for ONE round of hello-mobile at
tree depth 3 whose cohort is the whole fleet (``cohort_size`` = devices,
``over_selection`` 1: every device is asked and the round closes when all have
reported; ``--report-fraction 0.99`` still asks every device and closes at 99%
of them, so one lost phone cannot hold the round to its deadline).

What it prints, and how each figure is measured:

* enrolment: seconds from the simulators' start until the flow-side registry
  reader (``tasks.dispatch.read_registry``, through the index) sees every device;
* round time: from the round's ``opened_at`` (the ActiveRound pointer the flow
  writes) to the round report's ``finished_at`` (written just before the commit
  pointer): open -> commit;
* devices reported: the round report's ``devices_reported``;
* S3 requests: counted at the moto server itself, from its request log (one line
  per HTTP request it served, from every process: gateways, flow, this
  process's registry watcher), split by phase (enrolment; the round from open
  to commit) and by what the key is (registry records, index shards, identities,
  update batches, manifests, ...). Per device = round requests / devices
  reported. The benchmark's own reads (the pointer watcher's GETs, the
  enrolment watcher's LISTs) are counted under ``control`` and ``index`` and
  named as such;
* Prefect API calls: every request this process (the flow) sent to the Prefect
  server during the round (``_stack.HttpLog``), by method and path;
* peak memory: PSS of every process of the stack, this one included, sampled
  every half second (``_stack.PssSampler``).

The last line: devices reported, round time, S3 requests per device.

``--edge-workers N`` runs the leaf level on the ``edge`` work pool: N Prefect
process workers started as ``canopy up --edge-workers N`` starts them
(``tests.support.stack.edge_workers``), and the flow with
``leaf_mode="edge-pool"``, so each leaf's collection is an ``edge-leaf`` run
on a worker (``run_deployment``). The workers' processes count in the peak PSS
and their S3 requests at moto like everyone else's. Without it (the default)
the leaf level runs inside the flow.

    .venv/bin/python benchmarks/scale.py --report-fraction 0.99   # 10,000 devices
    .venv/bin/python benchmarks/scale.py --devices 1000  # a quick run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._stack import (  # noqa: E402
    BenchStack,
    HttpLog,
    PointerWatcher,
    PssSampler,
    _children_map,
)

JOB = "hello-mobile"
# One simulator process per this many devices: two processes of 5,000 phones stalled
# when the round opened (10,000 connections at once, connect timeouts); ten of 1,000
# carried it (docs/scale.md).
DEVICES_PER_SIMULATOR = 1000

_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


# ---------------------------------------------------------------- S3 requests at moto


def s3_kind(method: str, target: str, bucket: str) -> str:
    """What a request to moto was about, from its method, key or LIST prefix."""
    parts = urlsplit(target)
    path = unquote(parts.path).lstrip("/")
    key = path[len(bucket) + 1 :] if path.startswith(f"{bucket}/") else ""
    listing = method == "GET" and not key
    if listing:
        key = parse_qs(parts.query).get("prefix", [""])[0]
    if key.startswith("devices/"):
        kind = "index" if "/index/" in key else "records"
    elif key.startswith("identities/"):
        kind = "identities"
    elif key.startswith("control/"):
        kind = "control"
    elif key.startswith("_lineage/"):
        kind = "lineage"
    elif "/updates/" in key:
        kind = "updates"
    elif "/tasks/" in key:
        kind = "tasks"
    elif "/partials/" in key:
        kind = "partials"
    elif key:
        kind = "run"  # models, commit, reports, server state
    else:
        kind = "bucket"
    return f"{'LIST' if listing else method} {kind}"


@dataclass
class MotoLog:
    """Reads moto's request log from a mark on: every S3 request any process sent."""

    path: Path
    bucket: str
    offset: int = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def since_mark(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read().decode(errors="replace")
        for found in _REQUEST.finditer(data):
            counts[s3_kind(found.group(1), found.group(2), self.bucket)] += 1
        return counts


def requests_line(counts: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------- the fleet


@dataclass
class Crowd:
    """The simulator processes of one fleet."""

    stack: BenchStack
    devices: int
    processes: int
    long_poll: bool = True
    ramp_seconds: float = 0.0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        from infra.process import spawn

        share = math.ceil(self.devices / self.processes)
        gateways = len(self.stack.gateway_urls)
        for i in range(self.processes):
            n = min(share, self.devices - i * share)
            config = {
                "job": JOB,
                "devices": n,
                "gateways": self.stack.gateway_urls,
                "seed": i + 1,  # sim-{seed}-{index}: ids of different processes differ
                "runtime": "pytorch",
                "dropout": 0.0,
                "slow_fraction": 0.0,
                "offline_fraction": 0.0,
                "workers": 1,
                # long polls need a connection per waiting device; short polls follow
                # the gateway's pace (up to 30 s late for a 10k fleet)
                "max_connections": math.ceil(n / gateways) + 64 if self.long_poll else 256,
                "ramp_seconds": self.ramp_seconds,
                "max_enrolling": 64,
                "poll_after_enrolment": True,
                "max_seconds": 3600.0,
                "request_timeout": 90.0,
            }
            log = self.stack.root / f"crowd-{i}.log"
            summary = self.stack.root / f"crowd-{i}.json"
            cmd = [sys.executable, "-m", "edge.simulator.crowd", "--config", json.dumps(config)]
            cmd += ["--summary-json", str(summary)]
            proc = spawn(cmd, log, self.stack.child_env())
            self.procs.append(proc)

    def pids(self) -> dict[str, int]:
        return {f"crowd-{i}": p.pid for i, p in enumerate(self.procs) if p.poll() is None}

    def summaries(self, timeout: float = 120.0) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for i, proc in enumerate(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)  # they stop by themselves once the run is done
            path = self.stack.root / f"crowd-{i}.json"
            if path.exists():
                out.append(json.loads(path.read_text()))
        return out

    def stop(self) -> None:
        from infra.process import stop_group

        for proc in self.procs:
            if proc.poll() is None:
                stop_group(proc.pid, timeout_s=15.0)


def wait_enrolled(
    devices: int, crowd: Crowd, timeout: float, started: float
) -> tuple[float, int, int]:
    """Seconds from ``started`` (the simulators' start, ``time.monotonic``) until the
    registry's index holds ``devices`` ids; (seconds, ids, shards)."""
    from edge.registry_index import RegistryIndex
    from infra.settings import S3Settings
    from infra.store import S3ObjectStore
    from tasks.dispatch import read_registry

    store, index = S3ObjectStore(S3Settings()), RegistryIndex(JOB)
    seen = 0
    while time.monotonic() - started < timeout:
        seen = len(read_registry(store, JOB, index).ids)
        if seen >= devices:
            return time.monotonic() - started, seen, len(index.shards)
        if all(proc.poll() is not None for proc in crowd.procs):
            break
        time.sleep(1.0)
    raise SystemExit(f"only {seen} of {devices} devices enrolled (logs in {crowd.stack.root})")


# ---------------------------------------------------------------- the benchmark


def prefect_events(api: str, since: float, until: float) -> Counter[str]:
    """Events the server recorded between two times, by event name (its persister
    flushes every second, so this waits for one flush first)."""
    import httpx

    time.sleep(2.0)
    window = {
        "occurred": {
            "since": datetime.fromtimestamp(since, UTC).isoformat(),
            "until": datetime.fromtimestamp(until + 2.0, UTC).isoformat(),
        }
    }
    body = {"filter": window, "time_unit": "day", "time_interval": 1.0}
    answer = httpx.post(f"{api}/events/count-by/event", json=body, timeout=30.0)
    answer.raise_for_status()
    return Counter({row["value"]: int(row["count"]) for row in answer.json()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--simulators", type=int, default=None, help="default: 1 per 1,000")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--width", type=int, default=3, help="leaves = width ** depth")
    parser.add_argument("--deadline", type=float, default=600.0, help="round deadline (s)")
    parser.add_argument(
        "--report-fraction",
        type=float,
        default=1.0,
        help="close the round at this fraction of the fleet's reports (every device is "
        "still asked); 1.0 waits for all, so one lost phone holds the round to its deadline",
    )
    parser.add_argument("--ramp", type=float, default=None, help="device start ramp (s)")
    parser.add_argument("--short-polls", action="store_true", help="no long polls")
    parser.add_argument(
        "--edge-workers", type=int, default=0, help="run the leaves on N edge pool workers"
    )
    parser.add_argument(
        "--database",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="Prefect server's database (postgres: as `canopy up --database postgres`; "
        "the edge pool's concurrent leaf runs need it at this size)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the stack's folder")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="canopy-scale-"))
    stack = BenchStack(
        root, gateways=args.gateways, database=args.database, s3_request_log=True
    ).start()
    os.environ.update(stack.env)  # the flow and the watchers read CANOPY_* and PREFECT_API_URL
    moto = MotoLog(root / "moto.log", stack.env["CANOPY_S3_BUCKET"])
    processes = args.simulators or math.ceil(args.devices / DEVICES_PER_SIMULATOR)
    ramp = args.ramp if args.ramp is not None else args.devices / 500  # 500 starts/s
    crowd = Crowd(stack, args.devices, processes, not args.short_polls, ramp)
    http = HttpLog(stack.api)
    http.install()

    def roots() -> dict[str, int]:
        known = {"bench+flow": os.getpid(), **stack.pids(), **crowd.pids()}
        # anything else this process started (the edge pool's workers) counts too
        others = _children_map().get(os.getpid(), [])
        return {**known, **{f"child-{p}": p for p in others if p not in known.values()}}

    try:
        with PssSampler(roots) as pss:
            pss.phase = "enrolment"
            moto.mark()
            started = time.monotonic()
            crowd.start()
            enrol_s, enrolled, shards = wait_enrolled(args.devices, crowd, 1800, started)
            enrol_requests = moto.since_mark()
            print(
                f"enrolment: {enrolled} devices in {enrol_s:.1f} s ({enrolled / enrol_s:.0f}/s) "
                f"by {processes} simulator process(es), {shards} index shard(s)"
            )
            print(f"  S3 requests while enrolling: {requests_line(enrol_requests)}")

            pss.phase = "round"
            moto.mark()
            run_id = f"scale-{uuid.uuid4().hex[:6]}"
            cohort = max(1, math.ceil(args.devices * args.report_fraction))
            params = {
                "job": JOB,
                "run_id": run_id,
                "runtime": "pytorch",
                "rounds": 1,
                "tree": {"depth": args.depth, "width": args.width},
                "cohort_size": cohort,
                "over_selection": args.devices / cohort,  # selects the whole fleet
                "min_reports": 1,
                "round_deadline_s": args.deadline,
                "registry_wait_s": 60,
                "num_devices": args.devices,
                # hello-mobile's 4,000 generated examples would leave phones of a larger
                # fleet without data: four per device
                "dataset": {"source": "synthetic", "train_size": max(4000, 4 * args.devices)},
            }
            from tests.support.stack import run_flow

            with contextlib.ExitStack() as pool:
                if args.edge_workers:
                    from infra.settings import S3Settings
                    from tests.support.stack import edge_workers

                    pool.enter_context(
                        edge_workers(stack.api, S3Settings(), args.edge_workers, root)
                    )
                    params["leaf_mode"] = "edge-pool"
                moto.mark()  # the workers' start is not the round's
                flow_started = time.time()
                with PointerWatcher([JOB], interval=0.5) as pointer:
                    reports = run_flow(**params)
            flow_s = time.time() - flow_started
            round_requests = moto.since_mark()
            opened = pointer.seen(run_id, 0, "open")
            prefect_calls = http.between(flow_started, time.time())
            events = prefect_events(stack.api, flow_started, time.time())
        summaries = crowd.summaries()
    finally:
        crowd.stop()
        stack.stop()

    report = reports[0]
    opened_at = next(
        (e.opened_at for e in pointer.events if e.run_id == run_id and e.status == "open"), None
    )
    round_s = report.finished_at.timestamp() - (opened_at or flow_started)
    reported = report.devices_reported
    total_requests = sum(round_requests.values())
    per_device = total_requests / max(reported, 1)
    calls = Counter(f"{c.method} {c.path}" for c in prefect_calls)
    peak = max((p.total_kib for p in pss.peaks.values()), default=0)
    accepted = sum(int(s.get("accepted", 0)) for s in summaries)  # type: ignore[call-overload]

    print(
        f"round: {report.outcome}, {reported} of {report.devices_selected} devices reported "
        f"(devices counted {accepted} accepted uploads), open -> commit {round_s:.1f} s; "
        f"flow run {flow_s:.1f} s; pointer seen open {0 if opened is None else 1}"
    )
    print("  phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))
    print(f"  S3 requests in the round: {total_requests} ({requests_line(round_requests)})")
    print(
        f"  Prefect API calls by the flow: {len(prefect_calls)} "
        f"(top: {', '.join(f'{k} {v}' for k, v in calls.most_common(5))})"
    )
    print(
        f"  Prefect events in the run: {sum(events.values())} "
        f"(top: {', '.join(f'{k} {v}' for k, v in events.most_common(5))})"
    )
    for phase, p in pss.peaks.items():
        top = sorted(p.processes.items(), key=lambda kv: -kv[1])[:4]
        print(
            f"  peak PSS during {phase}: {p.total_kib / 1024:.0f} MiB "
            f"({', '.join(f'{k} {v / 1024:.0f}' for k, v in top)})"
        )
    if args.keep:
        print(f"  logs: {root}")
    print(
        f"devices reported {reported}, round time {round_s:.1f} s, "
        f"S3 requests per device {per_device:.2f} (peak PSS {peak / 1024:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
