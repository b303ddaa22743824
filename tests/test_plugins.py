"""The plugin system: hookspecs, registries, entry points, duplicates, and the plugin-facing commands."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import mergebench
from mergebench import MergeMethod, Param, hookimpl
from mergebench.cli.main import cli
from mergebench.core import hookspecs
from mergebench.core.errors import ParameterError, PluginError
from mergebench.core.plugin_manager import make_plugin_manager
from mergebench.study.components import BasePreparer, Evaluator, ExpertTrainer
from mergebench.core.tensor_io import open_local

from conftest import load_dir


def _median(base, experts, params, ctx):
    return torch.stack(experts).median(dim=0).values


class MedianPlugin:
    __name__ = "median_plugin"

    @hookimpl
    def register_merge_methods(self, register):
        register(MergeMethod(name="median", description="Element-wise median.", reference="test", merge=_median,
                             needs_base=False))


def test_builtin_methods_declare_everything(pm):
    methods = {m.name: m for m in pm.merge_methods()}
    mergekit = {"linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "arcee_fusion",
                "passthrough", "ram", "ramplus_tl", "sce", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}  # mergekit 0.1.5's 20 methods
    assert mergekit | {"average"} <= set(methods)
    for m in methods.values():
        assert m.description and m.reference and m.plugin.startswith("mergebench.plugins.")
        for p in m.params:
            assert p.description and p.type in (float, int, str, bool)
            assert p.coerce(p.default, m.name) == p.default  # defaults are valid values
    assert methods["dare_ties"].stochastic and not methods["ties"].stochastic
    assert not methods["average"].needs_base and methods["ties"].needs_base
    assert methods["ties"].search_space["density"] == (0.1, 0.2)
    assert methods["ties"].search_space["lambda"] == tuple(round(0.1 * i, 1) for i in range(11))


def test_temporary_plugin_registers_merges_and_unregisters(pm, toy_models, tmp_path):
    plugin = MedianPlugin()
    pm.register(plugin, name="median_plugin")
    assert "median" in pm.merge_methods() and pm.merge_methods().get("median").plugin == "median_plugin"
    experts = [toy_models[f"e{i}"] for i in range(3)]
    mergebench.merge("median", experts=experts, output=tmp_path / "out", plugin_manager=pm)
    loaded = [load_dir(e) for e in experts]
    want = torch.stack([t["layer.0.weight"] for t in loaded]).median(dim=0).values
    assert torch.equal(load_dir(tmp_path / "out")["layer.0.weight"], want)
    pm.unregister(plugin)
    assert "median" not in pm.merge_methods()
    with pytest.raises(ParameterError, match="unknown merge method 'median'"):
        mergebench.merge("median", experts=experts, output=tmp_path / "out2", plugin_manager=pm)


def test_two_plugins_with_one_method_name_is_an_error_naming_both(pm):
    class Other:
        @hookimpl
        def register_merge_methods(self, register):
            register(MergeMethod(name="ties", description="clash", merge=_median))

    pm.register(Other(), name="acme_ties")
    with pytest.raises(PluginError) as err:
        pm.merge_methods()
    assert "mergebench.plugins.task_vectors" in str(err.value) and "acme_ties" in str(err.value)


def test_other_component_registries(pm):
    class Components:
        @hookimpl
        def register_base_preparers(self, register):
            register(BasePreparer(name="scratch", description="Random init.", prepare=lambda **k: None,
                                  params=(Param("width", int, 64, "hidden size", min=8),)))

        @hookimpl
        def register_expert_trainers(self, register):
            register(ExpertTrainer(name="sgd", description="Plain SGD.", train=lambda **k: None))

        @hookimpl
        def register_evaluators(self, register):
            register(Evaluator(name="perplexity", description="Perplexity.", evaluate=lambda **k: None))

    pm.register(Components(), name="components")
    assert pm.base_preparers().get("scratch").resolve_params({"width": "128"}) == {"width": 128}
    with pytest.raises(ParameterError, match=">= 8"):
        pm.base_preparers().get("scratch").resolve_params({"width": 4})
    assert pm.expert_trainers().names() == ["full_finetune", "hf_trainer", "multitask", "sgd"]
    assert pm.expert_trainers().get("sgd").plugin == "components"
    assert pm.evaluators().get("perplexity").plugin == "components"

    class Wrong:
        @hookimpl
        def register_evaluators(self, register):
            register(ExpertTrainer(name="oops", description="wrong kind", train=None))

    pm.register(Wrong(), name="wrong")
    with pytest.raises(PluginError, match="expected a Evaluator"):
        pm.evaluators()


def test_register_commands_adds_a_subcommand(pm):
    class Commands:
        @hookimpl
        def register_commands(self, cli):
            @cli.command(name="hello")
            def hello():
                click.echo("hello from a plugin")

    group = click.Group()
    pm.register(Commands(), name="commands")
    pm.hook.register_commands(cli=group)
    assert CliRunner().invoke(group, ["hello"]).output == "hello from a plugin\n"


def test_resolve_model_firstresult_lets_a_plugin_add_a_scheme(pm, toy_models, tmp_path):
    class Scheme:
        @hookimpl
        def resolve_model(self, reference, allow_pickle):
            if reference.startswith("toy://"):
                return open_local(reference, toy_models[reference.removeprefix("toy://")], allow_pickle)
            return None

    pm.register(Scheme(), name="scheme")
    result = mergebench.merge("average", experts=["toy://e0", toy_models["e1"]], output=tmp_path / "o",
                              plugin_manager=pm)
    assert result.inputs[0]["reference"] == "toy://e0"


HOOK_TESTS = {
    "register_merge_methods": test_temporary_plugin_registers_merges_and_unregisters,
    "register_base_preparers": test_other_component_registries,
    "register_expert_trainers": test_other_component_registries,
    "register_evaluators": test_other_component_registries,
    "register_commands": test_register_commands_adds_a_subcommand,
    "resolve_model": test_resolve_model_firstresult_lets_a_plugin_add_a_scheme,
    "register_suites": "tests/test_stages.py::test_a_plugin_registers_a_suite_and_it_builds_through_the_cache",
    "register_executors": "tests/test_ray.py (ray) and tests/test_plugin_docs.py (a plugin's executor)",
}


def test_every_hookspec_is_documented_typed_and_exercised():
    specs = {n: f for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "mergebench_spec")}
    assert set(specs) == set(HOOK_TESTS), "each hookspec needs a test in HOOK_TESTS"
    for name, spec in specs.items():
        doc = inspect.getdoc(spec)
        assert doc and len(doc.splitlines()) == 1, name
        assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(spec).parameters.values())
    assert specs["resolve_model"].mergebench_spec["firstresult"] is True


# ---- entry points: a real distribution's metadata on sys.path ------------------------------------

def make_distribution(root: Path, dist: str, module: str, entry_name: str, body: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[mergebench]\n{entry_name} = {module}\n")


PLUGIN_BODY = """
from mergebench import MergeMethod, hookimpl

def first(base, experts, params, ctx):
    return experts[0]

@hookimpl
def register_merge_methods(register):
    register(MergeMethod(name="{name}", description="First expert.", merge=first, needs_base=False))
"""


@pytest.fixture
def installed(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_entry_point_plugins_load_and_can_be_restricted(installed, monkeypatch):
    make_distribution(installed, "mb-first", "mb_first", "first", PLUGIN_BODY.format(name="first"))
    make_distribution(installed, "mb-second", "mb_second", "second", PLUGIN_BODY.format(name="second"))
    monkeypatch.delenv("MERGEBENCH_LOAD_PLUGINS")
    pm = make_plugin_manager()
    assert {"first", "second"} <= set(pm.merge_methods().names())
    assert pm.distributions["first"] == ("mb-first", "1.2.3")
    monkeypatch.setenv("MERGEBENCH_LOAD_PLUGINS", "mb-second")
    assert "first" not in make_plugin_manager().merge_methods()
    monkeypatch.setenv("MERGEBENCH_LOAD_PLUGINS", "")
    only_builtin = make_plugin_manager().merge_methods().names()
    assert only_builtin == make_plugin_manager(entry_points=False).merge_methods().names()
    assert {"average", "dare_ties", "task_arithmetic", "ties", "slerp"} <= set(only_builtin)


def test_duplicate_entry_point_names_are_an_error_not_skipped(installed, monkeypatch):
    make_distribution(installed, "mb-one", "mb_one", "clash", PLUGIN_BODY.format(name="one"))
    make_distribution(installed, "mb-two", "mb_two", "clash", PLUGIN_BODY.format(name="two"))
    monkeypatch.delenv("MERGEBENCH_LOAD_PLUGINS")
    with pytest.raises(PluginError) as err:
        make_plugin_manager()
    assert "mb-one" in str(err.value) and "mb-two" in str(err.value)


def test_a_broken_plugin_gives_one_line_in_the_cli(installed, monkeypatch):
    make_distribution(installed, "mb-broken", "mb_broken", "broken", "raise ImportError('needs libfoo')\n")
    monkeypatch.setenv("MERGEBENCH_LOAD_PLUGINS", "mb-broken")
    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 2 and "plugin 'broken' from mb-broken failed to load: needs libfoo" in result.output


def test_plugins_and_methods_commands(installed, monkeypatch):
    make_distribution(installed, "mb-first", "mb_first", "first", PLUGIN_BODY.format(name="first"))
    monkeypatch.setenv("MERGEBENCH_LOAD_PLUGINS", "first")
    rows = json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).output)
    by_name = {r["name"]: r for r in rows}
    assert by_name["first"] == {"name": "first", "hooks": ["register_merge_methods"], "distribution": "mb-first",
                                "version": "1.2.3"}
    assert by_name["mergebench.plugins.task_vectors"]["builtin"] is True
    assert by_name["mergebench.core.sources"]["hooks"] == ["resolve_model"]
    methods = json.loads(CliRunner().invoke(cli, ["methods", "--json"]).output)
    ties = next(m for m in methods if m["name"] == "ties")
    assert [p["name"] for p in ties["parameters"]][:3] == ["density", "lambda", "trim_scope"]
    assert {"normalize", "rescale", "rounding", "zero_sum_sign"} <= {p["name"] for p in ties["parameters"]}
    assert ties["parameters"][0] == {"name": "density", "type": "float", "default": 0.2, "range": "[0.0, 1.0]",
                                     "description": "fraction of each task vector's entries kept", "per_expert": True}
    table = CliRunner().invoke(cli, ["methods"]).output
    assert "first" in table and "arXiv:2306.01708" in table
