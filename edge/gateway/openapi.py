"""The parts of ``/openapi.json`` FastAPI cannot infer from the routes.

Hot routes read their path parameters, headers and bodies by hand: as FastAPI
parameters they cost about 0.5 ms of dependency solving per request, most of
a poll's cost. They are declared here for the OpenAPI document instead: path
and header parameters, the bearer scheme, the raw safetensors upload body and
the enrolment schemas and the evaluation result.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from edge.manifests import MAX_NUM_SAMPLES
from edge.protocol import (
    HEADER_METRICS,
    HEADER_MODEL_VERSION,
    HEADER_NUM_SAMPLES,
    ID_PATTERN,
    MAX_ID_CHARS,
    MAX_JSON_BODY_BYTES,
    MAX_METRIC_NAME,
    MAX_METRICS,
    MAX_METRICS_HEADER_BYTES,
    MAX_TASK_ID_CHARS,
    UPDATE_CONTENT_TYPES,
    ChallengeRequest,
    EnrolRequest,
    ErrorBody,
    EvaluationResult,
)

RANGE_HEADER = {
    "name": "Range",
    "in": "header",
    "required": False,
    "description": "bytes=START-[END] or bytes=-SUFFIX, to resume a download (206).",
    "schema": {"type": "string"},
}
BEARER: list[dict[str, list[str]]] = [{"deviceToken": []}]
UPLOAD_HEADERS = [
    {
        "name": HEADER_MODEL_VERSION,
        "in": "header",
        "required": True,
        "description": "The offer's model_version (sha256 of the global model); not empty.",
        "schema": {"type": "string", "minLength": 1, "pattern": r"\S"},
    },
    {
        "name": HEADER_NUM_SAMPLES,
        "in": "header",
        "required": True,
        "description": (
            f"Local training examples, 1 to {MAX_NUM_SAMPLES:,} (the aggregation weight), and "
            "at most the offer's max_num_samples (422 too_many_samples beyond it). For an "
            "evaluate task: the held-out examples the metrics were measured on."
        ),
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_NUM_SAMPLES},
    },
    {
        "name": HEADER_METRICS,
        "in": "header",
        "required": False,
        "description": (
            f'JSON object of finite numbers, e.g. {{"loss": 0.4}}: at most {MAX_METRICS} '
            f"entries, names of at most {MAX_METRIC_NAME} characters, "
            f"{MAX_METRICS_HEADER_BYTES} bytes in all. Train tasks only (an evaluate task's "
            "metrics are its body)."
        ),
        "schema": {
            "type": "string",
            "maxLength": MAX_METRICS_HEADER_BYTES,
            "x-max-entries": MAX_METRICS,
            "x-max-name-chars": MAX_METRIC_NAME,
        },
    },
]

ID_SCHEMA = {"type": "string", "pattern": ID_PATTERN, "maxLength": MAX_ID_CHARS}
PATH_DOCS = {
    "job": ("Job name.", ID_SCHEMA),
    "device_id": ("The device's id (the token's device).", ID_SCHEMA),
    "task_id": (
        "Task id of the offer.",
        {"type": "string", "minLength": 1, "maxLength": MAX_TASK_ID_CHARS},
    ),
}
FORMAT_PARAM = {
    "name": "format",
    "in": "query",
    "required": False,
    "description": "pte or safetensors; default: what the offer's runtime trains with.",
    "schema": {"type": "string", "enum": ["pte", "safetensors"]},
}


def wait_param(longest: float) -> dict[str, Any]:
    """The poll's ``wait``: hold the answer until the round moves (a long poll)."""
    return {
        "name": "wait",
        "in": "query",
        "required": False,
        "description": "Long poll: hold an answer that offers nothing for up to this many "
        "seconds, until the job's round moves; a hold that runs out answers "
        "retry_after_seconds 0. Default 0 (answer at once).",
        "schema": {"type": "number", "minimum": 0, "maximum": longest},
    }


def path_params(*names: str) -> list[dict[str, Any]]:
    return [
        {
            "name": n,
            "in": "path",
            "required": True,
            "description": PATH_DOCS[n][0],
            "schema": PATH_DOCS[n][1],
        }
        for n in names
    ]


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


def json_body(schema: str) -> dict[str, Any]:
    """A JSON request body read by hand, with its size limit (413 beyond it)."""
    return {
        "requestBody": {
            "required": True,
            "description": f"At most {MAX_JSON_BODY_BYTES} bytes (413 body_too_large beyond).",
            "x-max-body-bytes": MAX_JSON_BODY_BYTES,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


def binary_body(max_body_bytes: int) -> dict[str, Any]:
    """The upload body: a raw safetensors update (train tasks, with this gateway's size
    limit) or an ``EvaluationResult`` (evaluate tasks, JSON of at most 16 KiB)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {
            "required": True,
            "description": (
                "Train tasks: the update (trained minus global parameters) as safetensors "
                f"bytes, at most {max_body_bytes} bytes on this gateway. Evaluate tasks: an "
                f"EvaluationResult as application/json, at most {MAX_JSON_BODY_BYTES} bytes. "
                "413 body_too_large beyond; 415 unsupported_media_type for the other kind's body."
            ),
            "x-max-body-bytes": max_body_bytes,
            "x-max-json-body-bytes": MAX_JSON_BODY_BYTES,
            "content": {
                **{content_type: binary for content_type in UPDATE_CONTENT_TYPES},
                "application/json": {"schema": {"$ref": "#/components/schemas/EvaluationResult"}},
            },
        }
    }


def install_openapi(app: FastAPI) -> None:
    """Add the schemas of bodies read by hand (enrolment, challenge, evaluation result)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "deviceToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The token from POST /v1/enrol, as 'Bearer <token>'.",
                }
            }
            components = schema["components"].setdefault("schemas", {})
            for model in (EnrolRequest, ChallengeRequest, EvaluationResult):
                extra = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(extra.pop("$defs", {}))
                components[model.__name__] = extra
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
