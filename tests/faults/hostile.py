"""The hostile-input corpus: what an attacker or a broken app sends a gateway, and the answers.

One gateway (uvicorn in a thread) over its own bucket, one round of the test
job (``tests.edge.devices``: tensors ``w`` 4x3 and ``b`` 3, float32) with
``max_num_samples`` set, and four kinds of input:

* **named** cases, each with the answer the protocol promises: every case of
  issue 9's "Found on main" (BF16/F8 dtypes with a right byte length,
  non-ASCII bytes in ``Authorization``, ids with ``..``, a NaN replay of an
  accepted upload, a sample count over the task's cap, ``405`` without
  ``Allow``) and the usual suspects (no or forged token, another device's
  path, a device that was not asked, a wrong key for a known id, bodies too
  large, not safetensors, NaN and Inf, bad headers, unknown paths);
* **built bodies**: safetensors headers and data from the fuzz tests'
  hypothesis strategy (``tests.edge.test_gw_fuzz.headers_and_data``) and raw
  bytes, uploaded by a selected device;
* **header bytes**: any bytes HTTP lets through in one header field
  (``tests.edge.test_gw_fuzz.HEADER_FIELD``) of an upload (and of a poll, for
  ``Authorization``), and as the ``Range`` of a model download;
* **poison** that is well-formed and therefore accepted by the gateway: an
  update with 1000x the honest norm and a finite one of norm ~7e30, next to
  honest ones. Those are judged where they are summed: the leaf's
  ``LeafCollector`` with the defaults (adaptive norm bound, the task's weight
  cap) must clip them, so the leaf's mean update stays within the bound.

Every answer is tallied by status and error code; any 5xx, any named case
answered otherwise than promised, and any poison summed unclipped is a
problem. A built input may well be harmless and get a 2xx: a valid body is a
``200 duplicate`` of the upload already accepted, an unparsable ``Range`` is
ignored (RFC 9110 allows it) and the whole model is sent.
``tests/faults/test_fault_hostile.py`` runs it small; ``benchmarks/faults.py``
runs it with more built examples.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from aggregation.collector import LeafCollector
from aggregation.guards import GuardConfig
from aggregation.partial import PartialAggregate
from aggregation.tensors import encode_tensors
from edge.manifests import LeafTask
from edge.simulator.identity import DeviceKey
from infra.store import S3ObjectStore
from tasks.intake import LeafIntake
from tests.edge.devices import (
    JOB,
    Device,
    devices_on,
    gateway_settings,
    open_test_round,
    update_like,
    upload_headers,
)
from tests.edge.test_gw_fuzz import (
    HEADER_FIELD,
    ITEM_BYTES,
    headers_and_data,
    safetensors_body,
    with_field,
)
from tests.support.harness import GatewayThread

MAX_NUM_SAMPLES = 1000
HONEST = 6  # honest devices next to the poisoners on leaf-0
EXOTIC_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4")
BAD_IDS = ("a..b", "run..1", "..", "a" * 129, "-a", "a\n", "dévice")


@dataclass
class HostileReport:
    """What was sent and what came back."""

    tried: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # "422 tensor_dtype": n
    problems: list[str] = field(default_factory=list)
    poison_sent: int = 0
    poison_clipped: int = 0
    norm_bound: float | None = None
    mean_norm: float | None = None
    wall_s: float = 0.0

    @property
    def five_xx(self) -> int:
        return sum(n for key, n in self.statuses.items() if key.startswith("5"))

    def record(self, label: str, response: httpx.Response, expect: str | None = None) -> None:
        """Tally one answer; ``expect`` is ``"<status> <code>"`` or ``"4xx"`` (any 4xx)."""
        self.tried += 1
        code = ""
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = None
        if response.status_code >= 400:
            code = str(body.get("code", "?")) if isinstance(body, dict) else "(not JSON)"
        elif isinstance(body, dict) and body.get("duplicate") is True:
            code = "duplicate"
        key = f"{response.status_code} {code}".strip()
        self.statuses[key] += 1
        if response.status_code >= 500:
            self.problems.append(f"{label}: {key}: {response.text[:200]}")
        elif expect == "4xx" and not 400 <= response.status_code < 500:
            self.problems.append(f"{label}: expected a 4xx, got {key}")
        elif expect not in (None, "4xx") and key != expect:
            self.problems.append(f"{label}: expected {expect}, got {key}")


def _exotic_body(dtype: str) -> bytes:
    item = ITEM_BYTES.get(dtype, 1)
    header = {
        "w": {"dtype": dtype, "shape": [4, 3], "data_offsets": [0, 12 * item]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [12 * item, 12 * item + 12]},
    }
    return safetensors_body(header, b"\x00" * (12 * item + 12))


def _named(client: httpx.Client, me: Device, offer: dict[str, object], out: HostileReport) -> None:
    """The cases with a promised answer; ``me`` is selected and has not uploaded yet."""
    url = str(offer["upload_url"])
    model_url = str(offer["model"]["url"])  # type: ignore[index]
    ok = encode_tensors(update_like(0.1))

    def up(
        label: str, expect: str, body: bytes = ok, headers: dict[str, str] | None = None
    ) -> None:
        sent = upload_headers(me, offer, **(headers or {}))
        out.record(label, client.post(url, content=body, headers=sent), expect)

    for dtype in EXOTIC_DTYPES:
        up(f"dtype {dtype}", "422 tensor_dtype", _exotic_body(dtype))
    nan = encode_tensors({**update_like(0.1), "b": np.array([np.nan, 0, 0], np.float32)})
    inf = encode_tensors({**update_like(0.1), "w": np.full((4, 3), np.inf, np.float32)})
    up("NaN body", "422 non_finite", nan)
    up("Inf body", "422 non_finite", inf)
    up("not safetensors", "422 malformed_update", b"\x00garbage" * 10)
    up("empty body", "4xx", b"")
    up("missing tensor", "422 tensor_names", encode_tensors({"w": update_like(0.1)["w"]}))
    up(
        "wrong shape",
        "422 tensor_shape",
        encode_tensors({**update_like(0.1), "b": np.zeros(4, np.float32)}),
    )
    up("body over the limit", "413 body_too_large", b"\x00" * (100 * 1024))
    up("JSON content type", "415 unsupported_media_type", ok, {"Content-Type": "application/json"})
    up(
        f"num samples over the task's {MAX_NUM_SAMPLES}",
        "422 too_many_samples",
        ok,
        {"X-Canopy-Num-Samples": "1000000000"},
    )
    for value in ("1000000001", "0", "-1", "1e3", "abc", ""):
        up(f"num samples {value!r}", "422 bad_num_samples", ok, {"X-Canopy-Num-Samples": value})
    up("empty model version", "422 bad_model_version", ok, {"X-Canopy-Model-Version": ""})
    up("metrics not JSON", "422 bad_metrics", ok, {"X-Canopy-Metrics": "{loss"})
    up("metrics NaN", "422 bad_metrics", ok, {"X-Canopy-Metrics": '{"loss": NaN}'})
    up(
        "metrics too many",
        "422 bad_metrics",
        ok,
        {"X-Canopy-Metrics": json.dumps({f"m{i}": 1 for i in range(40)})},
    )

    # tokens and identities
    auth = {"Content-Type": "application/octet-stream", "X-Canopy-Num-Samples": "12"}
    auth["X-Canopy-Model-Version"] = str(offer["model_version"])
    out.record("no token", client.post(url, content=ok, headers=auth), "401 missing_token")
    forged = {**auth, "Authorization": "Bearer v1.e30.AAAA"}
    out.record("forged token", client.post(url, content=ok, headers=forged), "401 bad_token")
    raw = [(k.encode(), v.encode()) for k, v in auth.items()]
    raw.append((b"Authorization", "Bearer v1.abc.é".encode("latin-1")))
    out.record(
        "non-ASCII Authorization", client.post(url, content=ok, headers=raw), "401 bad_token"
    )
    other = url.replace(f"/devices/{me.device_id}/", "/devices/someone-else/")
    out.record(
        "another device's path",
        client.post(other, content=ok, headers=upload_headers(me, offer)),
        "403 device_mismatch",
    )
    thief = Device(client, me.device_id, key=DeviceKey.derive("not-the-device's-key"))
    out.record("known id, another key", thief.enrol(), "403 device_key_mismatch")
    out.record(
        "wrong enrolment secret",
        Device(client, "newcomer-1").enrol(secret="guess"),
        "401 bad_enrolment_secret",
    )
    for bad in BAD_IDS:
        out.record(f"device id {bad!r}", Device(client, bad).enrol(), "4xx")
        out.record(f"job {bad!r}", Device(client, "phone-1").enrol(job=bad), "4xx")
    for bad in ("a..b", "run..1"):  # issue 9: once a 500 behind the pattern
        out.record(f"device id {bad!r} is a 422", Device(client, bad).enrol(), "422 bad_request")

    # methods, paths, ranges
    deleted = client.delete("/v1/enrol")
    out.record("DELETE /v1/enrol", deleted, "405 method_not_allowed")
    if deleted.headers.get("Allow") != "POST":
        out.problems.append(f"405 without Allow: POST (got {deleted.headers.get('Allow')!r})")
    out.record("unknown path", client.get("/v1/nothing", headers=me.auth), "404 not_found")
    out.record(
        "path traversal",
        client.get(f"/v1/jobs/{JOB}/devices/..%2F..%2Fx/task", headers=me.auth),
        "4xx",
    )
    rng = {**me.auth, "Range": "bytes=999999-"}
    out.record(
        "unsatisfiable range", client.get(model_url, headers=rng), "416 range_not_satisfiable"
    )

    # the replay: accepted once, then the same task with bad bodies is a 422, not a duplicate
    first = client.post(url, content=ok, headers=upload_headers(me, offer))
    if first.status_code != 200 or first.json().get("duplicate"):
        out.problems.append(
            f"the honest upload was not accepted: {first.status_code} {first.text[:200]}"
        )
    up("NaN replay of an accepted upload", "422 non_finite", nan)
    up("garbage replay of an accepted upload", "422 malformed_update", b"\x00garbage" * 10)
    again = client.post(url, content=ok, headers=upload_headers(me, offer))
    if again.status_code != 200 or not again.json().get("duplicate"):
        out.problems.append(
            f"an honest replay is not a duplicate: {again.status_code} {again.text[:200]}"
        )


@dataclass(frozen=True)
class _Target:
    """Where the built inputs go: the gateway's client, a selected device, its offer, the tally."""

    client: httpx.Client
    me: Device
    offer: dict[str, object]
    out: HostileReport


def _examples(n: int, rng_seed: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Hypothesis as the corpus runs it: ``n`` examples from ``rng_seed``, nothing remembered."""

    def run_as(test: Callable[..., None]) -> Callable[..., None]:
        return seed(rng_seed)(
            settings(
                max_examples=n,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(test)
        )

    return run_as


def _built_bodies(at: _Target, n: int, rng_seed: int) -> None:
    url = str(at.offer["upload_url"])

    @_examples(n, rng_seed)
    @given(body=st.one_of(headers_and_data(), st.binary(max_size=256)))
    def one(body: bytes) -> None:
        sent = upload_headers(at.me, at.offer)
        at.out.record("built body", at.client.post(url, content=body, headers=sent))

    one()


def _header_bytes(at: _Target, n: int, rng_seed: int) -> None:
    client, me, offer, out = at.client, at.me, at.offer, at.out
    url, model_url = str(offer["upload_url"]), str(offer["model"]["url"])  # type: ignore[index]
    body = encode_tensors(update_like(0.1))

    @_examples(n, rng_seed)
    @given(**HEADER_FIELD)
    def one(name: str, value: bytes, prefix: bytes) -> None:
        sent = with_field(upload_headers(me, offer), name, value, prefix)
        auth = sent.get(b"Authorization", b"")
        label = f"header {name}={value[:40]!r}"
        out.record(label, client.post(url, content=body, headers=list(sent.items())))
        if name == "Authorization":  # the poll carries only that header
            poll = client.get(
                f"/v1/jobs/{JOB}/devices/{me.device_id}/task", headers=[(b"Authorization", auth)]
            )
            out.record(label, poll)
        ranged = [(b"Authorization", me.auth["Authorization"].encode()), (b"Range", value)]
        out.record(label, client.get(model_url, headers=ranged))

    one()


def _poison(
    store: S3ObjectStore, task: LeafTask, devices: list[Device], out: HostileReport
) -> None:
    """Well-formed poison next to honest updates; the leaf's defaults must clip it."""
    *honest, strong, huge = devices  # the last two devices of the leaf turn hostile
    for i, device in enumerate(honest):
        answer = device.upload(device.offer(), update_like(0.1 + 0.01 * i))
        if answer.status_code != 200:
            out.problems.append(f"honest {device.device_id}: {answer.status_code} {answer.text}")
    for device, tensors in (
        (strong, update_like(100.0)),  # 1000x the honest norm
        (huge, update_like(1.8e30)),  # finite, norm ~7e30
    ):
        weight = {"X-Canopy-Num-Samples": str(MAX_NUM_SAMPLES)}  # the most it may claim
        out.record("poison (well-formed)", device.upload(device.offer(), tensors, headers=weight))
        out.poison_sent += 1
    collector = LeafCollector(
        spec=task.specs(),
        task_id=task.task_id,
        model_version=task.model_version,
        selected=frozenset(task.selected_device_ids),
        guard=GuardConfig(max_weight=task.max_num_samples),
    )
    LeafIntake(store=store, task=task, collector=collector).read_new()
    partial: PartialAggregate = collector.result()
    out.poison_clipped = collector.clipped.get("adaptive-norm", 0)
    out.norm_bound = collector.norm_bound
    mean = np.concatenate([(s / partial.weight).ravel() for s in partial.sums.values()])
    out.mean_norm = float(np.linalg.norm(mean))
    if partial.count != len(devices) + 1:  # + the named cases' honest upload
        out.problems.append(f"poison: the leaf summed {partial.count} of {len(devices) + 1}")
    if out.poison_clipped < out.poison_sent:
        out.problems.append(f"poison: {out.poison_sent} sent, {out.poison_clipped} clipped")
    if out.norm_bound is None or not out.mean_norm <= out.norm_bound * (1 + 1e-6):
        out.problems.append(
            f"poison: the leaf's mean update has norm {out.mean_norm:.3g}, "
            f"over the bound {out.norm_bound}"
        )


def run_hostile(
    store: S3ObjectStore, *, bodies: int = 150, headers: int = 100, rng_seed: int = 0
) -> HostileReport:
    """The whole corpus against a fresh gateway over ``store``'s bucket."""
    out = HostileReport()
    started = time.monotonic()
    leaf0 = devices_on("leaf-0", HONEST + 3)
    me, poisoners = leaf0[0], leaf0[1:]
    outsider = devices_on("leaf-0", 1, prefix="outsider")[0]  # routed to leaf-0, not asked
    with (
        GatewayThread(gateway_settings(), store, gateway_id="gw-hostile") as gw,
        httpx.Client(base_url=gw.url, timeout=30) as client,
    ):
        devices = {d: Device(client, d) for d in [*leaf0, outsider]}
        for device in devices.values():
            enrolled = device.enrol()
            if enrolled.status_code != 200:
                out.problems.append(f"enrolment of {device.device_id}: {enrolled.text[:200]}")
        tasks = open_test_round(store, leaf0, max_num_samples=MAX_NUM_SAMPLES)
        mine = devices[me]
        offer = mine.offer()
        _named(client, mine, offer, out)
        stranger = devices[outsider]
        url = str(offer["upload_url"]).replace(f"/devices/{me}/", f"/devices/{outsider}/")
        out.record(
            "a device that was not asked",
            client.post(
                url,
                content=encode_tensors(update_like(0.1)),
                headers=upload_headers(stranger, offer),
            ),
            "403 not_selected",
        )
        target = _Target(client, mine, offer, out)
        _built_bodies(target, bodies, rng_seed)
        _header_bytes(target, headers, rng_seed)
        _poison(store, tasks["leaf-0"], [devices[d] for d in poisoners], out)
        health = client.get("/healthz")
        if health.status_code != 200:
            out.problems.append(f"the gateway is unwell after the corpus: {health.status_code}")
    out.wall_s = time.monotonic() - started
    return out
