"""docs/protocol.md, /openapi.json and the code state the same limits.

The "Limits" table of the protocol page names, for every limit, where the
OpenAPI document (or, where OpenAPI has no place for it, a constant) states
it; this test resolves each reference and compares. Sentences elsewhere on the
page that repeat a limit are checked against the code too, and every ``MAX_*``
constant of ``edge.protocol`` must appear in the table.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest

from edge import manifests, protocol
from edge.gateway.app import create_app
from infra.settings import GatewaySettings
from infra.store import MemoryObjectStore

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
UNITS = {"characters": 1, "character": 1, "seconds": 1, "KiB": 1024, "MiB": 1024 * 1024}
DEFAULT_BODY = GatewaySettings.model_fields["max_body_bytes"].default


def limits_table() -> list[tuple[str, str, list[str]]]:
    """(limit, value, references) for each row of the page's Limits table."""
    text = DOC.read_text()
    section = text[text.index("\n## Limits\n") : text.index("\n## Errors\n")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("limit", "---"):
            continue
        rows.append((cells[0], cells[1], re.findall(r"`([^`]+)`", cells[2])))
    return rows


def expected(value: str) -> int | str:
    """``128 characters`` -> 128, ``16 KiB`` -> 16384, ``10^9`` -> 10**9, `` `re` `` -> re."""
    if value.startswith("`"):
        return str(value.strip("`"))
    number, _, unit = value.partition(" ")
    base, _, power = number.partition("^")
    return int(int(base) ** int(power or 1) * UNITS.get(unit, 1))


def openapi() -> dict[str, Any]:
    app = create_app(GatewaySettings(max_body_bytes=DEFAULT_BODY), MemoryObjectStore())
    return app.openapi()


def _keyword(schema: dict[str, Any], keyword: str) -> Any:
    if keyword in schema:
        return schema[keyword]
    found = [s[keyword] for s in schema.get("anyOf", []) if keyword in s]  # Optional[...]
    assert found, f"no {keyword} in {schema}"
    return found[0]


def resolve(spec: dict[str, Any], ref: str) -> Any:
    """The value a Limits-table reference points at."""
    kind, _, rest = ref.partition(" ")
    if kind == "const":
        return constant(rest)
    name, _, keyword = rest.rpartition(" ")
    operations = [op for item in spec["paths"].values() for op in item.values()]
    if kind in ("path", "header"):
        values = [
            _keyword(p["schema"], keyword)
            for op in operations
            for p in op.get("parameters", [])
            if p["in"] == kind and p["name"] == name
        ]
        assert values and len(set(map(str, values))) == 1, (ref, values)
        return values[0]
    if kind == "POST":
        return spec["paths"][name]["post"]["requestBody"][keyword]
    schema = spec["components"]["schemas"][kind]["properties"]
    field, _, sub = name.partition(".")
    target = schema[field]
    if sub == "items":
        target = target["items"]
    return _keyword(target, keyword)


def constant(path: str) -> Any:
    """``edge.protocol.X`` or ``infra.settings.Model.field`` (a settings default)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if isinstance(obj, type) and issubclass(obj, pydantic.BaseModel):
                obj = obj.model_fields[attr].default
            else:
                obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"cannot import {path}")


@pytest.mark.parametrize("row", limits_table(), ids=lambda row: row[0])
def test_each_documented_limit_is_the_openapi_one(row: tuple[str, str, list[str]]) -> None:
    limit, value, references = row
    spec = openapi()

    assert references, f"{limit}: no reference"
    for reference in references:
        assert resolve(spec, reference) == expected(value), (limit, reference)


def test_every_limit_of_the_code_is_in_the_table() -> None:
    documented = {expected(value) for _, value, _ in limits_table()}
    limits = {
        name: value
        for name, value in vars(protocol).items()
        if name.startswith("MAX_") and isinstance(value, int)
    }

    assert {name for name, value in limits.items() if value not in documented} == set()
    assert protocol.ID_PATTERN in documented
    assert protocol.PUBLIC_KEY_PATTERN in documented and protocol.SIGNATURE_PATTERN in documented


def _exact_length(pattern: str) -> int:
    """The one length of base64url text ``pattern`` matches."""
    [length] = [n for n in range(1, 200) if re.fullmatch(pattern, "A" * n)]
    return length


# Sentences that repeat a limit in prose, and the value the code has for it.
PROSE_NUMBERS = [
    (r"are 1 to (\d+) characters", protocol.MAX_ID_CHARS),
    (r"at most (\d+) KiB\)", protocol.MAX_JSON_BODY_BYTES // 1024),
    (r"1 to (\d+) jobs", protocol.MAX_ENROL_JOBS),
    (r"Free text, at most (\d+) characters", protocol.MAX_FREE_TEXT_CHARS),
    (r"in the app \(1 to (\d+) characters\)", protocol.MAX_SECRET_CHARS),
    (r"public key, base64url without padding \((\d+) characters\)", 43),
    (r"from 1b, base64url without padding \((\d+) characters\)", 86),
    (r"an integer from 1 to 10\^(\d+)", 9),
    (r"At most (\d+) entries", protocol.MAX_METRICS),
    (r"(\d+)-character names", protocol.MAX_METRIC_NAME),
    (r"names and (\d+) KiB in all", protocol.MAX_METRICS_HEADER_BYTES // 1024),
    (r"gateway limit \((\d+) MiB by default\)", DEFAULT_BODY // (1024 * 1024)),
]
PROSE_WORDS = [
    ("valid for two minutes", protocol.CHALLENGE_TTL_SECONDS == 120),
    ("(one hour by default)", GatewaySettings.model_fields["token_ttl_seconds"].default == 3600),
    ("from 1 to 10^9", manifests.MAX_NUM_SAMPLES == 10**9),
    ("43 characters", _exact_length(protocol.PUBLIC_KEY_PATTERN) == 43),
    ("86 characters", _exact_length(protocol.SIGNATURE_PATTERN) == 86),
]


@pytest.mark.parametrize(("pattern", "value"), PROSE_NUMBERS)
def test_limits_repeated_in_prose_match_the_code(pattern: str, value: int) -> None:
    matches = list(re.finditer(pattern, DOC.read_text()))

    assert matches, f"the page no longer says {pattern!r}"
    assert {int(m.group(1)) for m in matches} == {value}, pattern


@pytest.mark.parametrize(("words", "true_in_code"), PROSE_WORDS)
def test_limits_said_in_words_match_the_code(words: str, true_in_code: bool) -> None:
    assert words in DOC.read_text()
    assert true_in_code, words
