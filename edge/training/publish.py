"""Export behind the parity gate, and publish to the store with a lineage record.

``export_verified`` is still pure: export, then check parity on the exact bytes.
``publish_program`` is the I/O wrapper the round flow calls: it stores the
program only when parity passed, then records an ``executorch-export`` lineage
entry linking the program to the global model it was exported from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec
from edge.training.errors import ParityError
from edge.training.export import ExportedProgram, ProgramInfo, export_job_program
from edge.training.parity import DEFAULT_TOLERANCE, MIN_STEPS, ParityReport, check_parity
from infra.lineage import ArtifactRef
from infra.outputs import LineageObserver, Output, Provenance, put_with_lineage
from infra.store import ObjectRef, ObjectStore

KIND_PROGRAM = "executorch-program"


@dataclass(frozen=True)
class VerifiedProgram:
    """An exported program together with the parity report it passed."""

    program: ExportedProgram
    parity: ParityReport


@dataclass(frozen=True)
class PublishedProgram:
    """Where a verified program was stored, and what it is."""

    ref: ObjectRef
    info: ProgramInfo
    parity: ParityReport


def export_verified(
    job: JobSpec,
    state: TensorDict,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    parity_steps: int = MIN_STEPS,
    tol: float = DEFAULT_TOLERANCE,
) -> VerifiedProgram | None:
    """Export ``state`` and check parity on the very bytes; ``None`` for closed-form jobs.

    Raises
    ------
    ParityError
        When ExecuTorch and PyTorch training differ by more than ``tol``; the
        message carries the measured difference.
    """
    exported = export_job_program(job, state, batch_size=batch_size, seed=seed)
    if exported is None:
        return None
    report = check_parity(
        job, steps=parity_steps, tol=tol, state=state, program=exported.pte, seed=seed
    )
    if not report.passed:
        worst = max(report.per_tensor, key=report.per_tensor.__getitem__)
        raise ParityError(
            f"job {job.name}: the exported program trains differently from PyTorch: max abs "
            f"weight difference {report.max_abs_diff:.3e} after {report.steps} steps (worst "
            f"{worst}) exceeds the tolerance {tol:.1e}; the program is not published"
        )
    return VerifiedProgram(program=exported, parity=report)


def publish_program(
    store: ObjectStore,
    job: JobSpec,
    state: TensorDict,
    *,
    key: str,
    inputs: Sequence[ObjectRef | ArtifactRef],
    batch_size: int | None = None,
    seed: int = 0,
    tol: float = DEFAULT_TOLERANCE,
    flow_run_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    observers: Sequence[LineageObserver] = (),
) -> PublishedProgram | None:
    """Export, gate on parity, store at ``key`` and write the lineage record.

    ``inputs`` are what the program derives from (the round's global model).
    Returns ``None`` for closed-form jobs, which have no program.
    """
    started_at = datetime.now(UTC)
    verified = export_verified(job, state, batch_size=batch_size, seed=seed, tol=tol)
    if verified is None:
        return None
    info = verified.program.info
    ref = put_with_lineage(
        store,
        Output(
            key,
            verified.program.pte,
            kind=KIND_PROGRAM,
            metadata={
                "job": job.name,
                "batch-size": str(info.batch_size),
                "executorch-version": info.executorch_version,
                "parity-max-abs-diff": f"{verified.parity.max_abs_diff:.3e}",
            },
        ),
        Provenance(
            kind="executorch-export",
            inputs=list(inputs),
            parameters={
                "job": job.name,
                "batch_size": info.batch_size,
                "size_bytes": info.size_bytes,
                "parameters": info.parameter_names,
                "maxpool_backward_decomposed": info.maxpool_backward_decomposed,
                "operators": len(info.operators),
                "export_seconds": info.export_seconds,
                "parity_max_abs_diff": verified.parity.max_abs_diff,
                "parity_tolerance": tol,
                "parity_steps": verified.parity.steps,
                **dict(parameters or {}),
            },
            started_at=started_at,
            flow_run_id=flow_run_id,
        ),
        observers=observers,
    )
    return PublishedProgram(ref=ref, info=info, parity=verified.parity)
