"""``canopy lineage s3://BUCKET/KEY``: print an object's ancestry as a tree."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.tree import Tree

from infra.keys import parse_s3_uri
from infra.lineage import LineageNode, walk_lineage
from infra.settings import S3Settings
from infra.store import S3ObjectStore


def render_lineage(node: LineageNode) -> Tree:
    """Turn an ancestry into a rich tree: object, producing step, parameters, run."""
    tree = Tree(_label(node))
    _add_parents(tree, node)
    return tree


def _label(node: LineageNode) -> str:
    parts = [f"[bold]{node.uri}[/bold] [dim]sha256 {node.sha256[:12]}[/dim]"]
    rec = node.record
    if rec is None:
        parts.append("[yellow](no lineage record: a root of the chain)[/yellow]")
    else:
        params = ", ".join(f"{k}={v}" for k, v in sorted(rec.parameters.items())[:6])
        parts.append(f"[cyan]{rec.kind}[/cyan] at {rec.finished_at:%Y-%m-%d %H:%M:%S}")
        if params:
            parts.append(f"[dim]{params}[/dim]")
        if rec.flow_run_id:
            parts.append(f"[dim]flow run {rec.flow_run_id}[/dim]")
        if rec.code_revision:
            parts.append(f"[dim]code {rec.code_revision[:10]}[/dim]")
    if node.problem:
        parts.append(f"[red]! {node.problem}[/red]")
    return "  ".join(parts)


def _add_parents(tree: Tree, node: LineageNode) -> None:
    for parent in node.parents:
        _add_parents(tree.add(_label(parent)), parent)


def lineage(
    uri: str = typer.Argument(..., help="s3://BUCKET/KEY of the object to trace"),
) -> None:
    """Print the ancestry of an S3 object back to the initial model."""
    console = Console()
    try:
        bucket, _ = parse_s3_uri(uri)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    store = S3ObjectStore(S3Settings(bucket=bucket))
    root = walk_lineage(store, uri)
    if root.problem == "object missing":
        console.print(f"[red]error:[/red] {uri} does not exist")
        raise typer.Exit(1)
    console.print(render_lineage(root))


def register(app: typer.Typer) -> None:
    app.command("lineage")(lineage)
