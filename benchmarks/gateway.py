"""Gateway throughput, CPU per upload, latency and memory with K concurrent hello-mobile devices.

Starts a moto S3 server and G gateway processes on loopback, opens a
hello-mobile round with every device selected, then drives K devices from
this process (a raw HTTP/1.1 client on asyncio streams) through four phases:
enrol (challenge, then an Ed25519-signed enrolment), poll for the task
(several times each, ignoring retry-after, to measure the poll path flat out),
download the model, upload one update each. It reports requests per second and
p50/p99 latency per phase, the update batches written (group commit), and each
gateway's resident memory before and after, per 1,000 devices.

Upload cost: the CPU seconds the gateway processes spent during the upload
phase (user + system from /proc, the event loop thread apart), per
acknowledged upload, and its inverse, durably acknowledged uploads per second
per gateway core. The same uploads then go to a lower bound
(``gateway_servers.py floor``: bare ASGI on the same uvicorn, one PUT and one
GET per batch, then the acknowledgements), measured the same way.

The load generator, moto and the gateways share the machine's cores, so wall
figures are a floor for what one gateway process does on its own core; the
per-core figure is not. Latencies are measured on the wire (from sending a
request on an open connection to the last byte of the answer) with
``--concurrency`` requests in flight. The last line is the durably acknowledged
uploads/s per gateway core, with wall uploads/s and the floor's figure.

    python benchmarks/gateway.py                  # 1,000 devices, 1 gateway (about a minute)
    python benchmarks/gateway.py --devices 2000 --profile /tmp/gwprof   # cProfile of the loop
    python benchmarks/gateway.py --devices 5000 --gateways 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.support is test code, not part of the installed package

from aggregation.tensors import encode_tensors  # noqa: E402
from edge.jobs.hello import HELLO_MOBILE  # noqa: E402
from edge.protocol import challenge_path, enrol_path  # noqa: E402
from edge.simulator.identity import DeviceKey  # noqa: E402
from infra.settings import GatewaySettings, S3Settings  # noqa: E402
from infra.store import S3ObjectStore  # noqa: E402
from tests.support.harness import free_port, settings_env, write_round  # noqa: E402

JOB, RUN = "hello-mobile", "bench"
JSON = {"Content-Type": "application/json"}
SECRET = "canopy-local-enrolment"


@dataclass
class Phase:
    """Latencies and failures of one phase."""

    name: str
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        ok = len(self.latencies)
        if not ok:
            return f"{self.name:<10} no successful requests ({self.failures} failed)"
        q = statistics.quantiles(self.latencies, n=100) if ok > 1 else [self.latencies[0]] * 99
        return (
            f"{self.name:<10} {ok:>7} ok {self.failures:>5} failed  "
            f"{ok / self.seconds:>8.0f} req/s  "
            f"p50 {q[49] * 1000:>7.1f} ms  p99 {q[98] * 1000:>7.1f} ms"
        )


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams.

    httpx costs about a millisecond of CPU per request, which on a two-core
    machine makes the load generator, not the gateway, the bottleneck. This
    client does just enough HTTP (fixed Content-Length bodies, which is all the
    gateway sends) to cost a few tens of microseconds.
    """

    def __init__(self, url: str, connections: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.size = connections
        self.pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def open(self) -> None:
        for _ in range(self.size):
            self.pool.put_nowait(await asyncio.open_connection(self.host, self.port))

    async def close(self) -> None:
        while not self.pool.empty():
            _, writer = self.pool.get_nowait()
            writer.close()

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes, float]:
        """(status, body, seconds from sending the request to the last byte of the answer)."""
        reader, writer = await self.pool.get()
        started = time.perf_counter()
        try:
            lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            lines.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            payload = await reader.readexactly(length) if length else b""
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            self.pool.put_nowait(await asyncio.open_connection(self.host, self.port))
            raise
        self.pool.put_nowait((reader, writer))
        return status, payload, time.perf_counter() - started


Call = Callable[[], Awaitable[tuple[int, bytes, float]]]


async def run_phase(phase: Phase, items: list[Call]) -> None:
    """Run every request; concurrency is bounded by the connection pools."""

    async def one(call: Call) -> None:
        try:
            status, payload, seconds = await call()
        except (OSError, asyncio.IncompleteReadError) as exc:
            status, payload, seconds = 0, str(exc).encode(), 0.0
        if status == 200:
            phase.latencies.append(seconds)  # on the wire: waiting for a connection excluded
            return
        phase.failures += 1
        if phase.failures <= 3:
            print(f"{phase.name}: HTTP {status} {payload[:200]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(one(call) for call in items))
    phase.seconds = time.perf_counter() - started


async def drive(
    servers: list[Server],
    urls: list[str],
    devices: list[str],
    polls: int,
    concurrency: int,
    profile: bool,
) -> tuple[list[Phase], Cost]:
    clients = [RawHttp(u, max(1, concurrency // len(urls))) for u in urls]
    for client in clients:
        await client.open()
    home = {d: clients[i % len(clients)] for i, d in enumerate(devices)}
    tokens: dict[str, str] = {}
    offers: dict[str, dict[str, str]] = {}
    body = encode_tensors({"vector": np.full(256, 0.01, np.float32)})

    def auth(d: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[d]}"}

    def enrol(d: str) -> Call:
        async def call() -> tuple[int, bytes, float]:
            asked = json.dumps({"device_id": d}).encode()
            status, answer, first = await home[d].request("POST", challenge_path(), JSON, asked)
            if status != 200:
                return status, answer, first
            challenge = json.loads(answer)["challenge"]
            key = DeviceKey.derive(d)
            payload = json.dumps(
                {
                    "device_id": d,
                    "enrolment_secret": SECRET,
                    "jobs": [JOB],
                    "runtimes": ["pytorch"],
                    "public_key": key.public_key,
                    "challenge": challenge,
                    "signature": key.sign(d, challenge),
                }
            ).encode()
            status, answer, second = await home[d].request("POST", enrol_path(), JSON, payload)
            if status == 200:
                tokens[d] = json.loads(answer)["token"]
            return status, answer, first + second

        return call

    def poll(d: str) -> Call:
        async def call() -> tuple[int, bytes, float]:
            status, answer, seconds = await home[d].request(
                "GET", f"/v1/jobs/{JOB}/devices/{d}/task", auth(d)
            )
            if status == 200 and d not in offers:
                parsed = json.loads(answer)
                if parsed["status"] == "task":
                    offers[d] = parsed["task"]
            return status, answer, seconds

        return call

    def download(d: str) -> Call:
        return lambda: home[d].request("GET", offers[d]["weights"]["url"], auth(d))  # type: ignore[index]

    def upload(d: str) -> Call:
        headers = {
            **auth(d),
            "Content-Type": "application/octet-stream",
            "X-Canopy-Model-Version": offers[d]["model_version"],
            "X-Canopy-Num-Samples": "32",
            "X-Canopy-Metrics": '{"loss": 0.5}',
        }
        return lambda: home[d].request("POST", offers[d]["upload_url"], headers, body)

    phases = [Phase("enrol"), Phase("poll"), Phase("download"), Phase("upload")]
    await run_phase(phases[0], [enrol(d) for d in devices])
    enrolled = [d for d in devices if d in tokens]
    await run_phase(phases[1], [poll(d) for _ in range(polls) for d in enrolled])
    ready = [d for d in enrolled if d in offers]
    await run_phase(phases[2], [download(d) for d in ready])

    async def uploads() -> int:
        await run_phase(phases[3], [upload(d) for d in ready])
        return len(phases[3].latencies)

    for server in servers if profile else []:
        server.signal(signal.SIGUSR1)
    cost = await measured_uploads(servers, "gateway", uploads)
    for server in servers if profile else []:
        server.signal(signal.SIGUSR2)
    for client in clients:
        await client.close()
    return phases, cost


def batches_written(url: str) -> tuple[float, float]:
    """(batch writes, updates accepted) from a gateway's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    writes = accepted = 0.0
    for line in text.splitlines():
        if line.startswith("canopy_gateway_batch_writes_total"):
            writes = float(line.split()[-1])
        elif line.startswith("canopy_gateway_results_accepted_total"):
            accepted += float(line.split()[-1])
    return writes, accepted


TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a gateway with several worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _stat_seconds(path: Path) -> tuple[float, float]:
    """(user, system) CPU seconds from a /proc stat file."""
    fields = path.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def cpu_seconds(pid: int) -> tuple[float, float, float]:
    """(CPU seconds of the whole process tree, of its event loop threads, of the kernel).

    From /proc: user + system time of each process (threads included, even
    those that ended). A process's main thread (tid = pid) runs the event loop;
    the rest is the I/O thread pool (boto3 calls, batch encoding).
    """
    total = loop = system = 0.0
    for proc in process_tree(pid):
        try:
            user, kernel = _stat_seconds(Path(f"/proc/{proc}/stat"))
            loop += sum(_stat_seconds(Path(f"/proc/{proc}/task/{proc}/stat")))
        except OSError:
            continue
        total += user + kernel
        system += kernel
    return total, loop, system


class Server:
    """A benchmark subprocess (``gateway_servers.py``): the gateway or the floor."""

    def __init__(self, kind: str, args: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, str(REPO / "benchmarks" / "gateway_servers.py"), kind]
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port), *args], env={**os.environ, **env}, cwd=REPO
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{kind} server on port {self.port} did not start")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, number: int) -> None:
        self.proc.send_signal(number)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Cost:
    """Acknowledged uploads over the CPU seconds the server(s) spent on them."""

    name: str
    acknowledged: int
    wall_seconds: float
    cpu: float
    loop_cpu: float
    system_cpu: float

    @property
    def per_core(self) -> float:
        return self.acknowledged / self.cpu if self.cpu else 0.0

    def line(self) -> str:
        per_upload = self.cpu / max(self.acknowledged, 1) * 1000
        loop_share = self.loop_cpu / max(self.acknowledged, 1) * 1000
        kernel_share = self.system_cpu / max(self.acknowledged, 1) * 1000
        return (
            f"{self.name:<10} {self.acknowledged:>6} acknowledged in {self.wall_seconds:5.2f} s: "
            f"{self.acknowledged / self.wall_seconds:>6.0f} uploads/s wall, "
            f"{per_upload:.3f} ms CPU per upload ({loop_share:.3f} on the event loop, "
            f"{kernel_share:.3f} in the kernel) = {self.per_core:>6.0f} uploads/s per core"
        )


async def measured_uploads(
    servers: list[Server], name: str, run: Callable[[], Awaitable[int]]
) -> Cost:
    """Run an upload phase and charge it the CPU time of ``servers``' process trees."""
    before = [cpu_seconds(s.pid) for s in servers]
    started = time.perf_counter()
    acknowledged = await run()
    wall = time.perf_counter() - started
    after = [cpu_seconds(s.pid) for s in servers]
    cpu, loop, system = (
        sum(a[i] - b[i] for a, b in zip(after, before, strict=True)) for i in range(3)
    )
    return Cost(name, acknowledged, wall, cpu, loop, system)


async def floor_uploads(url: str, count: int, concurrency: int) -> int:
    """The upload phase's requests (same body, same paths) against the floor server."""
    client = RawHttp(url, concurrency)
    await client.open()
    body = encode_tensors({"vector": np.full(256, 0.01, np.float32)})
    headers = {"Content-Type": "application/octet-stream", "X-Canopy-Num-Samples": "32"}
    phase = Phase("floor")

    def upload(i: int) -> Call:
        path = f"/v1/jobs/{JOB}/devices/floor-{i:05d}/tasks/t/result"
        return lambda: client.request("POST", path, headers, body)

    await run_phase(phase, [upload(i) for i in range(count)])
    await client.close()
    return len(phase.latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="concurrent devices K (<= 5000+)")
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes")
    parser.add_argument("--polls", type=int, default=3, help="task polls per device")
    parser.add_argument(
        "--concurrency", type=int, default=128, help="open connections (requests in flight)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="cProfile each gateway's event loop during "
        "the upload phase into this folder (gw-N.prof)",
    )
    parser.add_argument("--no-floor", action="store_true", help="skip the lower-bound server")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    moto, endpoint = start_moto()
    s3 = S3Settings(
        endpoint_url=endpoint,
        bucket=f"bench-{uuid.uuid4().hex[:8]}",
        access_key_id="bench",
        secret_access_key="bench",  # type: ignore[arg-type]
        create_bucket=True,
    )
    store = S3ObjectStore(s3)
    devices = [f"bench-{i:05d}" for i in range(args.devices)]
    state = HELLO_MOBILE.closed_form.initial_state(0)  # type: ignore[union-attr]
    write_round(
        store,
        job=JOB,
        run_id=RUN,
        rnd=0,
        leaves=[f"leaf-{i}" for i in range(4)],
        selected=devices,
        state=state,
        deadline_seconds=3600,
    )
    settings = GatewaySettings()
    env = {**settings_env(s3), **settings_env(settings)}
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    servers: list[Server] = []
    try:
        for i in range(args.gateways):
            extra = ["--profile", str(args.profile / f"gw-{i}.prof")] if args.profile else []
            servers.append(Server("gateway", ["--gateway-id", f"gw-{i}", *extra], env))
        urls = [g.url for g in servers]
        before = [rss_mb(g.pid) for g in servers]
        phases, cost = asyncio.run(
            drive(servers, urls, devices, args.polls, args.concurrency, args.profile is not None)
        )
        after = [rss_mb(g.pid) for g in servers]
        batch_stats = [batches_written(g.url) for g in servers]
        floor_cost = None
        if not args.no_floor:
            floor_args = ["--endpoint", endpoint, "--bucket", s3.bucket]
            floor_args += ["--max-updates", str(settings.group_commit_max_updates)]
            floor_args += ["--max-wait-ms", str(settings.group_commit_max_wait_ms)]
            floor = Server("floor", floor_args, {})
            servers.append(floor)
            count = len(phases[3].latencies)
            floor_cost = asyncio.run(
                measured_uploads(
                    [floor], "floor", lambda: floor_uploads(floor.url, count, args.concurrency)
                )
            )
            floor_puts = httpx.get(f"{floor.url}/healthz", timeout=10).json()["puts"]
    finally:
        for server in servers:
            server.stop()
        moto.kill()

    per_gateway = args.devices / args.gateways
    rss_per_1000 = [(a - b) / per_gateway * 1000 for a, b in zip(after, before, strict=True)]
    writes = sum(w for w, _ in batch_stats)
    accepted = sum(a for _, a in batch_stats)
    upload = phases[3]
    updates_per_second = len(upload.latencies) / upload.seconds
    print(
        f"gateway benchmark: {args.devices} devices, {args.gateways} gateway process(es), "
        f"{os.cpu_count()} CPU cores shared with moto and the load generator"
    )
    for phase in phases:
        print(phase.line())
    print(
        f"batches    {writes:.0f} S3 objects for {accepted:.0f} accepted updates "
        f"({accepted / max(writes, 1):.1f} updates per PUT)"
    )
    for i, (b, a, per) in enumerate(zip(before, after, rss_per_1000, strict=True)):
        print(
            f"memory     gw-{i}: RSS {b:.0f} MB idle -> {a:.0f} MB, {per:.1f} MB per 1,000 devices"
        )
    print(cost.line())
    if floor_cost is not None:
        print(floor_cost.line() + f" ({count / max(floor_puts, 1):.1f} uploads per PUT)")
        print(
            "floor = bare ASGI on the same uvicorn: read body, one PUT + one GET per batch, ack; "
            f"gateway/floor CPU per upload = {cost.cpu / floor_cost.cpu:.2f}x"
            if floor_cost.cpu
            else "floor used no measurable CPU"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "devices": args.devices,
                    "gateways": args.gateways,
                    "phases": {
                        p.name: {
                            "ok": len(p.latencies),
                            "failed": p.failures,
                            "rps": len(p.latencies) / p.seconds if p.seconds else 0.0,
                            "p50_ms": statistics.median(p.latencies) * 1000
                            if p.latencies
                            else None,
                            "p99_ms": statistics.quantiles(p.latencies, n=100)[98] * 1000
                            if len(p.latencies) > 1
                            else None,
                        }
                        for p in phases
                    },
                    "batch_writes": writes,
                    "rss_mb_per_1000_devices": rss_per_1000,
                    "upload_cpu_seconds": cost.cpu,
                    "upload_loop_cpu_seconds": cost.loop_cpu,
                    "uploads_per_second_wall": updates_per_second,
                    "uploads_per_second_per_core": cost.per_core,
                    "floor_uploads_per_second_per_core": floor_cost.per_core
                    if floor_cost
                    else None,
                },
                indent=2,
            )
        )
    floor_text = f", floor {floor_cost.per_core:.0f}" if floor_cost else ""
    print(
        f"durably acknowledged uploads/s per gateway core: {cost.per_core:.0f} "
        f"(wall {updates_per_second:.0f} uploads/s over {args.gateways} gateway(s){floor_text})"
    )


if __name__ == "__main__":
    main()
