"""30% device dropout and 10% stragglers: every round ends by its deadline, nothing is lost.

The scenario is ``tests.faults.scenarios.dropout_and_stragglers`` (shared with
benchmarks/faults.py): 16 devices, 3 rounds of 8 asked (over-selection 1.5)
with an 8 s deadline, 200 local epochs so that slow phones straggle.
"""

from __future__ import annotations

import pytest

from tests.faults.scenarios import dropout_and_stragglers
from tests.faults.stack import StackMaker

pytestmark = pytest.mark.slow


def test_dropout_and_stragglers_end_every_round_by_its_deadline(make_stack: StackMaker) -> None:
    out = dropout_and_stragglers(make_stack)

    assert out.problems == [], out.problems
    assert out.lost == 0 and out.doubled == 0 and out.committed > 0
    assert out.committed + out.abandoned == 3
    assert out.faults["dropout"] > 0
    print(*(v.line() for v in out.verdicts.values()), "|", *out.notes)
