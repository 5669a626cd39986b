"""``python -m edge.simulator.crowd``: one simulator process for a large fleet, configured whole.

``canopy simulate`` exposes the options a user of ``canopy up`` needs; a scale
run (benchmarks/scale.py) also sets the connection pools, the long polls and
the start ramp, which are fields of ``SimulationConfig``. This entry point takes
the whole config as JSON, so every field is reachable without widening the
user-facing command::

    python -m edge.simulator.crowd --config '{"job": "hello-mobile", "devices": 5000,
        "gateways": ["http://127.0.0.1:8081"], "max_connections": 2600}' --summary-json s.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge.simulator.fleet import SimulationConfig
from edge.simulator.runner import run_simulation


def crowd_config(raw: dict[str, Any]) -> SimulationConfig:
    """A ``SimulationConfig`` from JSON, quiet unless asked; unknown fields are an error."""
    known = set(SimulationConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown simulation fields {unknown}; known: {sorted(known)}")
    return SimulationConfig(**{"progress": False, **raw})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.simulator.crowd")
    parser.add_argument("--config", required=True, help="SimulationConfig fields as JSON")
    parser.add_argument("--summary-json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    try:
        config = crowd_config(json.loads(args.config))
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    summary = asyncio.run(run_simulation(config))
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary.as_dict(), indent=2))
    return 1 if summary.fatal_error else 0


if __name__ == "__main__":
    sys.exit(main())
