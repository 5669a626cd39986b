"""Which gateway answers a simulated device retries, and which stop the simulation."""

from __future__ import annotations

import pytest

from edge.simulator.client import ErrorAnswer


@pytest.mark.parametrize(
    ("status", "code", "permanent"),
    [
        (422, "bad_request", True),  # e.g. an enrolment the gateway can never accept
        (401, "bad_enrolment_secret", True),
        (403, "device_key_mismatch", True),
        (403, "device_mismatch", True),
        (404, "unknown_device", True),  # still unknown after re-enrolling
        (429, "overloaded", False),
        (408, "unknown", False),
        (409, "task_not_current", False),  # the round moved on: poll again
        (403, "not_selected", False),
        (409, "late", False),
        (500, "internal", False),
        (503, "store_unavailable", False),
        (200, "corrupt_download", False),
    ],
)
def test_permanent_refusals_are_told_from_transient_ones(
    status: int, code: str, permanent: bool
) -> None:
    assert ErrorAnswer(status, code, "m", operation="enrolment").permanent is permanent
