"""Device identity: stateless enrolment challenges and Ed25519 proofs of possession.

Holding the fleet's enrolment secret (every copy of the app has it) must not be
enough to act as another device. So each device id is bound to a key the
device holds, trust on first use: the first enrolment of an id stores its
Ed25519 public key (``edge.manifests.DeviceIdentity``), and every enrolment,
first or later, proves possession of the private key by signing a fresh
challenge. Why this scheme:

* **Nothing secret at rest, nothing secret on the wire.** The registry holds
  only public keys and the private key never leaves the device, so neither a
  reader of the bucket, nor a TLS-terminating proxy's logs, nor a compromised
  gateway (whose harvest would outlive a secret rotation) can impersonate a
  device later. A hashed device secret would have to be sent at every
  enrolment, and an HMAC proof would need the server to store the secret.
* **Stateless.** A challenge is ``c1.<payload>.<mac>``: the device id, an
  expiry and 16 random bytes, MACed with a key derived from the fleet's token
  secret. Any gateway verifies any gateway's challenge without shared state,
  and the device needs no clock.
* **Simple and standard.** Ed25519 keys are 32 bytes and signatures 64, with
  no parameters to get wrong; phones have it in their keystores (Android 13+,
  iOS CryptoKit), and the gateway uses ``cryptography``, already installed with
  Prefect and moto.

A challenge can be used more than once within its lifetime (two minutes); a
replayed (challenge, signature) pair only ever enrols the device that signed
it, with the key it already has.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.protocol import MAX_CHALLENGE_CHARS, ErrorCode, ProtocolError, enrolment_proof

_VERSION = "c1"
_KEY_LABEL = b"canopy enrolment challenge v1"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def challenge_key(token_secret: bytes) -> bytes:
    """The MAC key of challenges: derived, so a challenge can never pass as a token."""
    return hmac.new(token_secret, _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, signing_input: str) -> str:
    return b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def issue_challenge(key: bytes, device_id: str, *, now: int, ttl: int) -> tuple[str, int]:
    """A challenge for ``device_id`` and its expiry (Unix seconds)."""
    expires = now + ttl
    claims = {"sub": device_id, "exp": expires, "n": b64(secrets.token_bytes(16))}
    payload = b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{_VERSION}.{payload}"
    return f"{signing_input}.{_mac(key, signing_input)}", expires


def verify_challenge(key: bytes, challenge: str, device_id: str, *, now: int) -> None:
    """Raise 401 ``bad_challenge`` unless this gateway fleet issued it to ``device_id``."""
    ok_text = len(challenge) <= MAX_CHALLENGE_CHARS and challenge.isascii()
    parts = challenge.split(".") if ok_text else []
    if len(parts) != 3 or parts[0] != _VERSION:
        raise _bad_challenge("the challenge is malformed")
    if not hmac.compare_digest(_mac(key, f"{parts[0]}.{parts[1]}"), parts[2]):
        raise _bad_challenge("the challenge was not issued by this fleet")
    try:
        claims = json.loads(unb64(parts[1]))
        subject, expires = claims["sub"], int(claims["exp"])
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise _bad_challenge("the challenge is unreadable") from exc
    if subject != device_id:
        raise _bad_challenge("the challenge was issued to another device id")
    if now >= expires:
        raise _bad_challenge("the challenge has expired")


def canonical_public_key(text: str) -> str:
    """The key in canonical base64url (what is stored and compared), or 401."""
    try:
        raw = unb64(text)
    except (binascii.Error, ValueError) as exc:
        raise _bad_signature("public_key is not base64url") from exc
    if len(raw) != 32:
        raise _bad_signature("public_key must be 32 bytes (a raw Ed25519 public key)")
    return b64(raw)


def verify_proof(public_key: str, signature: str, device_id: str, challenge: str) -> None:
    """Raise 401 ``bad_device_signature`` unless ``signature`` is the key's, over the proof."""
    try:
        key = Ed25519PublicKey.from_public_bytes(unb64(canonical_public_key(public_key)))
        key.verify(unb64(signature), enrolment_proof(device_id, challenge))
    except (InvalidSignature, ValueError, binascii.Error) as exc:
        raise _bad_signature(
            "the signature does not verify with public_key over enrolment_proof(device_id, "
            "challenge)"
        ) from exc


def _bad_challenge(why: str) -> ProtocolError:
    return ProtocolError(
        401, ErrorCode.BAD_CHALLENGE, f"{why}; ask POST /v1/enrol/challenge for a new one"
    )


def _bad_signature(why: str) -> ProtocolError:
    return ProtocolError(401, ErrorCode.BAD_DEVICE_SIGNATURE, why)
