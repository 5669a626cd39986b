"""The ``canopy`` command line.

Each area owns its commands and registers them here, so the root stays small:
``infra.lineage_cli`` (lineage), ``edge.training.cli`` (parity, export),
``edge.cli`` (gateway, simulate) and ``infra.stack`` (up, down).
"""

from __future__ import annotations

import importlib

import typer

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


# Modules that define a ``register(app)`` function; missing ones are skipped so
# each area can land on its own.
_COMMAND_MODULES = (
    "infra.lineage_cli",
    "edge.training.cli",
    "edge.cli",
    "infra.stack_cli",
)

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as _exc:
        if _exc.name is None or not _name.startswith(_exc.name):
            raise
        continue
    _module.register(app)


def main() -> None:
    app()
