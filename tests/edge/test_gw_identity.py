"""Device identity: a device id belongs to the key that first enrolled it.

The enrolment secret is in every copy of the app; these tests play someone who
has it and wants to be another device. Challenges and proofs are checked as
pure functions too, and gateways refuse to be exposed with the default secrets.
"""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

from edge.gateway.identity import (
    challenge_key,
    issue_challenge,
    verify_challenge,
    verify_proof,
)
from edge.gateway.server import UnsafeGatewayConfig, check_exposure
from edge.gateway.tokens import verify_token
from edge.manifests import DeviceIdentity, device_key, identity_key
from edge.protocol import ErrorCode, ProtocolError
from edge.simulator.identity import DeviceKey
from flows.cli import app
from infra.settings import GatewaySettings
from infra.store import S3ObjectStore, get_json
from tests.edge.devices import JOB, Device, enrol_body, error, gateway_settings
from tests.support.harness import GatewayThread

KEY = challenge_key(b"token-secret")


def test_first_enrolment_binds_the_id_and_later_ones_must_prove_it(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    phone = Device(client, "phone-1", key=DeviceKey.generate())
    first = phone.enrol()
    identity = DeviceIdentity.model_validate(get_json(s3_store, identity_key("phone-1")))
    again = phone.enrol()
    other_job = phone.enrol(job="other-job")
    impostor = Device(client, "phone-1", key=DeviceKey.generate())
    impostor_here = impostor.enrol()
    impostor_new_job = impostor.enrol(job="third-job")  # a job phone-1 never joined
    metrics = client.get("/metrics").text

    assert first.status_code == 200 and again.status_code == 200
    assert other_job.status_code == 200
    assert identity.public_key == phone.key.public_key and identity.gateway_id == "gw-test"
    assert error(impostor_here) == (403, "device_key_mismatch")
    assert error(impostor_new_job) == (403, "device_key_mismatch")
    assert impostor.token == ""
    assert s3_store.head(device_key("third-job", "phone-1")) is None  # nothing registered
    assert "canopy_gateway_identity_mismatches_total 2.0" in metrics


def test_a_challenge_from_one_gateway_works_at_another(s3_store: S3ObjectStore) -> None:
    settings = gateway_settings()
    with (
        GatewayThread(settings, s3_store, gateway_id="gw-a") as a,
        GatewayThread(settings, s3_store, gateway_id="gw-b") as b,
        httpx.Client(base_url=a.url, timeout=10) as at_a,
        httpx.Client(base_url=b.url, timeout=10) as at_b,
    ):
        key = DeviceKey.generate()
        challenge = Device(at_a, "phone-2").challenge().json()["challenge"]
        body = enrol_body("phone-2", key, challenge, jobs=[JOB], runtimes=["pytorch"])
        enrolled = at_b.post("/v1/enrol", json=body)
        token = enrolled.json()["token"]
        polled = at_a.get(
            f"/v1/jobs/{JOB}/devices/phone-2/task", headers={"Authorization": f"Bearer {token}"}
        )

    assert enrolled.status_code == 200
    assert polled.status_code == 200 and polled.json()["status"] == "no_job"


def test_bad_proofs_are_refused(s3_store: S3ObjectStore, client: httpx.Client) -> None:
    key = DeviceKey.generate()
    mine = Device(client, "phone-3").challenge().json()["challenge"]
    theirs = Device(client, "phone-4").challenge().json()["challenge"]

    def enrol(**changes: object) -> httpx.Response:
        body = enrol_body("phone-3", key, mine, jobs=[JOB], runtimes=["pytorch"])
        return client.post("/v1/enrol", json={**body, **changes})

    other_device_challenge = enrol(
        challenge=theirs, signature=key.sign("phone-3", theirs)
    )  # signed correctly, but issued to phone-4
    forged_challenge = enrol(
        challenge=mine[:-2] + "AA", signature=key.sign("phone-3", mine[:-2] + "AA")
    )
    wrong_signer = enrol(signature=DeviceKey.generate().sign("phone-3", mine))
    signed_for_another_id = enrol(signature=key.sign("phone-4", mine))
    no_proof = client.post(
        "/v1/enrol",
        json={
            "device_id": "phone-3",
            "enrolment_secret": "x",
            "jobs": [JOB],
            "runtimes": ["pytorch"],
        },
    )
    wrong_secret = enrol(enrolment_secret="guess")
    good = enrol()

    assert error(other_device_challenge) == (401, "bad_challenge")
    assert error(forged_challenge) == (401, "bad_challenge")
    assert error(wrong_signer) == (401, "bad_device_signature")
    assert error(signed_for_another_id) == (401, "bad_device_signature")
    assert error(no_proof) == (422, "bad_request")
    assert error(wrong_secret) == (401, "bad_enrolment_secret")
    assert good.status_code == 200  # none of the failures bound the id to anything


def test_an_operator_reset_lets_a_new_key_bind(s3_store: S3ObjectStore) -> None:
    with (
        GatewayThread(gateway_settings(), s3_store, gateway_id="gw-reset") as gw,
        httpx.Client(base_url=gw.url, timeout=10) as client,
    ):
        Device(client, "phone-5", key=DeviceKey.generate()).enrol()
        reinstalled = Device(client, "phone-5", key=DeviceKey.generate())
        refused = reinstalled.enrol()
        s3_store.delete(identity_key("phone-5"))
        # This gateway trusted the old binding from its cache; a fresh gateway reads S3.
    with (
        GatewayThread(gateway_settings(), s3_store, gateway_id="gw-fresh") as gw,
        httpx.Client(base_url=gw.url, timeout=10) as client,
    ):
        reinstalled.client = client
        accepted = reinstalled.enrol()

    assert error(refused) == (403, "device_key_mismatch")
    assert accepted.status_code == 200
    bound = DeviceIdentity.model_validate(get_json(s3_store, identity_key("phone-5")))
    assert bound.public_key == reinstalled.key.public_key


# --- pure parts ----------------------------------------------------------------------------


def test_challenges_expire_and_belong_to_one_device() -> None:
    challenge, expires = issue_challenge(KEY, "dev-1", now=1000, ttl=120)

    verify_challenge(KEY, challenge, "dev-1", now=1119)

    assert expires == 1120
    for device, now, key in [("dev-1", 1120, KEY), ("dev-2", 1000, KEY), ("dev-1", 1000, b"k")]:
        with pytest.raises(ProtocolError) as refused:
            verify_challenge(key, challenge, device, now=now)
        assert (refused.value.status, refused.value.code) == (401, ErrorCode.BAD_CHALLENGE)


@pytest.mark.parametrize("junk", ["", "c1", "c1.a.b", "v1.a.b", "c1.é.x", "c1." + "a" * 600 + ".b"])
def test_junk_challenges_are_bad_challenges(junk: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        verify_challenge(KEY, junk, "dev-1", now=0)

    assert refused.value.code == ErrorCode.BAD_CHALLENGE


def test_a_challenge_is_not_a_token() -> None:
    secret = b"token-secret"
    challenge, _ = issue_challenge(challenge_key(secret), "dev-1", now=1000, ttl=120)

    with pytest.raises(ProtocolError) as refused:
        verify_token(secret, challenge, now=1001)

    assert refused.value.code == ErrorCode.BAD_TOKEN


def test_a_proof_verifies_only_for_its_key_device_and_challenge() -> None:
    key = DeviceKey.derive("seed")
    signature = key.sign("dev-1", "c1.x.y")

    verify_proof(key.public_key, signature, "dev-1", "c1.x.y")

    for public_key, device, challenge in [
        (DeviceKey.derive("other").public_key, "dev-1", "c1.x.y"),
        (key.public_key, "dev-2", "c1.x.y"),
        (key.public_key, "dev-1", "c1.x.z"),
        ("A" * 43, "dev-1", "c1.x.y"),  # not a point on the curve, or a different key
    ]:
        with pytest.raises(ProtocolError) as refused:
            verify_proof(public_key, signature, device, challenge)
        assert refused.value.code == ErrorCode.BAD_DEVICE_SIGNATURE


def test_derived_keys_are_stable_and_distinct() -> None:
    assert DeviceKey.derive("sim-0-00001").public_key == DeviceKey.derive("sim-0-00001").public_key
    assert DeviceKey.derive("sim-0-00001").public_key != DeviceKey.derive("sim-0-00002").public_key
    assert len(DeviceKey.generate().public_key) == 43


# --- default secrets stay on loopback --------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gw1.example.org"])
def test_default_secrets_are_refused_beyond_loopback(host: str) -> None:
    with pytest.raises(UnsafeGatewayConfig, match="CANOPY_GATEWAY_TOKEN_SECRET"):
        check_exposure(host, GatewaySettings())


def test_loopback_or_own_secrets_may_serve() -> None:
    own = GatewaySettings(enrolment_secret="e" * 32, token_secret="t" * 32)  # type: ignore[arg-type]
    half = GatewaySettings(token_secret="t" * 32)  # type: ignore[arg-type]

    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(host, GatewaySettings())
    check_exposure("0.0.0.0", own)
    with pytest.raises(UnsafeGatewayConfig, match="CANOPY_GATEWAY_ENROLMENT_SECRET"):
        check_exposure("0.0.0.0", half)


def test_canopy_gateway_refuses_to_expose_default_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CANOPY_GATEWAY_ENROLMENT_SECRET", "CANOPY_GATEWAY_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)

    result = CliRunner().invoke(app, ["gateway", "--host", "0.0.0.0", "--port", "1"])

    assert result.exit_code == 2
    assert "refusing to serve on '0.0.0.0'" in result.output
