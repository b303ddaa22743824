"""The study commands: ``run``, ``init``, ``leaderboard``, and the stages ``suite``, ``prepare-base``,
``train-expert`` and ``eval`` that can each be run alone on a user's own models."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mergebench.cli.main import _parse_params, cli, stderr, stdout
from mergebench.cli.output import quiet_libraries
from mergebench.core.errors import InputError
from mergebench.core.plugin_manager import get_plugin_manager

DEFAULT_RUN_DIR = Path("mergebench-run")


class RichReporter:
    """The runner's progress as rich bars: one per stage, with the item in progress and elapsed time."""

    def __init__(self, progress: Progress):
        self.progress, self.tasks = progress, {}

    def stage(self, name: str, total: int) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total, item="")
        else:
            self.progress.update(self.tasks[name], total=total)

    def update(self, name: str, item: str) -> None:
        if name not in self.tasks:
            self.stage(name, 0)
        self.progress.update(self.tasks[name], item=item)

    def advance(self, name: str, item: str = "") -> None:
        self.progress.update(self.tasks[name], advance=1, item=f"done: {item}" if item else "")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description:<16}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("[dim]{task.fields[item]}"), console=stderr)


def _cache():
    from mergebench.core.cache import ArtifactCache

    return ArtifactCache()


# ---- run / init / leaderboard --------------------------------------------------------------------

@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--run-dir", type=click.Path(path_type=Path), default=DEFAULT_RUN_DIR, show_default=True,
              help="Where the results database, merged models and leaderboard go.")
@click.option("--workers", type=int, default=None, help="Worker processes (default: the config's, 2).")
@click.option("--no-leaderboard", is_flag=True, help="Do not print the leaderboard at the end.")
def run(config: Path | None, run_dir: Path, workers: int | None, no_leaderboard: bool) -> None:
    """Run the study: build, train, merge (sweeping on validation), evaluate, and print the leaderboard.

    With no CONFIG: the built-in study in miniature on the micro suite. Rerun to resume: completed
    work is skipped.
    """
    from mergebench.study import config as run_config
    from mergebench.study import leaderboard
    from mergebench.study.runner import Runner

    quiet_libraries()
    pm = get_plugin_manager()
    cfg = run_config.load(config, pm)
    if workers is not None:
        cfg = run_config.parse({**cfg.to_dict(), "workers": workers}, pm, "--workers")
    started = time.perf_counter()
    with _progress() as progress:
        db = Runner(cfg, run_dir, pm, _cache(), RichReporter(progress)).run()
    seconds = time.perf_counter() - started
    rows = leaderboard.build(db)
    (run_dir / "leaderboard.md").write_text(leaderboard.markdown(rows))
    if not no_leaderboard:
        _print_table(rows)
    stdout.print(f"[bold]done[/] in {seconds:.0f} s. Results: {run_dir / 'results.sqlite'}; "
                 f"`mergebench leaderboard {run_dir} --format html -o leaderboard.html` for the plots.")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path), default=Path("mergebench.yaml"))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: Path, force: bool) -> None:
    """Write a commented example run configuration (default: mergebench.yaml)."""
    from mergebench.study.config import EXAMPLE

    if path.exists() and not force:
        raise InputError(f"{path} exists; use --force to overwrite it")
    path.write_text(EXAMPLE)
    stdout.print(f"wrote {path}; edit it, then `mergebench run {path}`")


def _print_table(rows) -> None:
    from mergebench.study.leaderboard import COLUMNS, table_rows

    if not stdout.is_terminal:
        stdout.width = max(stdout.width, 130)  # files and CI logs: no squeezed columns
    table = Table(title="mergebench leaderboard (normalised test scores; hyperparameters chosen on validation)")
    for c in COLUMNS:
        table.add_column(c, justify="right" if c in ("N", "held-in", "held-out", "seeds") else "left")
    previous = None
    for r, cells in zip(rows, table_rows(rows)):
        group = (r.size, r.base_kind, r.n)
        if previous is not None and group != previous:
            table.add_section()
        previous = group
        table.add_row(*cells, style="dim" if r.kind == "baseline" else None)
    stdout.print(table)


@cli.command("leaderboard")
@click.argument("run_dir", type=click.Path(path_type=Path), default=DEFAULT_RUN_DIR)
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "html", "json", "csv"]), default="table",
              show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write to a file instead of the terminal.")
@click.option("--size", "sizes", multiple=True, help="Only this model size (repeatable).")
@click.option("--base-kind", "base_kinds", multiple=True, type=click.Choice(["pretrained", "instruction_tuned"]))
@click.option("--method", "methods", multiple=True, help="Only this merge method (repeatable).")
@click.option("--sort", default="default", show_default=True, help="default, held_in, held_out, method or n.")
@click.option("--check", "check_path", type=click.Path(path_type=Path), help="Fail if scores drop below this baseline.")
@click.option("--tolerance", type=float, default=0.02, show_default=True, help="Allowed drop for --check.")
@click.option("--save-baseline", type=click.Path(path_type=Path), help="Save these scores as a baseline JSON.")
def leaderboard_command(run_dir: Path, fmt: str, output: Path | None, sizes, base_kinds, methods, sort: str,
                        check_path: Path | None, tolerance: float, save_baseline: Path | None) -> None:
    """Show a run's leaderboard; gate CI on a saved baseline with --check."""
    from mergebench.core.writer import atomic_write_text
    from mergebench.study import leaderboard
    from mergebench.study.runner import open_db

    db = open_db(run_dir)
    rows = leaderboard.build(db, tuple(sizes), tuple(base_kinds), tuple(methods), sort)
    if fmt == "table" and output is None:
        _print_table(rows)
    else:
        if fmt == "html":
            from mergebench.study.html import render

            text = render(rows, db)
        else:
            text = {"table": leaderboard.markdown, "markdown": leaderboard.markdown, "json": leaderboard.to_json,
                    "csv": leaderboard.to_csv}[fmt](rows)
        if output is None:
            click.echo(text, nl=False)
        else:
            atomic_write_text(output, text)
            stderr.print(f"wrote {output}")
    if save_baseline is not None:
        atomic_write_text(save_baseline, json.dumps(leaderboard.baseline_record(rows), indent=2) + "\n")
        stderr.print(f"saved baseline {save_baseline} ({sum(r.kind == 'merge' for r in rows)} rows)")
    if check_path is not None:
        failures = leaderboard.check(rows, check_path, tolerance)
        if failures:
            for f in failures:
                stderr.print(f"[red]regression[/] {f}")
            raise SystemExit(1)
        stderr.print(f"[green]ok[/]: no row dropped more than {tolerance} below {check_path}")
