"""``python -m edge.gateway``: the same command as ``canopy gateway``."""

from __future__ import annotations

import typer

from edge.cli import gateway

if __name__ == "__main__":
    typer.run(gateway)
