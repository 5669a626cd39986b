"""Device tokens: HMAC-SHA256 signed, expiring, bound to one device id.

A token is ``v1.<payload>.<signature>``: ``payload`` is base64url JSON
``{"sub": device_id, "rt": [runtimes], "iat": issued, "exp": expiry}`` (Unix
seconds) and ``signature`` is base64url ``HMAC-SHA256(token_secret, "v1." +
payload)``. Every gateway of a fleet shares ``GatewaySettings.token_secret``,
so a token issued by one gateway is accepted by all of them without any shared
session state. Devices treat the token as opaque.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass

from edge.manifests import RUNTIMES, Runtime
from edge.protocol import ErrorCode, ProtocolError

_VERSION = "v1"
MAX_TOKEN_CHARS = 2048


@dataclass(frozen=True)
class TokenClaims:
    """What a valid token proves: this device enrolled with these runtimes."""

    device_id: str
    runtimes: tuple[Runtime, ...]
    issued_at: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, signing_input: str) -> str:
    return _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def issue_token(
    secret: bytes,
    device_id: str,
    runtimes: list[Runtime] | tuple[Runtime, ...],
    *,
    now: int,
    ttl: int,
) -> tuple[str, int]:
    """A signed token for ``device_id`` and its expiry (Unix seconds)."""
    expires = now + ttl
    claims = {"sub": device_id, "rt": list(runtimes), "iat": now, "exp": expires}
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{_VERSION}.{payload}"
    return f"{signing_input}.{_sign(secret, signing_input)}", expires


def verify_token(secret: bytes, token: str, *, now: int) -> TokenClaims:
    """Check signature and expiry; raise a 401 ``ProtocolError`` otherwise."""
    # Header values arrive as latin-1 text: anything non-ASCII cannot be one of our tokens
    # (and hmac.compare_digest refuses to compare non-ASCII strings).
    parts = token.split(".") if len(token) <= MAX_TOKEN_CHARS and token.isascii() else []
    if len(parts) != 3 or parts[0] != _VERSION:
        raise ProtocolError(401, ErrorCode.BAD_TOKEN, "token is malformed; enrol again")
    signing_input = f"{parts[0]}.{parts[1]}"
    if not hmac.compare_digest(_sign(secret, signing_input), parts[2]):
        raise ProtocolError(401, ErrorCode.BAD_TOKEN, "token signature is invalid; enrol again")
    try:
        claims = json.loads(_unb64(parts[1]))
        device_id, runtimes = claims["sub"], claims["rt"]
        issued, expires = int(claims["iat"]), int(claims["exp"])
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(401, ErrorCode.BAD_TOKEN, "token payload is unreadable") from exc
    if not isinstance(device_id, str) or not all(r in RUNTIMES for r in runtimes):
        raise ProtocolError(401, ErrorCode.BAD_TOKEN, "token claims are invalid")
    if now >= expires:
        raise ProtocolError(401, ErrorCode.TOKEN_EXPIRED, "token expired; enrol again")
    return TokenClaims(device_id, tuple(runtimes), issued, expires)
