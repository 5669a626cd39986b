"""The command line of ``python -m edge.simulator`` (``canopy simulate``), built in one place.

``canopy up`` starts one per job, and the end-to-end tests, the fault tests and
the benchmarks start their own; all of them spell the options through here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def simulator_command(
    job: str, gateways: Sequence[str], *, devices: int, **options: str | float | bool | Path | None
) -> list[str]:
    """This interpreter's ``python -m edge.simulator`` for ``job`` against ``gateways``.

    ``options`` are the command's other options by their parameter name
    (``seed=3``, ``slow_fraction=0``, ``summary_json=path``, ``max_seconds=240``):
    ``True`` passes a flag alone (``forever=True``, ``quiet=True``), ``False`` or
    ``None`` leaves the option out.
    """
    command = [sys.executable, "-m", "edge.simulator", "--job", job, "--devices", str(devices)]
    command += ["--gateway", ",".join(gateways)]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = f"--{name.replace('_', '-')}"
        command += [flag] if value is True else [flag, str(value)]
    return command
