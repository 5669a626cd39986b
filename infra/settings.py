"""Settings, one pydantic-settings model per concern.

Each model reads its own ``CANOPY_<CONCERN>_`` environment variables, so a
deployment changes where S3 lives (AWS, MinIO, a local moto server) or which
Prefect API it talks to without touching code. Nothing here is a module-level
singleton: callers build the settings they need and pass them down, which keeps
tests free to point two components at two different endpoints.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class S3Settings(BaseSettings):
    """Where models, partial aggregates, programs and manifests are stored."""

    model_config = SettingsConfigDict(env_prefix="CANOPY_S3_", extra="ignore")

    endpoint_url: str | None = Field(
        default=None,
        description=(
            "S3 endpoint URL. None means AWS S3; set e.g. http://127.0.0.1:9000 for MinIO "
            "or a local moto server. The only setting that differs between environments."
        ),
    )
    bucket: str = Field(default="canopy", description="Bucket holding every Canopy object.")
    region: str = Field(default="us-east-1", description="AWS region used to sign requests.")
    access_key_id: str | None = Field(
        default=None,
        description="Access key id; None falls back to boto3's credential chain.",
    )
    secret_access_key: SecretStr | None = Field(
        default=None,
        description="Secret access key; None falls back to boto3's credential chain.",
    )
    max_pool_connections: int = Field(
        default=32, ge=1, description="boto3 connection pool size per client."
    )
    create_bucket: bool = Field(
        default=False,
        description="Create the bucket when missing (local stacks and tests; never on AWS).",
    )


class PrefectSettings(BaseSettings):
    """How Canopy reaches the Prefect API that runs its flows."""

    model_config = SettingsConfigDict(env_prefix="CANOPY_PREFECT_", extra="ignore")

    api_url: str = Field(
        default="http://127.0.0.1:4200/api",
        description="Prefect API URL (the server's /api endpoint).",
    )
    ui_url: str = Field(
        default="http://127.0.0.1:4200",
        description="Prefect UI base URL, used to print links to flow runs.",
    )


class GatewaySettings(BaseSettings):
    """Edge gateway workers: where devices reach us and how they authenticate."""

    model_config = SettingsConfigDict(env_prefix="CANOPY_GATEWAY_", extra="ignore")

    urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8081", "http://127.0.0.1:8082"],
        description="Public base URLs of the gateway workers (devices may use any of them).",
    )
    enrolment_secret: SecretStr = Field(
        default=SecretStr("canopy-local-enrolment"),
        description="Shared secret a device presents to enrol. Change it in production.",
    )
    token_secret: SecretStr = Field(
        default=SecretStr("canopy-local-token-signing-key"),
        description="HMAC key signing device tokens; every gateway of a fleet shares it.",
    )
    token_ttl_seconds: int = Field(
        default=3600, ge=1, description="Lifetime of a device token after enrolment."
    )
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Largest accepted upload body; larger requests get HTTP 413.",
    )
    group_commit_max_updates: int = Field(
        default=64,
        ge=1,
        description="Most device updates written to S3 as one object (group commit).",
    )
    group_commit_max_wait_ms: int = Field(
        default=50,
        ge=0,
        description="Longest an accepted update waits for others before its batch is written.",
    )
    manifest_cache_seconds: float = Field(
        default=0.5,
        ge=0,
        description="How long a gateway reuses a task manifest read from S3.",
    )


class EdgePoolSettings(BaseSettings):
    """Where a runner's deployments collect their leaves (``flows.edge_leaf``)."""

    model_config = SettingsConfigDict(env_prefix="CANOPY_EDGE_", extra="ignore")

    leaf_mode: Literal["in-process", "edge-pool"] | None = Field(
        default=None,
        description=(
            "The leaf_mode the stack's runner gives every deployment that does not set one; "
            "None leaves the flow's default (in-process). `canopy up --edge-workers N` sets "
            "edge-pool, so each round's leaves run on the 'edge' work pool's workers."
        ),
    )
