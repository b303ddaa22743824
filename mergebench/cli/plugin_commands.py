"""``mergebench plugin``: tools for plugin authors. ``plugin check NAME`` runs the conformance kit
(:mod:`mergebench.core.conformance`) on a registered merge method: exit 0 when every invariant holds,
1 when one fails, 2 for an unknown name."""

from __future__ import annotations

import json

import click
from rich.table import Table

from mergebench.cli.main import cli, stdout
from mergebench.core.plugin_manager import get_plugin_manager

_STYLE = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "skip": "[yellow]skip[/]", "info": "[cyan]info[/]"}


@cli.group()
def plugin() -> None:
    """Tools for plugin authors."""


@plugin.command("check")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def check(ctx: click.Context, name: str, as_json: bool) -> None:
    """Check merge method NAME against the method contract (determinism, chunking, identities, ...).

    \b
    mergebench plugin check consensus       # exit 1, naming each broken invariant, if one fails
    """
    from mergebench.core.conformance import check_method

    report = check_method(name, get_plugin_manager())
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        table = Table(title=f"Conformance of merge method '{report.method}' (plugin {report.plugin or '?'})")
        for col in ("invariant", "result", "detail", "time"):
            table.add_column(col, overflow="fold", justify="right" if col == "time" else "left")
        for r in report.results:
            seconds = f"{r.seconds * 1e3:.0f} ms" if r.seconds < 1 else f"{r.seconds:.1f} s"
            table.add_row(r.name, _STYLE[r.status], r.detail, seconds)
        stdout.print(table)
        counts = {s: sum(r.status == s for r in report.results) for s in _STYLE}
        verdict = "[green]conforms[/]" if report.ok else f"[bold red]{counts['fail']} invariant(s) broken[/]"
        stdout.print(f"{report.method}: {verdict} ({counts['pass']} passed, {counts['skip']} skipped)")
    if not report.ok:
        ctx.exit(1)
