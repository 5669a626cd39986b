"""Settings come from CANOPY_* environment variables, one model per concern."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from infra.settings import GatewaySettings, PrefectSettings, S3Settings


def test_env_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANOPY_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("CANOPY_S3_BUCKET", "models")
    monkeypatch.setenv("CANOPY_PREFECT_API_URL", "http://127.0.0.1:4300/api")
    monkeypatch.setenv("CANOPY_GATEWAY_MAX_BODY_BYTES", "2048")
    assert S3Settings().endpoint_url == "http://127.0.0.1:9000"
    assert S3Settings().bucket == "models"
    assert PrefectSettings().api_url.endswith(":4300/api")
    assert GatewaySettings().max_body_bytes == 2048


def test_bad_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANOPY_GATEWAY_MAX_BODY_BYTES", "12")
    with pytest.raises(ValidationError, match="max_body_bytes"):
        GatewaySettings()


def test_every_field_is_documented() -> None:
    for model in (S3Settings, PrefectSettings, GatewaySettings):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
