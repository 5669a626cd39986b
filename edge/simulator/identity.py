"""A device's own key: what a phone keeps in its keystore to prove that it is itself.

Enrolment binds a device id to an Ed25519 public key on first use and asks for
a signature over a fresh challenge every time (``edge.gateway.identity``). A
real app generates its key once (``DeviceKey.generate``) and never exports the
private half. Simulated devices derive theirs from their id, which names the
fleet seed (``DeviceKey.derive``), so a simulation run again with the same seed
is the same fleet to the gateways; anyone who knows the id can do the same,
which is fine for simulated phones and nothing else.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge.protocol import enrolment_proof


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class DeviceKey:
    """An Ed25519 key pair held by one device."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key = _b64(raw)

    @classmethod
    def generate(cls) -> DeviceKey:
        """A fresh random key, as a real device makes once and keeps."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def derive(cls, seed: str) -> DeviceKey:
        """SIMULATION ONLY: a key that follows from ``seed`` (e.g. fleet seed and device id)."""
        digest = hashlib.sha256(f"canopy-simulated-device-key:{seed}".encode()).digest()
        return cls(Ed25519PrivateKey.from_private_bytes(digest))

    def sign(self, device_id: str, challenge: str) -> str:
        """The enrolment signature over ``enrolment_proof(device_id, challenge)``."""
        return _b64(self._private.sign(enrolment_proof(device_id, challenge)))
