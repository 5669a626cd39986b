"""``python -m edge.simulator``: the same command as ``canopy simulate``."""

from __future__ import annotations

import typer

from edge.cli import simulate

if __name__ == "__main__":
    typer.run(simulate)
