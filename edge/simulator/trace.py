"""Timestamps of the steps each simulated device takes for a task, for whoever asks.

A round's *devices phase* (from the moment the flow opens the round until the
uploads it waits for are in S3) is spent in many small steps: the long poll's
wake-up, the model download, the hand-off to a training worker, training, the
upload and the gateway's group commit. The summary counts what happened; a
trace says *when*, per device and task, so a benchmark can split the phase
(``benchmarks/devices_phase.py``) and a test can wait for exactly the steps it
needs instead of sleeping.

``run_simulation(config, trace=callback)`` calls ``callback`` on the event loop
for every step; with no callback nothing is recorded. The callback must be
quick and must not raise (it runs inside the device's loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Step = Literal[
    "offered",  # the poll answered with this task
    "offline",  # offered, but the device is offline this round: it skips the task (final)
    "downloaded",  # the model (and program) arrived and matched their sha256
    "dropped",  # the device dropped out after the download (final)
    "training",  # handed to a training worker
    "trained",  # the worker's reply is back (``seconds``: compute time in the worker)
    "uploading",  # the upload request is being sent
    "answered",  # the upload got its final answer (``outcome``: accepted, late, ...) (final)
    "failed",  # training failed, or the device gave up on the task (final)
]

FINAL_STEPS: frozenset[Step] = frozenset({"offline", "dropped", "answered", "failed"})


@dataclass(frozen=True)
class StepEvent:
    """One step of one device for one task, at wall-clock time ``at`` (``time.time()``)."""

    device_id: str
    task_id: str
    round: int
    step: Step
    at: float
    seconds: float | None = None  # "trained": compute seconds measured in the worker
    outcome: str | None = None  # "answered": the upload's outcome code

    @property
    def final(self) -> bool:
        """Whether the device is done with the task after this step."""
        return self.step in FINAL_STEPS


Tracer = Callable[[StepEvent], None]
