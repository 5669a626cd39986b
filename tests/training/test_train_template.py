"""Program templates: export once, patch each round's weights, verify before publishing."""

from __future__ import annotations

import numpy as np
import pytest

from edge.jobs import get_job
from edge.training import RoundModel, export_job_program, get_trainer, initial_state
from edge.training.errors import ExportError, ProgramError
from edge.training.template import (
    ProgramTemplate,
    make_template,
    patch_weights,
    verify_patched,
)

JOB = get_job("xor-mobile")


@pytest.fixture(scope="module")
def template() -> ProgramTemplate:
    state = initial_state(JOB, seed=0)
    exported = export_job_program(JOB, state, batch_size=JOB.hyperparams.batch_size)
    assert exported is not None
    return make_template(exported.pte, state)


def test_patched_program_trains_exactly_like_a_fresh_export(template: ProgramTemplate) -> None:
    # Prepare: other weights, and a program exported from them the slow way
    new = initial_state(JOB, seed=5)
    fresh = export_job_program(JOB, new, batch_size=JOB.hyperparams.batch_size)
    assert fresh is not None
    x, y = JOB.make_example_batch(16, 2)
    hp = JOB.hyperparams.model_copy(update={"max_steps": 6})

    # Execute
    patched = patch_weights(template, new)
    verify_patched(JOB, patched, new)
    trainer = get_trainer("executorch")
    a = trainer.train(JOB, RoundModel(state=new, program=patched), x, y, hp, seed=3)
    b = trainer.train(JOB, RoundModel(state=new, program=fresh.pte), x, y, hp, seed=3)

    # Assert: bit-identical updates; the template itself is untouched
    for name in a.update:
        np.testing.assert_array_equal(a.update[name], b.update[name])
    assert patched != template.pte


def test_layout_round_trips(template: ProgramTemplate) -> None:
    again = ProgramTemplate.from_layout(template.pte, template.layout_json())
    assert again == template


def test_wrong_weights_spec_is_refused(template: ProgramTemplate) -> None:
    bad = dict(initial_state(JOB, seed=1))
    name = next(iter(bad))
    bad[name] = bad[name][..., :1].copy()
    with pytest.raises(ProgramError, match="do not match the program template"):
        patch_weights(template, bad)


def test_a_wrong_offset_is_caught_before_publishing(template: ProgramTemplate) -> None:
    new = initial_state(JOB, seed=7)
    name = next(iter(template.offsets))
    shifted = ProgramTemplate(
        pte=template.pte,
        offsets={**template.offsets, name: template.offsets[name] + 4},
        spec=template.spec,
    )
    with pytest.raises(ProgramError):
        verify_patched(JOB, patch_weights(shifted, new), new)


def test_weights_that_cannot_be_located_are_refused(template: ProgramTemplate) -> None:
    zeros = {k: np.zeros_like(v) for k, v in initial_state(JOB, seed=0).items()}
    with pytest.raises(ExportError, match="cannot be patched"):
        make_template(template.pte, zeros)
