"""Wiring that is easy to lose without a unit test noticing: a plugin's commands reach the real CLI, a
dtype mismatch is refused before any tensor is read, and the evaluation cache's key follows everything
that decides a score (and nothing that does not)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergebench.cli.main import MergebenchGroup, cli
from mergebench.core import engine, tensor_io
from mergebench.core.hookspecs import hookimpl
from mergebench.core.plugin_manager import get_plugin_manager, reset_plugin_manager
from mergebench.core.registry import DatasetSpec, Suite
from mergebench.study import artifacts
from mergebench.study.contracts import ComponentChoice, SuiteData

from conftest import toy_tensors, write_model

# ---- a plugin's command, installed the way pip installs one -----------------------------------------

PLUGIN_SOURCE = '''
import click
from mergebench import hookimpl


@hookimpl
def register_commands(cli):
    @cli.command(name="wiring-hello")
    @click.argument("who")
    @click.pass_context
    def hello(ctx, who):
        """Greet WHO from the wiring plugin."""
        click.echo(f"hello {who} from the wiring plugin (debug={ctx.obj['debug']})")
'''


def install_plugin(root: Path) -> Path:
    """A plugin module and its distribution's metadata with a ``mergebench`` entry point, on a path entry."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "wiring_plugin.py").write_text(PLUGIN_SOURCE)
    dist = root / "wiring_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wiring-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mergebench]\nwiring = wiring_plugin\n")
    return root


def test_plugin_command_is_listed_and_runs_through_the_real_cli(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path / "site")))
    monkeypatch.delitem(sys.modules, "wiring_plugin", raising=False)
    monkeypatch.setenv("MERGEBENCH_LOAD_PLUGINS", "wiring-plugin")
    # the CLI loads plugin commands once per process into the module-level group: start clean, leave clean
    monkeypatch.setattr(MergebenchGroup, "_plugin_commands_loaded", False)
    monkeypatch.setattr(cli, "commands", dict(cli.commands))
    reset_plugin_manager()

    runner = CliRunner()
    shown = runner.invoke(cli, ["--help"])
    assert shown.exit_code == 0, shown.output
    assert "wiring-hello" in shown.output and "Greet WHO from the wiring plugin." in shown.output
    ran = runner.invoke(cli, ["--debug", "wiring-hello", "world"])
    assert ran.exit_code == 0, ran.output
    assert ran.output == "hello world from the wiring plugin (debug=True)\n"  # ctx.obj from the real group
    assert get_plugin_manager().distributions["wiring"] == ("wiring-plugin", "0.1")


def test_plugin_command_in_a_fresh_process(tmp_path):
    site = install_plugin(tmp_path / "site")
    env = {**os.environ, "MERGEBENCH_LOAD_PLUGINS": "wiring-plugin",
           "PYTHONPATH": os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}

    def mergebench(*args):
        return subprocess.run([sys.executable, "-m", "mergebench", *args], capture_output=True, text=True, env=env,
                              timeout=120)

    shown = mergebench("--help")
    assert shown.returncode == 0, shown.stderr
    assert "wiring-hello" in shown.stdout and "Greet WHO from the wiring plugin." in shown.stdout
    ran = mergebench("wiring-hello", "you")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello you from the wiring plugin (debug=False)\n"
    # MERGEBENCH_LOAD_PLUGINS without it: the command is not there
    env["MERGEBENCH_LOAD_PLUGINS"] = ""
    assert "wiring-hello" not in mergebench("--help").stdout


# ---- dtype mismatch: refused from metadata alone ----------------------------------------------------

@pytest.fixture
def reads(monkeypatch):
    """Counts every way the engine can touch tensor bytes: loading a tensor, mapping a file, hashing one."""
    calls: list[str] = []

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(tensor_io.ModelSource, "load", counting("load", tensor_io.ModelSource.load))
    monkeypatch.setattr(tensor_io.ModelSource, "_map", counting("map", tensor_io.ModelSource._map))
    monkeypatch.setattr(engine, "sha256_file", counting("hash", engine.sha256_file))
    return calls


def _mixed_models(tmp_path, int_in: str) -> dict[str, Path]:
    """Base and two experts; ``layer.0.bias`` is int64 in the model named ``int_in``, float32 elsewhere."""
    paths = {}
    for i, role in enumerate(("base", "e1", "e2")):
        tensors = toy_tensors(0 if role == "base" else i, scale=1.0 if role == "base" else 1.01)
        if role == int_in:
            tensors["layer.0.bias"] = (tensors["layer.0.bias"] * 10).to(torch.int64)
        paths[role] = write_model(tmp_path / role, tensors)
    return paths


def _merge_cli(paths, with_base: bool, out: Path):
    args = ["merge", "task_arithmetic" if with_base else "average", "-e", str(paths["e1"]), "-e", str(paths["e2"]),
            "-o", str(out), "-q"]
    if with_base:
        args += ["--base", str(paths["base"])]
    return CliRunner().invoke(cli, args)


# Open bug: a tensor that is int in the template (the base, or expert 1 without one) and float in another
# model is merged silently, the template's ints copied; engine._check_compatible needs `!=`, not `and not`.


@pytest.mark.parametrize("with_base, int_in", [
    (True, "e1"), (True, "e2"), (False, "e2"),
    (True, "base"),
    (False, "e1"),
])
def test_int_vs_float_tensor_is_refused_before_any_tensor_is_read(tmp_path, reads, with_base, int_in):
    paths = _mixed_models(tmp_path, int_in)
    out = tmp_path / "out"
    result = _merge_cli(paths, with_base, out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: tensor 'layer.0.bias' is torch.")
    assert "torch.int64" in lines[0] and "torch.float32" in lines[0]
    assert reads == [] and not out.exists()


def test_the_read_counter_sees_a_real_merge(tmp_path, reads):
    """Control: with matching dtypes the same merge does read tensors, so the check above is not vacuous."""
    paths = _mixed_models(tmp_path, int_in="nobody")
    result = _merge_cli(paths, True, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert {"load", "map", "hash"} <= set(reads)


# ---- the evaluation cache's key ---------------------------------------------------------------------

TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja"]
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors"] + TOKENIZER_FILES
NOT_MODEL_FILES = ["README.md", "mergebench.json", "mergebench-artifact.json", ".complete"]
SPECS = {"mc": DatasetSpec("mc", "multiple_choice", "acc"), "gen": DatasetSpec("gen", "generate_until", "exact_match")}
SCORES = {"mc": 0.25, "gen": 0.5}


def suite_plugin(specs: dict[str, DatasetSpec]):
    class WiringSuite:
        @hookimpl
        def register_suites(self, register):
            register(Suite(name="wiring-suite", description="Two tiny datasets.",
                           held_in={"all": tuple(specs.values())}, build=lambda d, s, p: {}))
    return WiringSuite()


class Setup:
    """A registered tiny suite, its built files, a model directory and an evaluation cache."""

    def __init__(self, pm, root: Path):
        self.pm = pm
        pm.register(suite_plugin(SPECS), name="wiring-suite-plugin")
        data = root / "suite"
        data.mkdir()
        rows = {"mc": {"query": "2 + 2 =", "choices": [" 3", " 4"], "label": 1},
                "gen": {"query": "2 + 2 =", "answer": " 4"}}
        files = {}
        for name, splits in (("mc", ("validation", "test")), ("gen", ("train", "validation", "test"))):
            for split in splits:
                path = data / f"{name}.{split}.jsonl"
                path.write_text(json.dumps(rows[name]) + "\n")
                files.setdefault(name, {})[split] = str(path)
        self.data = SuiteData(suite="wiring-suite", directory=data, files=files)
        self.model = write_model(root / "model", toy_tensors(0))
        for name in MODEL_FILES[1:]:
            if name != "model.safetensors":
                (self.model / name).write_text(f"{name} v1\n")
        (self.model / "README.md").write_text("a card\n")
        self.cache = artifacts.ArtifactCache(root / "cache")
        self.evaluator, self.split = ComponentChoice("lm-eval", {"batch_size": 8}), "test"

    def store(self):
        artifacts.store_scores(self.pm, self.cache, self.model, self.data, SCORES, self.evaluator, self.split)

    def cached(self, datasets=("mc", "gen"), model=None):
        return artifacts.cached_scores(self.pm, self.cache, model or self.model, self.data, list(datasets),
                                       self.evaluator, self.split)

    def specs(self, datasets=("mc", "gen")):
        return artifacts._evaluation_specs(self.pm, self.model, self.data, list(datasets), self.evaluator, self.split)


@pytest.fixture
def setup(pm, tmp_path):
    s = Setup(pm, tmp_path)
    s.store()
    assert s.cached() == SCORES
    return s


def _change(path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file, save_file

        tensors = load_file(path)
        tensors["layer.0.bias"] = tensors["layer.0.bias"] + 1
        save_file(tensors, path)
    else:
        path.write_text(path.read_text() + "changed\n")


@pytest.mark.parametrize("name", MODEL_FILES)
def test_key_changes_with_every_model_and_tokenizer_file(setup, name):
    before = setup.specs()
    _change(setup.model / name)
    assert setup.cached() is None
    assert all(setup.specs()[d]["model"] != before[d]["model"] for d in SPECS)


@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_key_changes_when_a_tokenizer_file_appears_or_goes(setup, name):
    (setup.model / name).unlink()
    assert setup.cached() is None
    (setup.model / name).write_text(f"{name} v1\n")
    assert setup.cached() == SCORES  # the same contents again: the same key


@pytest.mark.parametrize("name", NOT_MODEL_FILES)
def test_key_ignores_the_card_records_and_markers(setup, name):
    path = setup.model / name
    path.write_text(path.read_text() + "edited\n" if path.exists() else "new\n")
    assert setup.cached() == SCORES


def test_key_ignores_where_the_model_lives(setup, tmp_path):
    import shutil

    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(setup.model, copy)
    assert setup.cached(model=copy) == SCORES


@pytest.mark.parametrize("module", ["lm_eval_adapter.py", "lm_eval_task_utils.py"])
def test_key_changes_with_the_evaluators_code(setup, monkeypatch, tmp_path, module):
    """The evaluator's module and the task configs' scoring functions, each edited (as a copy read in its place)."""
    from mergebench.evaluators import lm_eval_adapter

    real = Path(lm_eval_adapter.__file__).with_name(module)
    copy = tmp_path / module
    copy.write_text(real.read_text() + "\n# an edit\n")
    getsourcefile = inspect.getsourcefile

    def edited(obj):
        path = getsourcefile(obj)
        return str(copy) if path is not None and Path(path).resolve() == real.resolve() else path

    with monkeypatch.context() as m:
        m.setattr(inspect, "getsourcefile", edited)  # how the code hash finds a component's source
        if getattr(lm_eval_adapter, "_UTILS", None) == real:  # how the scoring functions are hashed
            m.setattr(lm_eval_adapter, "_UTILS", copy)
        assert setup.cached() is None
    assert setup.cached() == SCORES


def test_key_changes_with_lm_evals_version(setup, monkeypatch):
    import lm_eval

    monkeypatch.setattr(lm_eval, "__version__", lm_eval.__version__ + ".post1")
    assert setup.cached() is None


def test_key_changes_with_the_evaluators_parameters_and_split(setup):
    setup.evaluator = ComponentChoice("lm-eval", {"batch_size": 4})
    assert setup.cached() is None
    setup.evaluator, setup.split = ComponentChoice("lm-eval", {"batch_size": 8}), "validation"
    assert setup.cached() is None


@pytest.mark.parametrize("dataset, new", [
    ("gen", DatasetSpec("gen", "generate_until", "rouge_l")),  # another metric
    ("mc", DatasetSpec("mc", "generate_until", "exact_match")),  # another output type
])
def test_key_changes_with_the_datasets_spec_in_its_suite(setup, dataset, new):
    setup.pm.unregister(name="wiring-suite-plugin")
    setup.pm.register(suite_plugin({**SPECS, dataset: new}), name="wiring-suite-plugin")
    assert setup.pm.suites().get("wiring-suite").datasets()[dataset] == new
    other = next(d for d in SPECS if d != dataset)
    assert setup.cached([dataset]) is None
    assert setup.cached([other]) == {other: SCORES[other]}  # one entry per dataset: the other still hits
    assert setup.specs()[dataset]["spec"] == dataclasses.asdict(new)


@pytest.mark.parametrize("dataset, split", [("gen", "test"), ("gen", "train"), ("mc", "validation")])
def test_key_changes_with_any_split_of_the_dataset(setup, dataset, split):
    """The scored split, and the others the evaluator reads too (the generation budget comes from the
    longest answer of any split)."""
    path = Path(setup.data.files[dataset][split])
    row = json.loads(path.read_text())
    row["query"] += " ?"
    path.write_text(json.dumps(row) + "\n")
    other = next(d for d in SPECS if d != dataset)
    assert setup.cached([dataset]) is None
    assert setup.cached([other]) == {other: SCORES[other]}


def test_a_dataset_without_a_spec_in_the_suite_is_not_cached(setup):
    setup.data.files["stray"] = {"test": setup.data.files["mc"]["test"]}
    specs = setup.specs(["mc", "stray"])
    assert specs["stray"] is None and specs["mc"] is not None
    assert setup.cached(["mc", "stray"]) is None


# ---- artefact cache keys follow the code that builds an artefact ----------------------------------------

def test_a_changed_preparer_source_builds_a_new_base(tmp_path, monkeypatch):
    """Editing a preparer's source (no version bump) must not return the base the old code built."""
    import importlib
    import sys

    from mergebench.core.plugin_manager import make_plugin_manager
    from mergebench.study import artifacts
    from mergebench.study.cache import ArtifactCache
    from mergebench.study.contracts import ComponentChoice

    module = tmp_path / "editable_preparer.py"
    source = '''
import json
from pathlib import Path
from mergebench import hookimpl
from mergebench.study.components import BasePreparer

def prepare(params, workdir, inputs):
    (Path(workdir) / "config.json").write_text(json.dumps({"value": VALUE}))
    return workdir

@hookimpl
def register_base_preparers(register):
    register(BasePreparer(name="editable", description="x", prepare=prepare))
'''
    module.write_text(source.replace("VALUE", "1"))
    monkeypatch.syspath_prepend(str(tmp_path))
    cache = ArtifactCache(tmp_path / "cache")

    def build() -> Path:
        sys.modules.pop("editable_preparer", None)
        pm = make_plugin_manager(entry_points=False)
        pm.register(importlib.import_module("editable_preparer"), name="editable")
        return artifacts.prepare_base(pm, cache, None, ComponentChoice("editable", {}), seed=0)

    first = build()
    assert build() == first  # unchanged code: the cached entry
    module.write_text(source.replace("VALUE", "2"))
    second = build()
    assert second != first and json.loads((second / "config.json").read_text()) == {"value": 2}
