"""The device protocol: paths, headers, JSON bodies and error codes.

This module is the single definition both sides use: the gateway serves these
models (and FastAPI turns them into ``/openapi.json``), the simulator and tests
speak them. ``docs/protocol.md`` is the human version; keep the two in step.

Everything a device sends is untrusted, so the parsers here raise
``ProtocolError`` with a code from ``ErrorCode`` and never anything else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge.manifests import MAX_NUM_SAMPLES, Runtime, WorkKind

API_PREFIX = "/v1"

HEADER_SHA256 = "X-Canopy-Sha256"
HEADER_MODEL_VERSION = "X-Canopy-Model-Version"
HEADER_MODEL_FORMAT = "X-Canopy-Model-Format"
HEADER_NUM_SAMPLES = "X-Canopy-Num-Samples"
HEADER_METRICS = "X-Canopy-Metrics"
HEADER_GATEWAY = "X-Canopy-Gateway"

UPDATE_CONTENT_TYPES = ("application/octet-stream", "application/vnd.safetensors")
EVALUATION_CONTENT_TYPES = ("application/json",)

MAX_METRICS_HEADER_BYTES = 4096
MAX_METRICS = 32
MAX_METRIC_NAME = 64
MAX_JSON_BODY_BYTES = 16 * 1024
MAX_ENROL_JOBS = 16
MAX_SECRET_CHARS = 512
MAX_FREE_TEXT_CHARS = 64
MAX_TASK_ID_CHARS = 256
MAX_CHALLENGE_CHARS = 512
CHALLENGE_TTL_SECONDS = 120
ENROLMENT_PROOF_PREFIX = "canopy-enrol-v1"
PUBLIC_KEY_PATTERN = r"^[A-Za-z0-9_-]{43}$"  # 32 bytes, base64url, no padding
SIGNATURE_PATTERN = r"^[A-Za-z0-9_-]{86}$"  # 64 bytes, base64url, no padding

MAX_ID_CHARS = 128
# Ids become S3 key segments (``infra.keys.check_segment``): 1 to 128 letters, digits,
# '.', '_' or '-', starting with a letter or digit, and never two dots in a row (so no
# id can climb out of its prefix). The pattern has no look-around, so the same string
# works in Python, in pydantic's Rust regex and in JSON Schema (ECMA 262); the length is
# a separate limit (``MAX_ID_CHARS``, ``maxLength`` in OpenAPI).
ID_PATTERN = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?$"
DEVICE_ID_PATTERN = ID_PATTERN  # the same rule for device ids and job names
_ID = re.compile(ID_PATTERN)


def valid_id(value: str) -> bool:
    """Whether ``value`` is a valid device id or job name (exactly what the store accepts)."""
    return len(value) <= MAX_ID_CHARS and _ID.fullmatch(value) is not None


ModelFormat = Literal["pte", "safetensors"]


class ErrorCode(StrEnum):
    """Machine-readable ``code`` of every error answer (HTTP status in brackets)."""

    BAD_REQUEST = "bad_request"  # [400/422] malformed JSON, path or query
    BAD_ENROLMENT_SECRET = "bad_enrolment_secret"  # [401]
    BAD_CHALLENGE = "bad_challenge"  # [401] malformed, forged, expired or another device's
    BAD_DEVICE_SIGNATURE = "bad_device_signature"  # [401] signature does not verify
    DEVICE_KEY_MISMATCH = "device_key_mismatch"  # [403] the id is bound to another key
    MISSING_TOKEN = "missing_token"  # [401] no "Authorization: Bearer ..." header
    BAD_TOKEN = "bad_token"  # [401] malformed or forged token
    TOKEN_EXPIRED = "token_expired"  # [401] enrol again
    DEVICE_MISMATCH = "device_mismatch"  # [403] path device id is not the token's device
    NOT_SELECTED = "not_selected"  # [403] device is not in this task's cohort
    UNKNOWN_DEVICE = "unknown_device"  # [404] token fine but device not in the registry
    NO_PROGRAM = "no_program"  # [404] format=pte asked but the round has no .pte
    NOT_FOUND = "not_found"  # [404] no such path
    METHOD_NOT_ALLOWED = "method_not_allowed"  # [405]
    TASK_NOT_CURRENT = "task_not_current"  # [409] download for a task that is over
    LATE = "late"  # [409] result for a task/model version that is no longer current
    BODY_TOO_LARGE = "body_too_large"  # [413]
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # [415] safetensors, or JSON to evaluate
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"  # [416]
    MALFORMED_UPDATE = "malformed_update"  # [422] body is not safetensors
    MALFORMED_EVALUATION = "malformed_evaluation"  # [422] body is not an EvaluationResult
    TENSOR_NAMES = "tensor_names"  # [422] missing or unexpected tensor
    TENSOR_SHAPE = "tensor_shape"  # [422]
    TENSOR_DTYPE = "tensor_dtype"  # [422]
    NON_FINITE = "non_finite"  # [422] NaN or Inf in a tensor
    BAD_NUM_SAMPLES = "bad_num_samples"  # [422] missing, not an integer, or outside 1..10^9
    TOO_MANY_SAMPLES = "too_many_samples"  # [422] more than the task's max_num_samples
    BAD_METRICS = "bad_metrics"  # [422]
    BAD_MODEL_VERSION = "bad_model_version"  # [422] header missing
    STORE_UNAVAILABLE = "store_unavailable"  # [503] retry after Retry-After seconds
    OVERLOADED = "overloaded"  # [503] too many uploads in memory; retry after Retry-After
    INTERNAL = "internal"  # [500] a gateway bug; retry later


class ProtocolError(Exception):
    """An answer the gateway sends instead of a success; raised by parsers and handlers."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        tensor: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.tensor = tensor
        self.details = details
        self.retry_after = retry_after

    def body(self) -> ErrorBody:
        return ErrorBody(
            code=self.code,
            message=self.message,
            tensor=self.tensor,
            details=self.details,
            retry_after_seconds=self.retry_after,
        )


# --- JSON bodies -----------------------------------------------------------------


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: what was wrong, in words and as a code."""

    code: ErrorCode
    message: str
    tensor: str | None = Field(default=None, description="The offending tensor, if any.")
    details: dict[str, Any] | None = None
    retry_after_seconds: float | None = None


class EnrolRequest(BaseModel):
    """Body of ``POST /v1/enrol``."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(
        pattern=ID_PATTERN, max_length=MAX_ID_CHARS, description="Stable id chosen by the device."
    )
    enrolment_secret: str = Field(min_length=1, max_length=MAX_SECRET_CHARS)
    jobs: list[Annotated[str, Field(pattern=ID_PATTERN, max_length=MAX_ID_CHARS)]] = Field(
        min_length=1, max_length=MAX_ENROL_JOBS, description="Jobs the device will train for."
    )
    runtimes: list[Runtime] = Field(
        min_length=1, max_length=2, description="Runtimes the device can train with."
    )
    platform: str | None = Field(default=None, max_length=MAX_FREE_TEXT_CHARS)
    app_version: str | None = Field(default=None, max_length=MAX_FREE_TEXT_CHARS)
    public_key: str = Field(
        pattern=PUBLIC_KEY_PATTERN,
        description=(
            "The device's Ed25519 public key (32 bytes, base64url without padding). The first "
            "enrolment of a device id binds the id to it; every later one must be signed by it."
        ),
    )
    challenge: str = Field(
        min_length=1,
        max_length=MAX_CHALLENGE_CHARS,
        description="A fresh challenge from POST /v1/enrol/challenge for this device id.",
    )
    signature: str = Field(
        pattern=SIGNATURE_PATTERN,
        description=(
            "Ed25519 signature (64 bytes, base64url without padding) of "
            "enrolment_proof(device_id, challenge) with the device's private key."
        ),
    )


class ChallengeRequest(BaseModel):
    """Body of ``POST /v1/enrol/challenge``."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(pattern=ID_PATTERN, max_length=MAX_ID_CHARS)


class ChallengeResponse(BaseModel):
    """A challenge the device signs to prove that it holds its key (any gateway verifies it)."""

    device_id: str
    challenge: str
    expires_at: datetime


def enrolment_proof(device_id: str, challenge: str) -> bytes:
    """The bytes a device signs to enrol: a fixed prefix, its id and the challenge.

    The prefix keeps these signatures useless for anything else; the id and the
    challenge (bound to that id, expiring) keep them useless for another device
    or, after a minute or two, for anyone.
    """
    return f"{ENROLMENT_PROOF_PREFIX}\n{device_id}\n{challenge}".encode()


class EnrolResponse(BaseModel):
    """Answer to a successful enrolment."""

    device_id: str
    token: str = Field(description="Send as 'Authorization: Bearer <token>' on every call.")
    token_type: Literal["Bearer"] = "Bearer"
    expires_at: datetime


class ArtifactInfo(BaseModel):
    """One downloadable model artifact of a task."""

    format: ModelFormat
    url: str = Field(description="Path on the same gateway; supports HTTP Range.")
    sha256: str
    size: int


class TaskOffer(BaseModel):
    """What a selected device must do this round: train, or evaluate the global model."""

    task_id: str
    job: str
    run_id: str
    round: int
    leaf: str
    kind: WorkKind = Field(
        default="train",
        description=(
            "train: train locally and upload the update (safetensors). evaluate: evaluate the "
            "global weights on the device's own held-out data and upload an EvaluationResult "
            "(JSON, metrics only, no update)."
        ),
    )
    metrics: list[str] = Field(
        default_factory=list,
        description="evaluate tasks: the metrics the result must report, exactly these names.",
    )
    runtime: Runtime = Field(description="Runtime this device trains with for this task.")
    model_version: str = Field(description="Echo in X-Canopy-Model-Version when uploading.")
    model: ArtifactInfo = Field(
        description="What to train: .pte (executorch) or safetensors; evaluate tasks: safetensors."
    )
    weights: ArtifactInfo = Field(description="The global weights as safetensors (always).")
    upload_url: str
    deadline: datetime
    max_num_samples: int = Field(
        default=MAX_NUM_SAMPLES,
        description="The largest X-Canopy-Num-Samples this task accepts (422 too_many_samples).",
    )
    hyperparams: dict[str, Any]
    tensor_spec: dict[str, tuple[list[int], str]] = Field(
        description="name -> [shape, dtype] the uploaded update must match."
    )
    data_hint: dict[str, Any] | None = Field(
        default=None, description="Simulation only: which data partition a simulated device uses."
    )


class TaskAnswer(BaseModel):
    status: Literal["task"] = "task"
    task: TaskOffer


RetryReason = Literal["round_not_open", "not_selected", "already_submitted", "runtime_unsupported"]


class RetryAnswer(BaseModel):
    """Nothing for you now: ask again after ``retry_after_seconds`` (pace steering)."""

    status: Literal["retry"] = "retry"
    reason: RetryReason
    retry_after_seconds: float
    job: str
    round: int | None = None


class NoJobAnswer(BaseModel):
    """No run of this job is active (not started yet, or unknown job)."""

    status: Literal["no_job"] = "no_job"
    job: str
    retry_after_seconds: float


class DoneAnswer(BaseModel):
    """The job is finished: stop asking."""

    status: Literal["done"] = "done"
    job: str
    run_id: str
    round: int


PollAnswer = Annotated[
    TaskAnswer | RetryAnswer | NoJobAnswer | DoneAnswer, Field(discriminator="status")
]


class EvaluationResult(BaseModel):
    """Body of the upload of an ``evaluate`` task (``application/json``): metrics only.

    Each metric is the **mean** over the device's held-out examples, whose count
    is sent as ``X-Canopy-Num-Samples`` (the weight of these means when devices'
    results are summed). The names must be exactly the offer's ``metrics``.
    """

    model_config = ConfigDict(extra="forbid")

    metrics: dict[Annotated[str, Field(max_length=MAX_METRIC_NAME)], float] = Field(
        min_length=1,
        max_length=MAX_METRICS,
        description="Metric name -> finite mean over the held-out examples, e.g. "
        '{"loss": 0.41, "accuracy": 0.82}.',
    )


class UploadReceipt(BaseModel):
    """Answer to an accepted (or duplicate) upload: the update is durably stored."""

    status: Literal["accepted"] = "accepted"
    duplicate: bool = Field(description="True when this exact result was already accepted.")
    task_id: str
    device_id: str
    round: int
    received_at: datetime


class WakeAnswer(BaseModel):
    """Answer to ``POST /v1/jobs/{job}/wake``: the gateway will re-read the job's round now.

    ``watching`` says whether any poll of the job was waiting at this gateway (only
    then is the round read; with nobody waiting there is nobody to tell).
    """

    status: Literal["ok"] = "ok"
    job: str
    watching: bool


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    gateway_id: str
    pending_updates: int


# --- paths -----------------------------------------------------------------------


def enrol_path() -> str:
    return f"{API_PREFIX}/enrol"


def challenge_path() -> str:
    return f"{API_PREFIX}/enrol/challenge"


def task_path(job: str, device_id: str) -> str:
    return f"{API_PREFIX}/jobs/{job}/devices/{device_id}/task"


def model_path(job: str, device_id: str, task_id: str, fmt: ModelFormat) -> str:
    return f"{API_PREFIX}/jobs/{job}/devices/{device_id}/tasks/{task_id}/model?format={fmt}"


def wake_path(job: str) -> str:
    return f"{API_PREFIX}/jobs/{job}/wake"


def result_path(job: str, device_id: str, task_id: str) -> str:
    return f"{API_PREFIX}/jobs/{job}/devices/{device_id}/tasks/{task_id}/result"


# --- header parsers (untrusted input) -----------------------------------------------


def parse_num_samples(value: str | None) -> int:
    """``X-Canopy-Num-Samples``: a positive integer."""
    if value is None:
        raise ProtocolError(
            422, ErrorCode.BAD_NUM_SAMPLES, f"header {HEADER_NUM_SAMPLES} is required"
        )
    text = value.strip()
    if (
        not (text.isascii() and text.isdigit())
        or len(text) > 10
        or not 1 <= int(text) <= MAX_NUM_SAMPLES
    ):
        raise ProtocolError(
            422,
            ErrorCode.BAD_NUM_SAMPLES,
            f"header {HEADER_NUM_SAMPLES} must be an integer in 1..{MAX_NUM_SAMPLES}, "
            f"got {value[:32]!r}",
        )
    return int(text)


def parse_metrics(value: str | None) -> dict[str, float]:
    """``X-Canopy-Metrics``: optional JSON object of finite numbers (training loss etc.)."""
    if value is None or not value.strip():
        return {}
    # Header values arrive decoded as latin-1, one character per byte on the wire.
    if len(value.encode("latin-1", "replace")) > MAX_METRICS_HEADER_BYTES:
        raise ProtocolError(
            422, ErrorCode.BAD_METRICS, f"{HEADER_METRICS} is over {MAX_METRICS_HEADER_BYTES} bytes"
        )
    try:
        raw = json.loads(value)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(
            422, ErrorCode.BAD_METRICS, f"{HEADER_METRICS} is not JSON: {exc}"
        ) from exc
    if not isinstance(raw, dict):
        raise ProtocolError(
            422,
            ErrorCode.BAD_METRICS,
            f"{HEADER_METRICS} must be a JSON object with at most {MAX_METRICS} entries",
        )
    return _check_metric_values(raw, HEADER_METRICS)


def _check_metric_values(raw: dict[str, Any], what: str) -> dict[str, float]:
    """At most ``MAX_METRICS`` entries, short names, finite numbers; 422 ``bad_metrics``."""
    if len(raw) > MAX_METRICS:
        raise ProtocolError(
            422,
            ErrorCode.BAD_METRICS,
            f"{what} must be a JSON object with at most {MAX_METRICS} entries",
        )
    metrics: dict[str, float] = {}
    for name, number in raw.items():
        ok_number = isinstance(number, int | float) and not isinstance(number, bool)
        if len(name) > MAX_METRIC_NAME or not ok_number or not math.isfinite(number):
            raise ProtocolError(
                422,
                ErrorCode.BAD_METRICS,
                f"metric {name[:MAX_METRIC_NAME]!r} must have a name of at most "
                f"{MAX_METRIC_NAME} characters and a finite number as value",
            )
        metrics[name] = float(number)
    return metrics


def parse_model_version(value: str | None) -> str:
    """``X-Canopy-Model-Version``: required and non-empty (compared with the round's later)."""
    if not value or not value.strip():
        raise ProtocolError(
            422,
            ErrorCode.BAD_MODEL_VERSION,
            f"header {HEADER_MODEL_VERSION} is required (the offer's model_version)",
        )
    return value.strip()


def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def check_update_content_type(value: str | None) -> str:
    """An upload is safetensors bytes (an update) or JSON (an evaluation result); 415 else."""
    content_type = _media_type(value)
    if content_type not in (*UPDATE_CONTENT_TYPES, *EVALUATION_CONTENT_TYPES):
        raise ProtocolError(
            415,
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"an update must be a safetensors body sent as one of {UPDATE_CONTENT_TYPES} "
            f"(an evaluation result: {EVALUATION_CONTENT_TYPES[0]}), "
            f"got {content_type[:64] or 'no Content-Type'!r}",
        )
    return content_type


def check_content_type_for(kind: WorkKind, content_type: str) -> None:
    """415 unless the upload's body is what a ``kind`` task asks for."""
    allowed = UPDATE_CONTENT_TYPES if kind == "train" else EVALUATION_CONTENT_TYPES
    if content_type not in allowed:
        wanted = "the update as safetensors" if kind == "train" else "an EvaluationResult as JSON"
        raise ProtocolError(
            415,
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"this is a {kind} task: upload {wanted} ({' or '.join(allowed)}), "
            f"not {content_type!r}",
            details={"task_kind": kind, "content_types": list(allowed)},
        )


@dataclass(frozen=True)
class UploadHeaders:
    """What an upload's headers say, parsed: everything checked before any I/O."""

    model_version: str
    num_samples: int
    metrics: dict[str, float]
    content_type: str = UPDATE_CONTENT_TYPES[0]


def parse_upload_headers(headers: Mapping[str, str]) -> UploadHeaders:
    """Parse and check an upload's headers (422 or 415 with the header's code)."""
    model_version = parse_model_version(headers.get(HEADER_MODEL_VERSION))
    num_samples = parse_num_samples(headers.get(HEADER_NUM_SAMPLES))
    metrics = parse_metrics(headers.get(HEADER_METRICS))
    content_type = check_update_content_type(headers.get("content-type"))
    return UploadHeaders(model_version, num_samples, metrics, content_type)


def parse_evaluation(body: bytes, expected: Sequence[str]) -> dict[str, float]:
    """An ``evaluate`` upload's body: an ``EvaluationResult`` naming exactly ``expected``.

    422 ``malformed_evaluation`` when the body is not that JSON object,
    ``bad_metrics`` when a metric is missing, unknown, badly named or not finite.
    """
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ProtocolError(
            422, ErrorCode.MALFORMED_EVALUATION, f"the evaluation result is not JSON: {exc}"
        ) from exc
    if not isinstance(raw, dict) or set(raw) != {"metrics"} or not isinstance(raw["metrics"], dict):
        raise ProtocolError(
            422,
            ErrorCode.MALFORMED_EVALUATION,
            'the evaluation result must be a JSON object {"metrics": {name: number, ...}} '
            "and nothing else",
        )
    metrics = _check_metric_values(raw["metrics"], "the evaluation result's metrics")
    missing, unknown = sorted(set(expected) - set(metrics)), sorted(set(metrics) - set(expected))
    if missing or unknown:
        raise ProtocolError(
            422,
            ErrorCode.BAD_METRICS,
            f"the evaluation result must report exactly the task's metrics {sorted(expected)}; "
            f"missing {missing}, unexpected {unknown[:8]}",
            details={"expected": sorted(expected), "missing": missing, "unexpected": unknown[:8]},
        )
    return metrics


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """One ``Range: bytes=a-b`` (or ``a-`` or ``-n``) -> inclusive (start, end), or None.

    Syntax we do not support (several ranges, other units) is ignored, as RFC 9110
    allows: the whole body is sent. A range that starts past the end is a 416.
    """
    if value is None:
        return None
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if (
        not dash
        or not spec.isascii()
        or (first and not first.isdigit())
        or (last and not last.isdigit())
    ):
        return None
    if not first:
        if not last or int(last) == 0:
            raise _unsatisfiable(size)
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> ProtocolError:
    return ProtocolError(
        416,
        ErrorCode.RANGE_NOT_SATISFIABLE,
        f"requested range is outside the {size}-byte model",
        details={"size": size},
    )
