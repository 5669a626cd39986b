"""Object store: bytes in S3 with a verified sha256 on every read.

Every object carries a small metadata header (``canopy-sha256``, ``canopy-kind``,
``canopy-format``, plus caller fields). Reads recompute the hash and refuse
bytes that do not match, so a truncated upload, a bit flip or a hand-edited
object fails loudly instead of entering an aggregate. The S3 implementation talks
to AWS, MinIO or a local moto server; only ``S3Settings.endpoint_url`` differs.

Every failure of the S3 implementation reaches the caller as a ``StoreError``
(``ObjectNotFoundError`` and ``IntegrityError`` are the two kinds callers tell
apart), never as a botocore or urllib3 exception. botocore retries each request
(standard mode, 5 retries) but not the reading of a GET's body, which happens
after its retry loop has returned; ``S3ObjectStore.get`` therefore retries the
whole GET when the body is cut mid-download (``GET_ATTEMPTS``, short backoff).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict
from urllib3.exceptions import HTTPError as URLLib3Error

from infra.errors import IntegrityError, ObjectNotFoundError, StoreError
from infra.recent_writes import RecentWrites
from infra.settings import S3Settings

if TYPE_CHECKING:  # types only: the stubs are a dev dependency
    from mypy_boto3_s3 import S3Client

FORMAT_VERSION = "1"
_RESERVED = ("canopy-sha256", "canopy-kind", "canopy-format")

# A GET whose body read fails (connection reset or cut mid-download, read timeout)
# is sent again, this many times in all, sleeping GET_BACKOFF_S, then twice that...
# Each attempt's request already has botocore's own retries; the body has none.
GET_ATTEMPTS = 4
GET_BACKOFF_S = 0.2
# What reading a streamed body raises when the connection breaks: botocore wraps
# urllib3's errors (ResponseStreamingError, IncompleteReadError, ReadTimeoutError
# are BotoCoreError), but a raw urllib3 or http.client error or an OSError can
# still come through from the socket.
_BODY_ERRORS: tuple[type[BaseException], ...] = (
    BotoCoreError,
    URLLib3Error,
    http.client.HTTPException,
    OSError,
)

log = logging.getLogger(__name__)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectRef(BaseModel):
    """A reference to one stored object: what flows and tasks pass instead of bytes."""

    model_config = ConfigDict(frozen=True)

    bucket: str
    key: str
    sha256: str
    size: int

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class StoredObject(BaseModel):
    """Bytes read back from the store, already verified against their sha256."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    ref: ObjectRef
    kind: str
    metadata: dict[str, str]
    data: bytes


class ObjectStore(Protocol):
    """What the rest of Canopy needs from object storage."""

    bucket: str

    def put_bytes(
        self, key: str, data: bytes, *, kind: str, metadata: Mapping[str, str] | None = None
    ) -> ObjectRef: ...

    def get(self, key: str, *, expected_sha256: str | None = None) -> StoredObject: ...

    def head(self, key: str) -> ObjectRef | None: ...

    def list_keys(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None: ...


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    for name in meta:
        if name in _RESERVED:
            raise ValueError(f"metadata field {name!r} is reserved by the store")
        if not name.isascii() or not name.replace("-", "").isalnum() or name != name.lower():
            raise ValueError(f"metadata field {name!r}: use lowercase letters, digits and '-'")
    return meta


def _verify(key: str, data: bytes, recorded: str | None, expected: str | None) -> str:
    actual = sha256_hex(data)
    if recorded is None:
        raise IntegrityError(
            f"{key}: object has no canopy-sha256 header; it was not written by Canopy, "
            "so its integrity cannot be checked and it is refused"
        )
    if actual != recorded:
        raise IntegrityError(
            f"{key}: content sha256 {actual[:12]}... does not match the recorded "
            f"{recorded[:12]}...; the object is corrupted or was modified, refusing to use it"
        )
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"{key}: content sha256 {actual[:12]}... is not the expected {expected[:12]}...; "
            "the object was replaced since it was referenced"
        )
    return actual


class S3ObjectStore:
    """ObjectStore over boto3; thread-safe (boto3 clients are)."""

    def __init__(self, settings: S3Settings, *, recent: RecentWrites | None = None) -> None:
        """``recent``: serve reads of objects this store just wrote from memory
        (``infra.recent_writes``); the flow's tasks use it, gateways do not."""
        self.settings = settings
        self.bucket = settings.bucket
        self._recent = recent
        secret = settings.secret_access_key
        self._client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            config=Config(
                max_pool_connections=settings.max_pool_connections,
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )
        if settings.create_bucket:
            self.ensure_bucket()

    def ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StoreError(f"cannot create bucket {self.bucket!r}: {exc}") from exc

    def put_bytes(
        self, key: str, data: bytes, *, kind: str, metadata: Mapping[str, str] | None = None
    ) -> ObjectRef:
        meta = _check_metadata(metadata)
        caller_meta = dict(meta)
        digest = sha256_hex(data)
        meta.update({"canopy-sha256": digest, "canopy-kind": kind, "canopy-format": FORMAT_VERSION})
        if self._recent is not None:  # a failed PUT must never be served from memory
            self._recent.forget(key)
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata=meta)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"put s3://{self.bucket}/{key} failed: {exc}") from exc
        ref = ObjectRef(bucket=self.bucket, key=key, sha256=digest, size=len(data))
        if self._recent is not None:
            self._recent.remember(StoredObject(ref=ref, kind=kind, metadata=caller_meta, data=data))
        return ref

    def get(self, key: str, *, expected_sha256: str | None = None) -> StoredObject:
        """Read and verify ``key``; a body cut mid-download is fetched again.

        Raises ``ObjectNotFoundError``, ``IntegrityError`` (the bytes arrived
        whole and do not match their sha256: not retried) or ``StoreError``
        (S3 refused or could not be reached through botocore's retries, or
        every one of ``GET_ATTEMPTS`` downloads broke off).
        """
        recent = self._recent
        if expected_sha256 is not None and recent is not None:  # bytes this store just wrote
            written = recent.get(key, expected_sha256)
            if written is not None:
                return written
        data, meta = self._download(key)
        digest = _verify(key, data, meta.get("canopy-sha256"), expected_sha256)
        kind = meta.pop("canopy-kind", "")
        meta.pop("canopy-sha256", None)
        meta.pop("canopy-format", None)
        ref = ObjectRef(bucket=self.bucket, key=key, sha256=digest, size=len(data))
        return StoredObject(ref=ref, kind=kind, metadata=meta, data=data)

    def _download(self, key: str) -> tuple[bytes, dict[str, str]]:
        """One object's bytes and user metadata, the GET repeated if its body breaks off."""
        uri = f"s3://{self.bucket}/{key}"
        attempt = 1
        while True:
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise ObjectNotFoundError(f"{uri} does not exist") from exc
                raise StoreError(f"get {uri} failed: {exc}") from exc
            except BotoCoreError as exc:  # botocore's retries are spent: S3 is unreachable
                raise StoreError(f"get {uri} failed: {exc}") from exc
            body = resp["Body"]
            try:
                return body.read(), dict(resp.get("Metadata", {}))
            except _BODY_ERRORS as exc:
                body.close()
                if attempt >= GET_ATTEMPTS:
                    raise StoreError(
                        f"get {uri} failed: the download broke off {attempt} times in a "
                        f"row, the last time with {type(exc).__name__}: {exc}"
                    ) from exc
                pause = GET_BACKOFF_S * 2 ** (attempt - 1)
                log.warning(
                    "get %s: download broke off (%s: %s); attempt %d of %d in %.1f s",
                    uri,
                    type(exc).__name__,
                    exc,
                    attempt + 1,
                    GET_ATTEMPTS,
                    pause,
                )
                time.sleep(pause)
                attempt += 1

    def head(self, key: str) -> ObjectRef | None:
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise StoreError(f"head s3://{self.bucket}/{key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"head s3://{self.bucket}/{key} failed: {exc}") from exc
        digest = resp.get("Metadata", {}).get("canopy-sha256", "")
        return ObjectRef(bucket=self.bucket, key=key, sha256=digest, size=resp["ContentLength"])

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"list s3://{self.bucket}/{prefix} failed: {exc}") from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        if self._recent is not None:
            self._recent.forget(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"delete s3://{self.bucket}/{key} failed: {exc}") from exc


class MemoryObjectStore:
    """In-process ObjectStore with the same contract, for pure unit tests only.

    Anything end to end uses a real S3 endpoint (a moto server over HTTP).
    """

    def __init__(self, bucket: str = "canopy") -> None:
        self.bucket = bucket
        self._objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def put_bytes(
        self, key: str, data: bytes, *, kind: str, metadata: Mapping[str, str] | None = None
    ) -> ObjectRef:
        meta = _check_metadata(metadata)
        digest = sha256_hex(data)
        meta.update({"canopy-sha256": digest, "canopy-kind": kind, "canopy-format": FORMAT_VERSION})
        with self._lock:
            self._objects[key] = (bytes(data), meta)
        return ObjectRef(bucket=self.bucket, key=key, sha256=digest, size=len(data))

    def corrupt(self, key: str, data: bytes) -> None:
        """Replace an object's bytes but keep its header, as a bit flip would."""
        with self._lock:
            self._objects[key] = (data, self._objects[key][1])

    def get(self, key: str, *, expected_sha256: str | None = None) -> StoredObject:
        with self._lock:
            if key not in self._objects:
                raise ObjectNotFoundError(f"s3://{self.bucket}/{key} does not exist")
            data, stored = self._objects[key]
        meta = dict(stored)
        digest = _verify(key, data, meta.pop("canopy-sha256", None), expected_sha256)
        kind = meta.pop("canopy-kind", "")
        meta.pop("canopy-format", None)
        ref = ObjectRef(bucket=self.bucket, key=key, sha256=digest, size=len(data))
        return StoredObject(ref=ref, kind=kind, metadata=meta, data=data)

    def head(self, key: str) -> ObjectRef | None:
        with self._lock:
            if key not in self._objects:
                return None
            data, meta = self._objects[key]
        return ObjectRef(bucket=self.bucket, key=key, sha256=meta["canopy-sha256"], size=len(data))

    def list_keys(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._objects if k.startswith(prefix))

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)


def put_json(
    store: ObjectStore, key: str, payload: Mapping[str, Any] | BaseModel, *, kind: str
) -> ObjectRef:
    """Store a JSON manifest (sorted keys, so equal content has an equal hash)."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return store.put_bytes(key, body, kind=kind, metadata={"content-type": "application-json"})


def get_json(store: ObjectStore, key: str, *, expected_sha256: str | None = None) -> Any:
    obj = store.get(key, expected_sha256=expected_sha256)
    try:
        return json.loads(obj.data)
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{key}: not valid JSON ({exc})") from exc
