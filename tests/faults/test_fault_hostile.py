"""The hostile-input corpus against a gateway: a typed 4xx for each, no 5xx, no poison summed.

``tests.faults.hostile`` holds the corpus (named cases with their promised
answers, hypothesis-built bodies and header bytes, well-formed poison judged
at the leaf); ``benchmarks/faults.py`` runs the same with more built examples.
It takes seconds and is not ``slow``.
"""

from __future__ import annotations

from infra.store import S3ObjectStore
from tests.faults.hostile import run_hostile


def test_hostile_corpus_gets_typed_4xx_and_poison_is_clipped(s3_store: S3ObjectStore) -> None:
    report = run_hostile(s3_store, bodies=60, headers=40)

    assert report.problems == [], report.problems
    assert report.five_xx == 0, dict(report.statuses)
    assert report.tried > 200
    assert report.poison_sent == report.poison_clipped == 2
    print(report.tried, "inputs;", dict(report.statuses))
