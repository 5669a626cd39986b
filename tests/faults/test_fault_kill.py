"""kill -9 of a gateway mid-round and of the flow mid-aggregation, then resume by run id.

The scenario is ``tests.faults.scenarios.kill_gateway_and_flow`` (shared with
benchmarks/faults.py): 8 devices, two gateway processes, an uninterrupted run
and a cut one (gateway killed in round 1, flow killed in round 2 after a leaf
partial, resumed by run id) must commit the same rounds with the same devices
and the same models, with nothing acknowledged lost and nothing counted twice.
"""

from __future__ import annotations

import pytest

from tests.faults.scenarios import kill_gateway_and_flow
from tests.faults.stack import StackMaker

pytestmark = pytest.mark.slow


def test_killed_gateway_and_flow_resume_with_the_same_committed_rounds(
    make_stack: StackMaker,
) -> None:
    out = kill_gateway_and_flow(make_stack)

    assert out.problems == [], out.problems
    assert out.lost == 0 and out.doubled == 0
    assert out.committed == 6 and out.abandoned == 0  # 3 rounds in each of the two runs
    assert out.faults == {"kill -9 gateway": 1, "kill -9 flow": 1}
    print(*(f"{run}: {v.line()}" for run, v in out.verdicts.items()), "|", *out.notes)
