"""Bad program bytes: truncated, foreign or corrupted .pte files fail clearly, never crash."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from edge.data.synthetic import XOR_LABELS, XOR_POINTS
from edge.jobs import TrainHyperparams, get_job
from edge.training import (
    ExecuTorchTrainer,
    ProgramError,
    RoundModel,
    TrainingProgram,
    initial_state,
    validate_program_bytes,
)
from edge.training.et_runtime import to_edge

REPO = Path(__file__).resolve().parents[2]


def test_valid_program_passes_the_checks(xor_pte: bytes) -> None:
    validate_program_bytes(xor_pte)
    program = TrainingProgram(xor_pte)
    assert program.batch_size == 4
    assert program.input_shapes == [(4, 2), (4,)]
    assert program.pte == xor_pte


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda pte: b"", "too short"),
        (lambda pte: b"\x00" * 7, "too short"),
        (lambda pte: b"garbage!" * 200, "file identifier at offset 4"),
        (lambda pte: pte[:1000], "truncated"),
        (lambda pte: pte[: len(pte) // 2], "truncated"),
        (lambda pte: pte[:-1], "truncated"),
    ],
    ids=["empty", "seven-bytes", "garbage", "first-kb", "half", "one-byte-short"],
)
def test_truncated_or_foreign_bytes_are_refused_before_loading(
    xor_pte: bytes, make: object, message: str
) -> None:
    data = make(xor_pte)  # type: ignore[operator]
    with pytest.raises(ProgramError, match=message):
        validate_program_bytes(data)
    job = get_job("xor-mobile")
    with pytest.raises(ProgramError, match=message):
        ExecuTorchTrainer().train(
            job,
            RoundModel(initial_state(job, 0), data),
            XOR_POINTS,
            XOR_LABELS,
            TrainHyperparams(batch_size=4),
        )


def test_an_inference_only_program_is_refused() -> None:
    module = torch.nn.Linear(2, 2)
    plain = to_edge(torch.export.export(module, (torch.randn(4, 2),))).to_executorch().buffer
    with pytest.raises(ProgramError, match="not an ExecuTorch training program"):
        TrainingProgram(bytes(plain))


def test_a_program_that_does_not_match_its_manifest_hash_is_not_loaded(xor_pte: bytes) -> None:
    corrupted = bytearray(xor_pte)
    corrupted[2000:2048] = b"\xff" * 48
    expected = hashlib.sha256(xor_pte).hexdigest()

    with pytest.raises(ProgramError, match="corrupted or replaced in transit"):
        TrainingProgram(bytes(corrupted), expected_sha256=expected)
    assert TrainingProgram(xor_pte, expected_sha256=expected).batch_size == 4


CORRUPTION_PROBE = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path

    from edge.jobs import TrainHyperparams, get_job
    from edge.data.synthetic import XOR_LABELS, XOR_POINTS
    from edge.training import ExecuTorchTrainer, RoundModel, initial_state
    from edge.training.errors import ProgramError, TrainingError

    pte = Path(sys.argv[1]).read_bytes()
    expected = hashlib.sha256(pte).hexdigest()
    job = get_job("xor-mobile")
    state = initial_state(job, 0)
    # Overwrite 48 bytes with 0xFF at offsets spread over the whole file.
    for fraction in (0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9):
        offset = int(len(pte) * fraction)
        data = bytearray(pte)
        data[offset : offset + 48] = b"\\xff" * 48
        try:
            ExecuTorchTrainer().train(
                job, RoundModel(state, bytes(data), program_sha256=expected),
                XOR_POINTS, XOR_LABELS, TrainHyperparams(batch_size=4, max_steps=2),
            )
            outcome = "trained"
        except (ProgramError, TrainingError) as exc:
            outcome = type(exc).__name__
        except Exception as exc:
            outcome = f"unexpected {type(exc).__name__}: {exc}"
        print(json.dumps({"offset": offset, "outcome": outcome}), flush=True)
    """
)


def test_corrupted_programs_fail_cleanly_without_crashing_the_process(
    xor_pte: bytes, tmp_path: Path
) -> None:
    """In a subprocess, so a native crash fails this test instead of killing pytest.

    Without the manifest hash, ExecuTorch 1.5.1 segfaults on some of these
    corruptions (e.g. 48 bytes at 15% of the XOR program); with it, the trainer
    refuses every one before the runtime sees the bytes.
    """
    program = tmp_path / "xor.pte"
    program.write_bytes(xor_pte)

    done = subprocess.run(
        [sys.executable, "-c", CORRUPTION_PROBE, str(program)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )

    assert done.returncode == 0, f"process died ({done.returncode}): {done.stderr[-2000:]}"
    outcomes = [json.loads(line)["outcome"] for line in done.stdout.splitlines() if line]
    assert outcomes == ["ProgramError"] * 7, outcomes
