"""S3 misbehaving under the gateways and the flow: retried, nothing lost, nothing doubled.

The scenario is ``tests.faults.scenarios.s3_faults`` (shared with
benchmarks/faults.py): 12 devices, 3 rounds; 10% of the S3 requests of the
gateways and of the flow get a 500, a 503, a 300 ms delay, a reset before the
request reached S3, a reset after S3 applied it, or an answer cut halfway
through its body. The verdict is read from moto directly, past the proxies.
"""

from __future__ import annotations

import pytest

from tests.faults.scenarios import S3_MIX, s3_faults
from tests.faults.stack import StackMaker

pytestmark = pytest.mark.slow


def test_s3_faults_under_gateways_and_flow_are_retried_nothing_lost_or_doubled(
    make_stack: StackMaker,
) -> None:
    out = s3_faults(make_stack)

    assert out.problems == [], out.problems
    assert out.lost == 0 and out.doubled == 0
    assert out.committed == 3 and out.acknowledged > 0
    assert {k.removeprefix("S3 ") for k in out.faults} == set(S3_MIX)
    print(out.verdicts, dict(out.faults), dict(out.answers), *out.notes)
