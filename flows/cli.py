"""The ``canopy`` command line.

Each area owns its commands and registers them here, so the root stays small:
``infra.lineage_cli`` (lineage), ``edge.training.cli`` (jobs, parity, export),
``edge.cli`` (gateway, simulate) and ``flows.stack_cli`` (up, down, report, demo).

The root lives in ``flows`` because it is the only layer allowed to see every
other one: ``infra`` must not import ``edge`` or ``flows``, so it cannot be the
place that wires their commands together.
"""

from __future__ import annotations

import typer

from edge import cli as edge_cli
from edge.training import cli as training_cli
from flows import stack_cli
from infra import lineage_cli

app = typer.Typer(
    name="canopy",
    help="Cross-device federated learning for phones, orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Cross-device federated learning for phones, orchestrated by Prefect."""


for _module in (lineage_cli, training_cli, edge_cli, stack_cli):
    _module.register(app)


def main() -> None:
    app()
