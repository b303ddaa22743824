"""The study commands: ``run``, ``init``, ``leaderboard``, ``compare``, ``report``, and the stages ``suite``,
``prepare-base``, ``train-expert`` and ``eval`` that can each be run alone on a user's own models."""

from __future__ import annotations

import json
import time
from pathlib import Path

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
    from mergebench.study.cache import ArtifactCache

    return ArtifactCache()


# ---- run / init / leaderboard --------------------------------------------------------------------

@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--run-dir", type=click.Path(path_type=Path), default=DEFAULT_RUN_DIR, show_default=True,
              help="Where the results database, merged models and leaderboard go.")
@click.option("--workers", type=int, default=None, help="Worker processes (default: the config's, 2).")
@click.option("--executor", default=None, help="Where jobs run: local (default) or ray (`mergebench plugins` lists more).")
@click.option("--address", default=None, help="Ray cluster address for --executor ray ('auto': the running cluster).")
@click.option("--no-leaderboard", is_flag=True, help="Do not print the leaderboard at the end.")
@click.option("--plan", "show_plan", is_flag=True,
              help="Do nothing: print every job the run would do, what each needs, and missing inputs (offline).")
@click.option("--gpu-memory", type=float, default=80.0, show_default=True, help="GiB per GPU, for --plan's GPU counts.")
@click.option("--json", "as_json", is_flag=True, help="With --plan: machine-readable output.")
def run(config: Path | None, run_dir: Path, workers: int | None, executor: str | None, address: str | None,
        no_leaderboard: bool, show_plan: bool, gpu_memory: float, as_json: bool) -> None:
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
    if workers is not None or executor is not None or address is not None:
        changes: dict = {} if workers is None else {"workers": workers}
        if executor is not None or address is not None:
            chosen = cfg.executor.to_dict()
            if executor is not None and executor != chosen["name"]:
                chosen = {"name": executor, "params": {}}
            if address is not None:
                chosen["params"]["address"] = address
            changes["executor"] = chosen
        cfg = run_config.parse({**cfg.to_dict(), **changes}, pm, "the command line")
    if show_plan:
        from mergebench.study import plan as planning

        made = planning.make_plan(cfg, pm, gpu_memory)
        if as_json:
            click.echo(planning.to_json(made), nl=False)
        else:
            _print_plan(made)
        return
    for line in run_config.skipped(cfg):
        stderr.print(f"[dim]note: {line}[/]")
    if cfg.evaluator.name == "lm-eval":
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise InputError("the lm-eval evaluator needs lm-eval: pip install 'mergebench[eval]'") from None
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


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes else "?"


def _print_plan(plan) -> None:
    if not stdout.is_terminal:
        stdout.width = max(stdout.width, 140)
    bases = Table(title="bases (from metadata; no weights read)")
    for c in ("size", "kind", "model", "parameters", "where"):
        bases.add_column(c)
    for (size, kind), info in plan.bases.items():
        count = "?" if info.parameters is None else f"{'~' if info.estimated else ''}{info.parameters / 1e9:.2f}B"
        bases.add_row(size, kind, info.reference, count, "missing" if info.path is None and info.estimated else
                      str(info.path or "built by the run"))
    stdout.print(bases)
    table = Table(title="jobs")
    for c in ("kind", "what", "jobs", "sweep points", "GPUs each", "host memory each"):
        table.add_column(c, justify="right" if c in ("jobs", "sweep points", "GPUs each", "host memory each") else "left")
    for j in plan.jobs:
        memory = "streamed" if j.kind == "sweep" and not j.resources.memory_bytes else _gib(j.resources.memory_bytes)
        table.add_row(j.kind, j.what, str(j.count), str(j.points or ""), str(j.resources.gpus), memory)
    stdout.print(table)
    stdout.print("totals: " + ", ".join(f"{v} {k}" for k, v in plan.totals().items()))
    for note in plan.notes:
        stdout.print(f"[dim]note: {note}[/]")
    if plan.missing:
        stdout.print(f"[bold red]missing from the local cache ({len(plan.missing)}):[/]")
        for m in plan.missing:
            stdout.print(f"  {m}")
    else:
        stdout.print("every input is in the local cache")


def _print_table(rows) -> None:
    from mergebench.study.leaderboard import COLUMNS, DRAW_COLUMNS, draw_rows, notes, table_rows

    intervals = any(r.held_in_ci or r.held_out_ci for r in rows)
    if not stdout.is_terminal:  # files and CI logs: no squeezed columns
        stdout.width = max(stdout.width, 170 if intervals else 130)
    table = Table(title="mergebench leaderboard (normalised test scores; hyperparameters chosen on validation)")
    for c in COLUMNS:
        table.add_column(c, justify="right" if c in ("N", "held-in", "held-out", "seeds") else "left",
                         no_wrap=c in ("held-in", "held-out"))
    previous = None
    for r, cells in zip(rows, table_rows(rows)):
        group = (r.size, r.base_kind, r.n)
        if previous is not None and group != previous:
            table.add_section()
        previous = group
        table.add_row(*cells, style="dim" if r.kind == "baseline" else None)
    stdout.print(table)
    for note in notes(rows):
        stdout.print(f"[dim]{note}[/]")
    drawn = draw_rows(rows)
    if drawn:
        spread = Table(title="random draws of stochastic methods: spread from the draw vs between seeds (standard "
                             "deviations)")
        for c in DRAW_COLUMNS:
            spread.add_column(c, justify="left" if c in ("size", "base", "method") else "right")
        for cells in drawn:
            spread.add_row(*cells)
        stdout.print(spread)


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
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Bootstrap replicates for the 95% intervals (0: no intervals).")
def leaderboard_command(run_dir: Path, fmt: str, output: Path | None, sizes, base_kinds, methods, sort: str,
                        check_path: Path | None, tolerance: float, save_baseline: Path | None, n_boot: int) -> None:
    """Show a run's leaderboard with 95% intervals (bootstrap over seeds and test examples); gate CI on a saved
    baseline with --check."""
    from mergebench.core.writer import atomic_write_text
    from mergebench.study import leaderboard
    from mergebench.study.runner import open_db

    db = open_db(run_dir)
    rows = leaderboard.build(db, tuple(sizes), tuple(base_kinds), tuple(methods), sort, n_boot=n_boot)
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


@cli.command("compare")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("a")
@click.argument("b")
@click.option("--n", "ns", type=int, multiple=True, help="Only this number of merged experts (repeatable).")
@click.option("--size", "sizes", multiple=True, help="Only this model size (repeatable).")
@click.option("--base-kind", "base_kinds", multiple=True, help="Only this base kind (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap replicates for the interval.")
@click.option("--permutations", "n_perm", type=click.IntRange(min=100), default=10_000, show_default=True,
              help="Random sign patterns for the permutation test (exact when 16 or fewer examples differ).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap and permutation draws.")
def compare_command(run_dir: Path, a: str, b: str, ns, sizes, base_kinds, fmt: str, n_boot: int, n_perm: int,
                    seed: int) -> None:
    """Paired difference A - B between two merge methods of a run, or a method and a baseline (base, experts,
    multitask): mean difference, 95% interval (bootstrap over seeds and test examples) and p-value (paired
    permutation test over test examples), held-in and held-out, overall and per category."""
    from mergebench.study.compare import compare
    from mergebench.study.runner import open_db

    result = compare(open_db(run_dir), a, b, tuple(sizes), tuple(base_kinds), tuple(ns), n_boot, n_perm, seed)
    if fmt == "json":
        click.echo(json.dumps(result, indent=2))
        return
    _print_comparison(result)


def _print_comparison(result: dict) -> None:
    def num(v, digits: int = 3) -> str:
        return "-" if v is None else f"{v:+.{digits}f}" if digits == 3 else f"{v:.{digits}f}"

    def p_text(p, floor: float) -> str:
        """The p-value; at the smallest value its number of random draws can give, shown as an upper bound."""
        if p is None:
            return "-"
        text = f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"
        return f"≤{text}" if abs(p - floor) < 1e-12 else text

    if not stdout.is_terminal:
        stdout.width = max(stdout.width, 140)
    a, b = result["a"], result["b"]
    bases = set()
    for g in result["groups"]:
        table = Table(title=f"{a} - {b}: {g['size']}, {g['base_kind'].replace('_', '-')} base, N={g['n']}")
        for c in ("score", a, b, "difference", "95% interval", "p", "p (bootstrap)", "per seed"):
            table.add_column(c, justify="left" if c in ("score", "per seed") else "right")
        for metric in ("held_in", "held_out"):
            block = g[metric]
            rows = [(metric.replace("_", "-"), block)] + [(f"  {c}", v) for c, v in block["categories"].items()]
            for label, d in rows:
                ci = "-" if d["ci"] is None else f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
                seeds = ", ".join(f"{s}: {v:+.3f}" for s, v in d["per_seed"].items())
                monte_carlo = d["test"].startswith("sign-flip permutation") and d["examples"] > 16
                table.add_row(label, f"{d['a']:.3f}", f"{d['b']:.3f}", num(d["difference"]), ci,
                              p_text(d["p_value"], 1 / (1 + result["permutations"]) if monte_carlo else -1),
                              p_text(d["p_bootstrap"], 2 / (1 + result["replicates"])), seeds)
                bases.add((d["test"], d["basis"]))
            table.add_section()
        stdout.print(table)
    tests = sorted({t for t, _ in bases})
    stdout.print(f"[dim]difference: mean over seeds of {a} - {b} (normalised scores); 95% interval: two-level "
                 f"bootstrap over seeds and test examples ({result['replicates']} replicates, seed {result['seed']}); "
                 f"p: {'; '.join(tests)}; p (bootstrap): the interval's test of 0.[/]")


@cli.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path), default=DEFAULT_RUN_DIR)
@click.option("--format", "fmt", type=click.Choice(["markdown", "html", "json"]), default="markdown", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write to a file instead of the terminal.")
@click.option("--resolve", type=float, default=0.05, show_default=True,
              help="The difference of normalised score the plan resolves (and finding 4's non-inferiority margin).")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap replicates for the intervals.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap draws.")
def report_command(run_dir: Path, fmt: str, output: Path | None, resolve: float, n_boot: int, seed: int) -> None:
    """The paper's six findings tested on a run (effect, 95% interval, verdict), a per-category view and how many
    seeds or test examples would resolve a difference of --resolve."""
    from mergebench.core.writer import atomic_write_text
    from mergebench.study import report
    from mergebench.study.runner import open_db

    result = report.build(open_db(run_dir), n_boot, seed, resolve)
    if fmt == "html":
        from mergebench.study.html import render_report

        text = render_report(result)
    else:
        text = report.to_json(result) if fmt == "json" else report.markdown(result)
    if output is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(output, text)
        stderr.print(f"wrote {output}")


# ---- the stages, each usable alone ---------------------------------------------------------------

@cli.group()
def suite() -> None:
    """Benchmark suites: list them, build a generated one."""


@suite.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def suite_list(as_json: bool) -> None:
    """The registered suites and their held-in / held-out categories."""
    suites = get_plugin_manager().suites()
    records = [{"name": s.name, "plugin": s.plugin, "description": s.description, "generated": s.build is not None,
                "held_in": {c: [d.name for d in ds] for c, ds in s.held_in.items()},
                "held_out": {c: [d.name for d in ds] for c, ds in s.held_out.items()}} for s in suites]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    table = Table(title="suites")
    for c in ("name", "held-in datasets", "held-out datasets", "data", "description"):
        table.add_column(c)
    for r in records:
        table.add_row(r["name"], str(sum(map(len, r["held_in"].values()))), str(sum(map(len, r["held_out"].values()))),
                      "generated" if r["generated"] else "hub (lm-eval configs)", r["description"])
    stdout.print(table)


@suite.command("build")
@click.argument("name")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE", help="A suite parameter, e.g. -p test=400.")
def suite_build(name: str, seed: int, params: tuple[str, ...]) -> None:
    """Generate a suite's data and tokenizer (cached: a second build is free); prints its directory."""
    from mergebench.study import artifacts

    data = artifacts.suite(get_plugin_manager(), _cache(), name, seed, _parse_params(params))
    stderr.print(f"suite {name} (seed {seed}): {len(data.files)} files")
    click.echo(str(data.directory))


def _step_bar(progress: Progress, what: str):
    task = progress.add_task(what, total=None, item="")

    def on_step(step: int, total: int, loss: float) -> None:
        progress.update(task, total=total, completed=step, item=f"loss {loss:.3f}")
    return on_step


def _publish(built: Path, output: Path | None, force: bool) -> Path:
    """Copy a cached artefact to ``output`` (atomically) when asked; otherwise the cache path is the answer."""
    import shutil

    from mergebench.core.writer import AtomicDirectory

    if output is None:
        return built
    with AtomicDirectory(Path(output), force) as tmp:
        for f in Path(built).iterdir():
            if f.is_file() and f.name != "mergebench-artifact.json":
                shutil.copy2(f, tmp / f.name)
    return Path(output)


@cli.command("prepare-base")
@click.option("--suite-param", "suite_params", multiple=True, metavar="NAME=VALUE",
              help="A suite parameter, as given to `suite build` (e.g. test=400).")
@click.option("--preparer", default="pretrain", show_default=True,
              help="A registered base preparer (`mergebench plugins`): pretrain, instruction_tune, load, ...")
@click.option("--suite", "suite_name", default="micro-t0", show_default=True, help="Suite whose data the preparer reads.")
@click.option("--seed", type=int, default=0, show_default=True, help="The suite's seed.")
@click.option("--base", type=click.Path(path_type=Path), help="The base this one starts from (instruction_tune).")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE", help="A preparer parameter (repeatable).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Copy the model here (default: print its cache path).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def prepare_base(suite_params: tuple[str, ...], preparer: str, suite_name: str, seed: int, base: Path | None,
                 params: tuple[str, ...], device: str, output: Path | None, force: bool) -> None:
    """Build a base model with any registered preparer: pretrain one, instruction-tune one (--base), or load
    one (--preparer load -p model=PATH_OR_HUB_ID)."""
    from mergebench.study import api

    quiet_libraries()
    component = get_plugin_manager().base_preparers().get(preparer)
    given = _parse_params(params)
    component.resolve_params(given)  # unknown or bad parameters fail before any work
    if component.needs_source and base is None:
        raise InputError(f"base preparer '{preparer}' starts from another base: it needs --base DIR")
    if base is not None and not (base / "config.json").is_file():
        raise InputError(f"{base}: not a model directory (no config.json)")
    kwargs = dict(suite=suite_name, suite_params=_parse_params(suite_params), seed=seed, source=base, device=device)
    if not component.cached:  # it points at an existing model: nothing to build, nothing to show
        built = api.prepare_base(preparer, given, **kwargs)
    else:
        with _progress() as progress:
            built = api.prepare_base(preparer, given, on_step=_step_bar(progress, preparer), **kwargs)
    click.echo(str(_publish(Path(built), output, force)))


@cli.command("train-expert")
@click.option("--suite-param", "suite_params", multiple=True, metavar="NAME=VALUE",
              help="A suite parameter, as given to `suite build` (e.g. test=400).")
@click.argument("base", type=click.Path(path_type=Path))
@click.option("--category", "categories", multiple=True, help="A held-in category of the suite (repeatable).")
@click.option("--data", "data_files", multiple=True, type=click.Path(path_type=Path),
              help="Your own training JSONL (query + answer, or query + choices + label) instead of a category.")
@click.option("--trainer", default="full_finetune", show_default=True,
              help="A registered expert trainer (`mergebench plugins`): full_finetune, multitask, hf_trainer, ...")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--suite", "suite_name", default="micro-t0", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="The suite's seed.")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE", help="A trainer parameter (repeatable).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Copy the expert here (default: print its cache path).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def train_expert(suite_params: tuple[str, ...], base: Path, categories: tuple[str, ...], data_files: tuple[Path, ...],
                 trainer: str, device: str, suite_name: str, seed: int, params: tuple[str, ...], output: Path | None, force: bool) -> None:
    """Fine-tune BASE into an expert on suite categories (multitask: all of them) or your own data."""
    from mergebench.study import artifacts
    from mergebench.study.contracts import ComponentChoice

    quiet_libraries()
    pm, cache = get_plugin_manager(), _cache()
    component = pm.expert_trainers().get(trainer)
    given = component.resolve_params(_parse_params(params))
    if not (base / "config.json").is_file():
        raise InputError(f"{base}: not a model directory (no config.json)")
    if data_files:  # everything is checked before the progress display starts
        missing = [str(f) for f in data_files if not f.is_file()]
        if missing:
            raise InputError(f"training data not found: {', '.join(missing)}")
        if output is None:
            raise InputError("--data needs -o OUTPUT (only suite categories are cached)")
        from mergebench.core.writer import AtomicDirectory

        with AtomicDirectory(output, force) as tmp, _progress() as progress:
            component.train(base.resolve(), list(data_files), given, tmp, on_step=_step_bar(progress, trainer),
                            device=device)
        click.echo(str(output))
        return
    suite_component = pm.suites().get(suite_name)
    chosen = list(suite_component.held_in) if trainer == "multitask" and not categories else list(categories)
    if not chosen:
        raise InputError(f"give --category (one of: {', '.join(suite_component.held_in)}) or --data FILE")
    for c in chosen:
        if c not in suite_component.held_in:
            from mergebench.core.registry import _unknown_message

            raise InputError(_unknown_message(f"category '{c}'", f"suite '{suite_name}'", suite_component.held_in))
    data = artifacts.suite(pm, cache, suite_name, seed, _parse_params(suite_params))
    with _progress() as progress:
        built = artifacts.expert(pm, cache, data, base.resolve(), chosen, ComponentChoice(trainer, given),
                                 device=device, on_step=_step_bar(progress, trainer))
    click.echo(str(_publish(built, output, force)))


@cli.command("eval")
@click.option("--suite-param", "suite_params", multiple=True, metavar="NAME=VALUE",
              help="A suite parameter, as given to `suite build` (e.g. test=400).")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--suite", "suite_name", default="micro-t0", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="The suite's seed.")
@click.option("--split", type=click.Choice(["validation", "test"]), default="test", show_default=True)
@click.option("--dataset", "datasets", multiple=True, help="Only these datasets (default: all of the suite's).")
@click.option("--base", "base_ref", help="Which MODEL is the base (held-out normaliser): its path.")
@click.option("--expert", "expert_refs", multiple=True, metavar="CATEGORY=PATH",
              help="Which MODEL is the expert of a category (held-in normaliser); repeatable.")
@click.option("--evaluator", "evaluator_name", default="lm-eval", show_default=True, help="A registered evaluator.")
@click.option("-p", "--param", "eval_params", multiple=True, metavar="NAME=VALUE",
              help="An evaluator parameter (repeatable), e.g. -p batch_size=16.")
@click.option("--batch-size", type=int, default=None, help="The evaluator's batch_size (default: its own).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-cache", is_flag=True, help="Evaluate again even where cached scores exist (and replace none).")
def eval_command(suite_params: tuple[str, ...], models: tuple[Path, ...], suite_name: str, seed: int, split: str, datasets: tuple[str, ...],
                 base_ref: str | None, expert_refs: tuple[str, ...], evaluator_name: str, eval_params: tuple[str, ...],
                 batch_size: int | None, as_json: bool, no_cache: bool) -> None:
    """Evaluate MODELS with lm-eval on a suite: raw scores per dataset, normalised when --base/--expert are given.

    Scores are cached under MERGEBENCH_HOME by the contents of the model's files and the dataset's
    split, so evaluating the same model on the same data again is free."""
    from mergebench.study import api
    from mergebench.study.normalise import normalise

    quiet_libraries()
    pm = get_plugin_manager()
    suite_component = pm.suites().get(suite_name)
    for m in models:
        if not (m / "config.json").is_file():
            raise InputError(f"{m}: not a model directory (no config.json)")
    names = [str(m) for m in models]
    experts = dict(_parse_params(expert_refs))
    for ref in [base_ref, *experts.values()]:
        if ref is not None and ref not in names:
            raise InputError(f"{ref}: --base/--expert must name one of the MODELS being evaluated")
    for c in experts:
        if c not in suite_component.held_in:
            raise InputError(f"--expert {c}=...: suite '{suite_name}' has no held-in category '{c}'")
    all_datasets = list(suite_component.datasets())
    chosen = list(datasets) or all_datasets
    for d in chosen:
        if d not in all_datasets:
            from mergebench.core.registry import _unknown_message

            raise InputError(_unknown_message(f"dataset '{d}'", f"suite '{suite_name}'", all_datasets))
    given = {**_parse_params(eval_params), **({"batch_size": batch_size} if batch_size is not None else {})}
    pm.evaluators().get(evaluator_name).resolve_params(given)  # bad parameters fail before any work
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("evaluate", total=len(models), item="")

        def on_model(m) -> None:
            if progress.tasks[task].completed or progress.tasks[task].fields["item"]:
                progress.advance(task)
            progress.update(task, item=str(m))
        scored = api.evaluate(models, suite=suite_name, datasets=chosen, split=split, evaluator=evaluator_name,
                              params=given, suite_params=_parse_params(suite_params), seed=seed,
                              use_cache=not no_cache, on_model=on_model)
        progress.update(task, completed=len(models))
    results = {m: scores for m, (scores, _) in scored.items()}
    cached = [m for m, (_, hit) in scored.items() if hit]
    seconds = time.perf_counter() - started
    normalised = {}
    if base_ref or experts:
        held_in = {c: [d.name for d in suite_component.held_in[c] if d.name in chosen] for c in experts}
        held_out = {c: [d.name for d in ds if d.name in chosen] for c, ds in suite_component.held_out.items()} if base_ref else {}
        for m, scores in results.items():
            n = normalise(scores, held_in, held_out, {c: results[p] for c, p in experts.items()},
                          results[base_ref] if base_ref else {}, on_zero="skip")
            normalised[m] = {"held_in": n.held_in, "held_out": n.held_out, "per_dataset": n.per_dataset,
                             "skipped": n.skipped}
    if as_json:
        click.echo(json.dumps({"suite": suite_name, "seed": seed, "split": split, "seconds": seconds,
                               "cached": cached, "base": base_ref, "experts": experts, "scores": results, "normalised": normalised},
                              indent=2))
        return
    labels = {m: Path(m).name[:14] for m in results}  # a short name per column: its role when one was given
    labels.update({p: c[:14] for c, p in experts.items()})
    if base_ref:
        labels[base_ref] = "base"
    _print_eval(results, normalised, suite_component, chosen, split, seconds, labels)
    if cached:
        stderr.print(f"{len(cached)} of {len(results)} models' scores came from the evaluation cache "
                     "(--no-cache evaluates again)")


def _print_eval(results, normalised, suite_component, chosen, split, seconds, labels) -> None:
    if not stdout.is_terminal:
        stdout.width = max(stdout.width, 60 + 12 * len(results))
    table = Table(title=f"raw scores on {split} ({seconds:.1f} s)")
    table.add_column("category")
    table.add_column("dataset")
    table.add_column("metric")
    for m in results:
        table.add_column(labels[m], justify="right")
    for group in ("held_in", "held_out"):
        for category, ds in getattr(suite_component, group).items():
            for d in ds:
                if d.name in chosen:
                    table.add_row(category, d.name, d.metric, *[f"{results[m][d.name]:.3f}" for m in results])
        table.add_section()
    if normalised:
        for key in ("held_in", "held_out"):
            table.add_row(f"normalised {key.replace('_', '-')}", "", "",
                          *["-" if normalised[m][key] is None else f"{normalised[m][key]:.3f}" for m in results])
    stdout.print(table)
