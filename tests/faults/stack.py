"""The stack the fault tests run against: real parts, with taps and fault proxies between them.

    simulator process ──HTTP──> tap ──> gateway (thread or process) ──S3──> [fault proxy] ──> moto
    flow (this process or a subprocess) ─────────────────────────────S3──> [fault proxy] ──> moto
    the test's own store ────────────────────────────────────────────S3──────────────────> moto

Each gateway has a tap in front of it (a ``FaultyProxy`` without faults whose
observer is the ``ReceiptLedger``): the device-facing URLs are the taps', so
every receipt a device gets is on record. A tap whose gateway died resets its
connections, which is what a device of a dead gateway sees, and the simulator
fails over. Gateways and the flow reach S3 through ``gateway_s3`` and
``flow_s3`` (each through its own fault proxy when the test asks for faults);
the test judges through ``store``, which talks to moto directly, so a fault
never bends the verdict.

``build_stack`` assembles one (the ``make_stack`` fixture and
``benchmarks/faults.py`` both call it). The scenarios themselves are in
``tests.faults.scenarios``, shared by the tests and the benchmark. The parts
every stack test shares (the simulator process, ``PrefectServer`` that restarts
in place, ``wait_for``, ``run_flow``) come from ``tests.support.stack`` and are
importable from here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge.jobs.hello import VECTOR_SIZE
from edge.manifests import DataHint
from edge.registry_index import record_ids
from edge.simulator.profiles import DeviceProfile, make_profiles
from infra.keys import active_job_key, registry_prefix, updates_prefix
from infra.settings import GatewaySettings, S3Settings
from infra.store import S3ObjectStore
from tests.faults.accounting import ReceiptLedger
from tests.support.faulty_s3 import FaultPlan, FaultyProxy
from tests.support.harness import (
    GatewayProcess,
    GatewayThread,
    read_active,
    set_round_status,
    settings_env,
    write_round,
)
from tests.support.stack import MANIFEST_CACHE_S as MANIFEST_CACHE_S
from tests.support.stack import REPO as REPO
from tests.support.stack import PrefectServer as PrefectServer
from tests.support.stack import Simulator as ProcessSimulator
from tests.support.stack import StackError as StackError
from tests.support.stack import fail as fail
from tests.support.stack import run_flow as run_flow
from tests.support.stack import start_simulator
from tests.support.stack import wait_for as wait_for

JOB = "hello-mobile"

# A flow in a subprocess: it imports first (torch and Prefect cost seconds), then
# waits for its parameters on stdin, so a test can start it early and launch it
# the moment the stack is ready.
_FLOW_CODE = (
    "import asyncio, json, pathlib, sys\n"
    "from flows.federated import federated_training\n"
    "pathlib.Path(sys.argv[1]).touch()\n"
    "params = json.loads(sys.stdin.readline())\n"
    "asyncio.run(federated_training(**params))\n"
)


@dataclass
class Simulator(ProcessSimulator):
    """The device simulator process, its summary file and its fleet's profiles."""

    profiles: list[DeviceProfile]


@dataclass
class FlowProcess:
    """``federated_training`` in a subprocess, imported ahead and started on demand."""

    proc: subprocess.Popen[bytes]
    log: Path
    ready: Path
    launched: bool = False

    def launch(self, params: dict[str, Any], ready_timeout: float = 120.0) -> None:
        """Hand the parameters over once the import is done; the run starts at once."""
        assert self.proc.stdin is not None

        def imported() -> bool:
            if self.proc.poll() is not None:
                fail(f"flow process exited before it was ready: {self.tail()}")
            return self.ready.exists()

        wait_for(imported, ready_timeout, "the flow process to import", 0.1)
        self.proc.stdin.write((json.dumps(params) + "\n").encode())
        self.proc.stdin.flush()
        self.launched = True

    def kill(self) -> None:
        """SIGKILL: the flow dies wherever it is, as a crashed runner would."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            fail(f"flow process still running after {timeout:g}s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@dataclass
class FaultStack:
    """Everything one fault test runs against (see the module docstring)."""

    s3: S3Settings
    store: S3ObjectStore
    gateway_s3: S3Settings
    flow_s3: S3Settings
    s3_proxies: dict[str, FaultyProxy]
    gateways: list[GatewayProcess | GatewayThread]
    taps: list[FaultyProxy]
    ledger: ReceiptLedger
    tmp: Path
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def device_urls(self) -> list[str]:
        return [tap.url for tap in self.taps]

    def env(self, **extra: str) -> dict[str, str]:
        """A flow child's environment: this one, plus the flow's S3 and the gateways' cache."""
        return {
            **os.environ,
            **settings_env(self.flow_s3),
            "CANOPY_GATEWAY_MANIFEST_CACHE_SECONDS": MANIFEST_CACHE_S,
            **extra,
        }

    def simulate(
        self, devices: int, *, seed: int, max_seconds: float = 150, **flags: Any
    ) -> Simulator:
        """Start ``python -m edge.simulator`` against the taps (one training worker)."""
        sim = start_simulator(
            JOB,
            devices,
            self.device_urls,
            self.tmp,
            name=str(seed),
            seed=seed,
            max_seconds=max_seconds,
            runtime="pytorch",
            workers=1,
            **flags,
        )
        self._procs.append(sim.proc)
        profiles = make_profiles(
            seed,
            devices,
            dropout=float(flags.get("dropout", 0.05)),
            slow_fraction=float(flags.get("slow_fraction", 0.2)),
            offline_fraction=float(flags.get("offline_fraction", 0.1)),
        )
        return Simulator(sim.proc, sim.summary_path, sim.log, profiles)

    def flow_process(self, name: str, **env: str) -> FlowProcess:
        """A flow subprocess that imports now and runs when ``launch`` is called."""
        log = self.tmp / f"flow-{name}.log"
        ready = self.tmp / f"flow-{name}.ready"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", _FLOW_CODE, str(ready)],
                cwd=REPO,
                env=self.env(**env),
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._procs.append(proc)
        return FlowProcess(proc, log, ready)

    def enrolled(self) -> int:
        prefix = registry_prefix(JOB)  # device records only, not the registry index's shards
        return len(record_ids(prefix, self.store.list_keys(prefix)))

    def wait_enrolled(self, devices: int, sim: Simulator, timeout: float = 120.0) -> None:
        """Block until the whole fleet is in the registry, so every run samples the same."""

        def enrolled() -> bool:
            if sim.proc.poll() is not None:
                fail(f"the simulator exited before its fleet enrolled: {sim.tail()}")
            return self.enrolled() >= devices

        wait_for(enrolled, timeout, f"{devices} devices to enrol", 0.2)

    def warm_up(self, sim: Simulator, timeout: float = 180.0) -> None:
        """Wait until the whole fleet is enrolled and the simulator's worker can train.

        The simulator's training worker imports torch and ExecuTorch when it
        starts (seconds, tens of them on a loaded machine), and the first
        device to train waits for that. A test whose round deadlines are a few
        seconds must not measure this, so a throwaway round (its own run id,
        one device asked) is opened as the flow would open one, and closed
        once that device's upload is in S3 (a fast device that the simulator's
        seed keeps online and in, in round 0). Enrolling every device first
        also makes every later run sample its cohorts from the same registry.
        """
        self.wait_enrolled(len(sim.profiles), sim)
        first = next(
            p.device_id
            for p in sim.profiles
            if p.speed_class == "fast" and p.online(0) and not p.drops_out(0)
        )
        run_id = f"warm-up-{uuid.uuid4().hex[:6]}"
        write_round(
            self.store,
            job=JOB,
            run_id=run_id,
            rnd=0,
            leaves=["leaf-0"],
            selected=[first],
            state={"vector": np.zeros(VECTOR_SIZE, dtype=np.float32)},
            runtime="pytorch",
            deadline_seconds=timeout,
            data_hint=DataHint(scheme="iid", num_devices=len(sim.profiles)),
        )

        def uploaded() -> bool:
            if sim.proc.poll() is not None:
                fail(f"the simulator exited during the warm-up: {sim.tail()}")
            return bool(self.store.list_keys(updates_prefix(JOB, run_id, 0, "leaf-0")))

        wait_for(uploaded, timeout, "the warm-up round's upload", 0.2)
        set_round_status(self.store, read_active(self.store, JOB), "closed")

    def active(self) -> dict[str, Any] | None:
        key = active_job_key(JOB)
        if self.store.head(key) is None:
            return None
        return json.loads(self.store.get(key).data)

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)


StackMaker = Callable[..., FaultStack]


def build_stack(
    exits: contextlib.ExitStack,
    *,
    s3: S3Settings,
    store: S3ObjectStore,
    tmp: Path,
    setenv: Callable[[str, str], None],
    gateways: Literal["thread", "process"] = "thread",
    count: int = 2,
    s3_plan: FaultPlan | None = None,
) -> FaultStack:
    """A ``FaultStack`` over the bucket of ``s3``; everything it starts is closed by ``exits``.

    With ``s3_plan`` the gateways and the flow each reach S3 through their own
    fault proxy (the same plan, seeded differently, counted apart). ``setenv``
    points this process's environment (where in-process flows read their
    settings) at the flow's side: ``monkeypatch.setenv`` in a test.
    """
    proxies: dict[str, FaultyProxy] = {}
    via: dict[str, S3Settings] = {"gateways": s3, "flow": s3}
    if s3_plan is not None:
        for offset, side in enumerate(via):
            plan = dataclasses.replace(s3_plan, seed=s3_plan.seed + offset)
            proxy = exits.enter_context(FaultyProxy(s3.endpoint_url or "", plan))
            proxies[side] = proxy
            via[side] = s3.model_copy(update={"endpoint_url": proxy.url})
    service = via["gateways"]
    for name, value in settings_env(via["flow"]).items():
        setenv(name, value)
    setenv("CANOPY_GATEWAY_MANIFEST_CACHE_SECONDS", MANIFEST_CACHE_S)
    gw_settings = GatewaySettings()
    ledger = ReceiptLedger()
    gws: list[GatewayProcess | GatewayThread] = []
    taps: list[FaultyProxy] = []
    for i in range(count):
        gw_id = f"gw-{chr(ord('a') + i)}"
        gw: GatewayProcess | GatewayThread
        if gateways == "process":
            gw = exits.enter_context(GatewayProcess(service, gw_settings, gateway_id=gw_id))
        else:
            gw = exits.enter_context(
                GatewayThread(gw_settings, S3ObjectStore(service), gateway_id=gw_id)
            )
        gws.append(gw)
        taps.append(exits.enter_context(FaultyProxy(gw.url, observer=ledger.observe)))
    built = FaultStack(
        s3=s3,
        store=store,
        gateway_s3=service,
        flow_s3=via["flow"],
        s3_proxies=proxies,
        gateways=gws,
        taps=taps,
        ledger=ledger,
        tmp=tmp,
    )
    exits.callback(built.close)
    return built


def round_open(active: dict[str, Any] | None, run_id: str, rnd: int) -> bool:
    """Whether an ActiveRound pointer (as JSON) says ``run_id``'s round ``rnd`` is open."""
    return (
        active is not None
        and active["run_id"] == run_id
        and active["round"] == rnd
        and active["status"] == "open"
    )
