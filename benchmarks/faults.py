"""Fault injection with figures: load held, faults survived, bad inputs tried, lost = 0.

Runs the scenarios of the fault-injection suite (``tests/faults``), the very
same functions the tests assert on (``tests.faults.scenarios``, the hostile
corpus of ``tests.faults.hostile``), one after the other on one moto server
and one Prefect server started here, each scenario in its own bucket:

    hostile   the hostile-input corpus against a gateway (named cases, built
              safetensors bodies, header bytes, well-formed poison)
    dropout   30% device dropout + 10% stragglers
    s3        S3 faults through FaultyProxy (500/503, slow, resets before and
              after S3 applied the request) under the gateways and the flow
    kill      kill -9 of a gateway mid-round, kill -9 of the flow mid-aggregation,
              then resume by run id (compared with an uninterrupted run)
    prefect   the Prefect server restarted mid-round, then resume by run id

For each it prints rounds committed / abandoned, uploads acknowledged (distinct
receipts a device was sent, recorded on the wire by taps in front of the
gateways), aggregated (distinct device updates in committed rounds, read back
from S3 lineage), lost (acknowledged, in a committed round, not aggregated:
must be 0), counted twice (must be 0), faults injected by kind, bad inputs
tried and the answers' status codes (no 5xx), and wall time; then the devices'
upload answers and each scenario's notes; the last line sums it up. The exit
status is 1 if any property of any scenario did not hold.

    python benchmarks/faults.py                       # about 5 minutes on 2 cores
    python benchmarks/faults.py --scale 2 --rounds 4  # twice the fleets, 4 rounds
    python benchmarks/faults.py --only s3,kill --s3-rate 0.2
    python benchmarks/faults.py --hostile-bodies 2000 --hostile-headers 1000 --only hostile

Every device is a real simulator process (``python -m edge.simulator``,
hello-mobile, PyTorch, one training worker) against real gateways; the flow is
``federated_training`` itself. Each scenario includes starting its fleet and
waiting for its training worker (tens of seconds of the wall time).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.faults and tests.support are test code
_HOME = Path(tempfile.mkdtemp(prefix="canopy-faults-"))
os.environ.setdefault("PREFECT_HOME", str(_HOME / "client-home"))  # before Prefect is imported
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

from infra.settings import S3Settings  # noqa: E402
from infra.store import S3ObjectStore  # noqa: E402
from tests.faults.hostile import HostileReport, run_hostile  # noqa: E402
from tests.faults.scenarios import (  # noqa: E402
    Outcome,
    dropout_and_stragglers,
    kill_gateway_and_flow,
    prefect_restart,
    s3_faults,
)
from tests.faults.stack import FaultStack, PrefectServer, build_stack  # noqa: E402
from tests.support.stack import fresh_bucket, moto_server  # noqa: E402

SCENARIOS = ("hostile", "dropout", "s3", "kill", "prefect")


def scenario_bucket(endpoint: str, name: str) -> tuple[S3Settings, S3ObjectStore]:
    """A bucket of the scenario's own on the one moto server, and its store."""
    s3 = fresh_bucket(endpoint, f"faults-{name}")
    return s3, S3ObjectStore(s3)


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


class Bench:
    """One moto, one Prefect server, and a fresh bucket and folder per scenario."""

    def __init__(self, args: argparse.Namespace, endpoint: str, server: PrefectServer) -> None:
        self.args = args
        self.endpoint = endpoint
        self.server = server
        self.root = _HOME

    @contextlib.contextmanager
    def stack_maker(self, name: str) -> Iterator[Callable[..., FaultStack]]:
        """What the ``make_stack`` fixture gives a test, for one scenario."""
        s3, store = scenario_bucket(self.endpoint, name)
        tmp = self.root / name
        tmp.mkdir(parents=True, exist_ok=True)
        saved = dict(os.environ)
        with contextlib.ExitStack() as exits:

            def make(**options: Any) -> FaultStack:
                return build_stack(
                    exits, s3=s3, store=store, tmp=tmp, setenv=os.environ.__setitem__, **options
                )

            try:
                yield make
            finally:
                exits.close()
                os.environ.clear()
                os.environ.update(saved)

    def run(self, name: str) -> Outcome:
        a = self.args
        rounds = a.rounds
        started = time.monotonic()
        try:
            if name == "hostile":
                _, store = scenario_bucket(self.endpoint, name)
                return hostile_outcome(
                    run_hostile(store, bodies=a.hostile_bodies, headers=a.hostile_headers)
                )
            with self.stack_maker(name) as make:
                if name == "dropout":
                    return dropout_and_stragglers(
                        make,
                        devices=scaled(16, a.scale),
                        cohort=scaled(8, a.scale),
                        rounds=rounds,
                    )
                if name == "s3":
                    return s3_faults(
                        make,
                        devices=scaled(12, a.scale),
                        cohort=scaled(8, a.scale),
                        rounds=rounds,
                        rate=a.s3_rate,
                    )
                if name == "kill":
                    return kill_gateway_and_flow(
                        make,
                        devices=scaled(8, a.scale),
                        cohort=scaled(6, a.scale),
                        rounds=max(3, rounds),
                    )
                if name == "prefect":
                    return prefect_restart(
                        make,
                        self.server,
                        devices=scaled(8, a.scale),
                        cohort=scaled(6, a.scale),
                        rounds=rounds,
                    )
            raise ValueError(f"unknown scenario {name!r}")
        except Exception as exc:  # a scenario that broke is a figure too, not the end
            out = Outcome(f"{name} (did not finish)")
            out.problems.append(f"{type(exc).__name__}: {exc}")
            out.notes.append(traceback.format_exc(limit=3).strip().splitlines()[-1])
            out.wall_s = time.monotonic() - started
            return out


def hostile_outcome(report: HostileReport) -> Outcome:
    out = Outcome("hostile input corpus vs a gateway")
    out.bad_inputs = report.tried
    out.answers = Counter(report.statuses)
    out.problems = list(report.problems)
    out.wall_s = report.wall_s
    out.notes.append(
        f"well-formed poison accepted by the gateway {report.poison_sent}, clipped at the leaf "
        f"{report.poison_clipped} (bound {report.norm_bound:.3g}, leaf mean update norm "
        f"{report.mean_norm:.3g})"
        if report.norm_bound is not None and report.mean_norm is not None
        else f"poison sent {report.poison_sent}, clipped {report.poison_clipped}"
    )
    return out


# ---------------------------------------------------------------- printing


def faults_text(out: Outcome) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(out.faults.items())) or "-"


def statuses_text(answers: Counter[str]) -> str:
    """Answers by status class: ``4xx 564, 2xx 391, 5xx 0``."""
    by_class: Counter[str] = Counter({"4xx": 0, "2xx": 0, "5xx": 0})
    for key, n in answers.items():
        by_class[f"{key[0]}xx"] += n
    return ", ".join(f"{c} {n}" for c, n in by_class.most_common())


def table(outcomes: list[Outcome]) -> str:
    head = (
        "scenario",
        "rounds c/a",
        "acked",
        "aggregated",
        "lost",
        "twice",
        "faults injected",
        "bad inputs (answers)",
        "wall s",
        "ok",
    )
    rows = []
    for o in outcomes:
        hostile = o.bad_inputs > 0
        rows.append(
            (
                o.scenario,
                "-" if hostile else f"{o.committed}/{o.abandoned}",
                "-" if hostile else str(o.acknowledged),
                "-" if hostile else str(o.aggregated),
                "-" if hostile else str(o.lost),
                "-" if hostile else str(o.doubled),
                faults_text(o),
                f"{o.bad_inputs} ({statuses_text(o.answers)})" if hostile else "-",
                f"{o.wall_s:.0f}",
                "yes" if not o.problems else "NO",
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def details(outcomes: list[Outcome]) -> str:
    lines = []
    for o in outcomes:
        lines.append(f"{o.scenario}:")
        if o.devices:
            lines.append(f"  fleet {o.devices} devices, {o.rounds} round(s) run")
        if o.answers:
            what = "answers" if o.bad_inputs else "device upload answers"
            answers = ", ".join(f"{k} x{n}" for k, n in sorted(o.answers.items()))
            lines.append(f"  {what}: {answers}")
        lines += [f"  {note}" for note in o.notes]
        lines += [f"  PROBLEM: {p}" for p in o.problems]
    return "\n".join(lines)


def summary_line(outcomes: list[Outcome], wall_s: float) -> str:
    ok = sum(not o.problems for o in outcomes)
    five = sum(n for o in outcomes if o.bad_inputs for k, n in o.answers.items() if k[0] == "5")
    return (
        f"faults: {ok}/{len(outcomes)} scenarios held; "
        f"{sum(o.committed for o in outcomes)} rounds committed, "
        f"{sum(o.abandoned for o in outcomes)} abandoned; "
        f"{sum(o.acknowledged for o in outcomes)} uploads acknowledged, "
        f"{sum(o.aggregated for o in outcomes)} aggregated, "
        f"lost {sum(o.lost for o in outcomes)}, counted twice {sum(o.doubled for o in outcomes)}; "
        f"{sum(sum(o.faults.values()) for o in outcomes)} faults injected; "
        f"{sum(o.bad_inputs for o in outcomes)} bad inputs, {five} answered 5xx; "
        f"{wall_s / 60:.1f} min"
    )


def as_json(o: Outcome) -> dict[str, Any]:
    return {
        "scenario": o.scenario,
        "devices": o.devices,
        "committed": o.committed,
        "abandoned": o.abandoned,
        "acknowledged": o.acknowledged,
        "aggregated": o.aggregated,
        "lost": o.lost,
        "doubled": o.doubled,
        "faults": dict(o.faults),
        "answers": dict(o.answers),
        "bad_inputs": o.bad_inputs,
        "wall_s": round(o.wall_s, 1),
        "problems": o.problems,
        "notes": o.notes,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated, of {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every fleet and cohort (default 1)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (kill: at least 3)")
    parser.add_argument("--s3-rate", type=float, default=0.10, help="share of S3 requests faulted")
    parser.add_argument("--hostile-bodies", type=int, default=300, help="built upload bodies")
    parser.add_argument("--hostile-headers", type=int, default=200, help="built header values")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the logs folder")
    args = parser.parse_args()
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {SCENARIOS}")
    return args


def main() -> int:
    args = parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.monotonic()
    outcomes: list[Outcome] = []
    print(
        f"fault benchmark: {', '.join(args.only)}; scale {args.scale:g}, {args.rounds} rounds; "
        f"{os.cpu_count()} CPU cores; logs in {_HOME}",
        flush=True,
    )
    home = _HOME / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    server = PrefectServer(home)
    try:
        with moto_server() as endpoint:
            server.start()
            os.environ["PREFECT_API_URL"] = server.url
            with temporary_settings(updates={PREFECT_API_URL: server.url}):
                bench = Bench(args, endpoint, server)
                for name in args.only:
                    t0 = time.monotonic()
                    out = bench.run(name)
                    outcomes.append(out)
                    state = "held" if not out.problems else f"{len(out.problems)} problem(s)"
                    print(f"  {name}: {state} ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        server.stop()
    wall = time.monotonic() - started
    print()
    print(table(outcomes))
    print()
    print(details(outcomes))
    if args.json:
        args.json.write_text(json.dumps([as_json(o) for o in outcomes], indent=2))
    if not args.keep and not any(o.problems for o in outcomes):
        shutil.rmtree(_HOME, ignore_errors=True)
    print()
    print(summary_line(outcomes, wall))
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
