"""The ``mergebench`` command: click commands over the Python API, rich tables and progress bars."""

from __future__ import annotations

import atexit
import errno
import gc
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from mergebench import __version__
from mergebench.core.errors import MergebenchError, ParameterError
from mergebench.core.plugin_manager import get_plugin_manager

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False)


class UserError(click.ClickException):
    """A MergebenchError on its way out: one line on stderr, exit code 2."""

    exit_code = 2


# the operating system's refusals a user can act on (not bugs): one line, exit 2
_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or choose another location",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another location",
    errno.EROFS: "the filesystem is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted; choose a location you can write to, or fix its permissions",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}


def os_error_message(exc: OSError) -> str | None:
    """One line for an OSError the user can act on, or None when it is not one of those."""
    hint = _OS_HINTS.get(exc.errno or -1)
    if hint is None:
        return None
    where = exc.filename or ""
    return f"{where}: {exc.strerror} ({hint})" if where else f"{exc.strerror} ({hint})"


class MergebenchGroup(click.Group):
    """Turns user errors into one line and exit 2, and other exceptions into a short internal-error line."""

    _plugin_commands_loaded = False

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not MergebenchGroup._plugin_commands_loaded:
            try:
                get_plugin_manager().hook.register_commands(cli=self)
            except MergebenchError as exc:
                click.echo(f"Error: {exc}", err=True)
                sys.exit(2)
            MergebenchGroup._plugin_commands_loaded = True
        return super().main(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MergebenchError as exc:
            raise UserError(str(exc)) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except OSError as exc:
            message = os_error_message(exc)
            if message is None:
                raise click.ClickException(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for "
                                           f"the traceback, and please report it)") from None
            raise UserError(message) from None
        except Exception as exc:  # noqa: BLE001 - a bug: short message unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            raise click.ClickException(
                f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and please report it)"
            ) from None


@click.group(cls=MergebenchGroup)
@click.version_option(__version__, prog_name="mergebench")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for internal errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """mergebench: merge language models with pluggable methods and benchmark the merges."""
    ctx.obj = {"debug": debug}


def _parse_params(items: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"parameter '{item}' must look like NAME=VALUE, e.g. -p density=0.2")
        params[name.strip()] = value.strip()
    return params


class _RichProgress:
    """Adapts the engine's progress callback to a rich progress bar, one task per stage.

    The display starts with the first report, so errors found before any work print no empty bar.
    """

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int, name: str) -> None:
        if not self.tasks:
            self.progress.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, tensor="")
        self.progress.update(self.tasks[stage], completed=done, tensor=name)

    def __enter__(self) -> "_RichProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.tasks:
            self.progress.stop()


def make_progress(console: Console = stderr) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[tensor]}"),
        console=console,
        transient=False,
    )


@cli.command()
@click.argument("method_or_recipe")
@click.option("--base", "-b", help="Base model: directory, .safetensors file or cached hub id.")
@click.option("--expert", "-e", "experts", multiple=True, help="An expert model (repeat for each).")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE", help="A method parameter (repeatable).")
@click.option("--weight", "-w", "weights", multiple=True, type=float, help="Per-expert weight, in --expert order.")
@click.option("-P", "--expert-param", "expert_params", multiple=True, metavar="N:NAME=VALUE",
              help="Expert N's own value of a per-expert parameter, e.g. 2:density=0.3 (repeatable).")
@click.option("--tokenizer-source", default=None, metavar="base|union|MODEL",
              help="When vocabularies differ: the output's tokenizer; embedding rows are aligned by token.")
@click.option("--calibration-data", multiple=True, type=click.Path(path_type=Path), metavar="FILE.jsonl",
              help="Data-aware methods (regmean, fisher): texts to collect statistics from ({\"text\": ...} per "
                   "line); once for every expert, or once per expert in --expert order (each its own task's data).")
@click.option("--seed", type=int, default=None, help="Seed for stochastic methods (default 0).")
@click.option("--dtype", default=None, help="Output dtype (default: the base's): float32, bfloat16, float16.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (only once the merge succeeded).")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin/.pt checkpoints (loaded with weights_only=True).")
@click.option("--max-shard-size", default=None, help="Largest output shard, e.g. 5GB (default), 500MB, 2GiB.")
@click.option("--device", default="cpu", show_default=True, help="Where the maths runs: cpu or cuda[:N].")
@click.option("--threads", type=int, default=None, help="Torch threads (default: all cores).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge(method_or_recipe: str, base: str | None, experts: tuple[str, ...], params: tuple[str, ...],
          weights: tuple[float, ...], expert_params: tuple[str, ...], tokenizer_source: str | None,
          calibration_data: tuple[Path, ...], seed: int | None, dtype: str | None, output: Path | None, force: bool,
          allow_pickle: bool, max_shard_size: str | None, device: str, threads: int | None, quiet: bool) -> None:
    """Merge experts with METHOD, or as a RECIPE (.yaml, or a merged model's README.md) says.

    \b
    mergebench merge ties --base base/ -e math/ -e code/ -p density=0.2 -p lambda=0.8 -o merged/
    mergebench merge mergekit-config.yml -o merged/    (a mergekit config, as it is)
    """
    from mergebench.core.engine import run

    recipe = _recipe(method_or_recipe, base, experts, params, weights, expert_params)
    if tokenizer_source is not None:
        recipe.tokenizer_source = tokenizer_source
    if calibration_data:
        files = [str(f) for f in calibration_data]
        recipe.calibration = {**(recipe.calibration or {}), "data": files[0] if len(files) == 1 else files}
    if seed is not None:
        recipe.seed = seed
    if dtype is not None:
        recipe.dtype = dtype
    if max_shard_size is not None:
        recipe.max_shard_size = max_shard_size
    target = output or (Path(recipe.output) if recipe.output else None)
    if target is None:
        raise ParameterError("no output directory: pass -o OUT")
    if quiet:
        result = run(recipe, target, force=force, allow_pickle=allow_pickle, device=device, threads=threads)
    else:
        with _RichProgress(make_progress()) as progress:
            result = run(recipe, target, force=force, allow_pickle=allow_pickle, device=device, threads=threads,
                         progress=progress)
    params_text = ", ".join(f"{k}={v}" for k, v in result.parameters.items()) or "no parameters"
    stdout.print(
        f"Merged {len(recipe.experts)} expert(s) with [bold]{result.method}[/] ({params_text}, seed {result.seed}): "
        f"{result.tensors_merged} tensors merged, {result.tensors_copied} copied, {result.seconds:.2f} s -> {result.output}"
    )


def _recipe(method_or_recipe: str, base: str | None, experts: tuple[str, ...], params: tuple[str, ...],
            weights: tuple[float, ...], expert_params: tuple[str, ...]):
    """The recipe a merge command describes: a recipe file (ours or mergekit's) or METHOD with options."""
    from mergebench.core.recipe import ModelInput, Recipe, load_recipe

    recipe_path = Path(method_or_recipe)
    if recipe_path.suffix.lower() in (".yaml", ".yml", ".md"):
        if base or experts or weights:
            raise ParameterError("give the models either in the recipe or with --base/--expert, not both")
        recipe = load_recipe(recipe_path)
        recipe.parameters.update(_parse_params(params))
    else:
        if weights and len(weights) != len(experts):
            raise ParameterError(f"{len(weights)} --weight value(s) for {len(experts)} --expert(s); give one per expert")
        recipe = Recipe(
            method=method_or_recipe,
            experts=[ModelInput(e, w) for e, w in zip(experts, weights or [1.0] * len(experts))],
            base=ModelInput(base) if base else None,
            parameters=_parse_params(params),
        )
    for item in expert_params:
        index, _, assignment = item.partition(":")
        if not index.strip().isdigit() or not 1 <= int(index) <= len(recipe.experts) or "=" not in assignment:
            raise ParameterError(f"--expert-param '{item}': expected N:NAME=VALUE with N from 1 to {len(recipe.experts)}")
        recipe.experts[int(index) - 1].parameters.update(_parse_params((assignment,)))
    return recipe


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "recipe"]), default="table", show_default=True,
              help="table: the per-tensor plan; json: the same, machine-readable; recipe: the mergebench recipe.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin/.pt checkpoints (their metadata needs loading).")
def convert(config: Path, fmt: str, allow_pickle: bool) -> None:
    """Show what a merge CONFIG (a mergekit config or a recipe) resolves to, per tensor, reading no tensor.

    \b
    mergebench convert mergekit-config.yml              # every tensor: inputs, layer position, parameters
    mergebench convert mergekit-config.yml --format recipe > recipe.yaml
    """
    import dataclasses

    from mergebench.core.engine import describe
    from mergebench.core.recipe import load_recipe

    recipe = load_recipe(config)
    if fmt == "recipe":
        click.echo(recipe.to_yaml(), nl=False)
        return
    rows = describe(recipe, allow_pickle=allow_pickle)
    if fmt == "json":
        click.echo(json.dumps({"method": recipe.method, "tensors": [dataclasses.asdict(r) for r in rows]}, indent=2))
        return
    table = Table(title=f"{recipe.method}: {len(rows)} output tensors")
    for col in ("tensor", "inputs", "t", "parameters", "weights", "per-expert", "dtype"):
        table.add_column(col, overflow="fold")
    for r in rows:
        same = all(i.split(": ", 1)[1] == r.name for i in r.inputs)  # the usual case: the same name in every input
        inputs = ", ".join(i.split(": ", 1)[0] for i in r.inputs) if same else "\n".join(r.inputs)
        table.add_row(r.name, inputs, f"{r.t:.3g}",
                      ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()),
                      ", ".join(f"{w:.4g}" for w in r.weights),
                      "; ".join(", ".join(f"{k}={v}" for k, v in e.items()) for e in r.expert_params if e) or "-",
                      r.dtype)
    stdout.print(table)


def _method_record(m) -> dict[str, Any]:
    return {
        "name": m.name,
        "description": m.description,
        "reference": m.reference,
        "plugin": m.plugin,
        "needs_base": m.needs_base,
        "stochastic": m.stochastic,
        "parameters": [
            {"name": p.name, "type": p.type.__name__, "default": p.default, "range": p.describe_range(),
             "description": p.description, "per_expert": p.per_expert}
            for p in m.params
        ],
        "search_space": {k: list(v) for k, v in m.search_space.items()},
    }


def methods_markdown(records: list[dict[str, Any]]) -> str:
    """The methods table of README.md and docs/methods.md (a test keeps both equal to this)."""
    from mergebench.study.leaderboard import markdown_table

    rows = []
    for r in records:
        params = ", ".join(f"`{p['name']}`{'*' if p['per_expert'] else ''}={p['default']}" for p in r["parameters"]) or "-"
        flags = ", ".join(f for f, on in (("needs a base", r["needs_base"]), ("stochastic", r["stochastic"])) if on)
        what = r["description"] + (f" ({flags})" if flags else "")
        rows.append([f"`{r['name']}`", what, params, r["reference"] or "-"])
    columns = ["method", "what it does", "parameters (default; * per expert)", "reference"]
    return "\n".join(markdown_table(columns, rows)) + "\n"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--markdown", is_flag=True, help="A Markdown table (what README.md and docs/methods.md show).")
def methods(as_json: bool, markdown: bool) -> None:
    """List the registered merge methods with their parameters."""
    records = [_method_record(m) for m in get_plugin_manager().merge_methods()]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if markdown:
        click.echo(methods_markdown(records), nl=False)
        return
    table = Table(title="Merge methods", show_lines=True)
    for col in ("method", "parameters (default, range)", "reference", "plugin"):
        table.add_column(col, overflow="fold")
    for r in records:
        params = "\n".join(f"[bold]{p['name']}[/]={p['default']} {p['range']}: {p['description']}"
                           for p in r["parameters"]) or "-"
        flags = [f for f, on in (("needs base", r["needs_base"]), ("stochastic", r["stochastic"])) if on]
        name = f"[bold]{r['name']}[/]\n{r['description']}" + (f"\n[dim]{', '.join(flags)}[/]" if flags else "")
        table.add_row(name, params, r["reference"], r["plugin"])
    stdout.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List the loaded plugins and the hooks each implements."""
    rows = get_plugin_manager().describe_plugins()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Plugins")
    for col in ("plugin", "source", "hooks"):
        table.add_column(col, overflow="fold")
    for r in rows:
        source = "built in" if r.get("builtin") else f"{r['distribution']} {r['version']}"
        table.add_row(r["name"], source, ", ".join(r["hooks"]))
    stdout.print(table)


@cli.command()
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("mergebench-demo"),
              show_default=True, help="Where the demo's models go.")
@click.option("--steps", type=int, default=30, show_default=True, help="Training steps per expert.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(directory: Path, steps: int, seed: int) -> None:
    """Build a tiny base and two experts, merge them with every method, and compare them (offline)."""
    from mergebench.demo import run_demo

    run_demo(directory, steps=steps, seed=seed, console=stdout)


def main() -> None:
    try:
        cli(prog_name="mergebench")
    except SystemExit as done:  # how click ends every command
        _exit_now(done.code)
        raise
    finally:
        # The process is ending: spare the interpreter's last garbage collection, which walks every object torch
        # made (0.27 s of `python -c "import torch"`'s 1.35 s); atexit handlers and weakref finalizers still run.
        gc.freeze()


def _exit_now(code: int | str | None) -> None:
    """End the process without the interpreter's teardown, which frees every module and object that torch made
    (0.12-0.16 s after a 0.1B merge, measured from the parent; 0.02 s this way). What has to happen at exit still
    does: atexit handlers (weakref finalizers such as temporary directories' included) and flushing stdout and
    stderr. Returns, for the usual exit, while a thread that the interpreter would wait for is still running."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1, as the interpreter does
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code)


from mergebench.cli import study_commands  # noqa: E402,F401  (registers run, init, leaderboard, stages)
from mergebench.cli import plugin_commands  # noqa: E402,F401  (registers plugin check)
