"""The study's Python API: what `mergebench run`, `prepare-base`, `train-expert` and `eval` do, as functions.

    from mergebench.study import api
    db = api.run("my-study.yaml", "runs/my-study")
    base = api.prepare_base("load", {"model": "Qwen/Qwen2.5-0.5B"})
    expert = api.train_expert(base, ["sentiment"], trainer="hf_trainer", params={"steps": 100})
    scores = api.evaluate([base, expert], split="validation")
    paired = api.compare("runs/my-study", "ties", "average")   # `mergebench compare`'s result, as a dict

Each goes through the same library functions the runner uses (the artefact cache, the jobs), so a model
built or scored here is the one a run would build or find cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from mergebench.core.plugin_manager import PluginManager, get_plugin_manager
from mergebench.study import artifacts, jobs
from mergebench.study.cache import ArtifactCache
from mergebench.study.contracts import ComponentChoice, ModelRole, SuiteData


def _config(config: str | Path | Mapping[str, Any] | None, pm: PluginManager):
    from mergebench.study import config as run_config

    if config is None or isinstance(config, (str, Path)):
        return run_config.load(None if config is None else Path(config), pm)
    return run_config.parse(dict(config), pm, "config")


def run(config: str | Path | Mapping[str, Any] | None = None, run_dir: str | Path = "mergebench-run", *,
        plugin_manager: PluginManager | None = None, cache: ArtifactCache | None = None, reporter=None):
    """Run (or resume) a study; returns its ResultsDB. ``config``: a YAML path, a mapping, or None (the default)."""
    from mergebench.study.runner import Runner

    pm = plugin_manager or get_plugin_manager()
    return Runner(_config(config, pm), Path(run_dir), pm, cache or ArtifactCache(), reporter).run()


def plan(config: str | Path | Mapping[str, Any] | None = None, gpu_memory_gib: float = 80.0, *,
         plugin_manager: PluginManager | None = None):
    """What a run of ``config`` would do, offline (see :mod:`mergebench.study.plan`)."""
    from mergebench.study.plan import make_plan

    pm = plugin_manager or get_plugin_manager()
    return make_plan(_config(config, pm), pm, gpu_memory_gib)


def compare(run_dir: str | Path, a: str, b: str, *, sizes: Sequence[str] = (), base_kinds: Sequence[str] = (),
            ns: Sequence[int] = (), n_boot: int = 2000, n_perm: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """The paired difference ``a - b`` between two methods (or a method and a baseline) of a run, per (size, base
    kind, N): what ``mergebench compare --format json`` prints (see :mod:`mergebench.study.compare`)."""
    from mergebench.study.compare import compare as paired
    from mergebench.study.runner import open_db

    db = open_db(Path(run_dir))
    try:
        return paired(db, a, b, tuple(sizes), tuple(base_kinds), tuple(ns), n_boot, n_perm, seed)
    finally:
        db.close()


def suite_data(suite: str = "micro-t0", seed: int = 0, params: Mapping[str, Any] | None = None, *,
               plugin_manager: PluginManager | None = None, cache: ArtifactCache | None = None) -> SuiteData | None:
    """A suite's built data (built once, cached); None for a suite with nothing to build."""
    pm = plugin_manager or get_plugin_manager()
    if pm.suites().get(suite).build is None:
        return None
    return artifacts.suite(pm, cache or ArtifactCache(), suite, seed, dict(params or {}))


def prepare_base(preparer: str = "pretrain", params: Mapping[str, Any] | None = None, *, suite: str = "micro-t0",
                 suite_params: Mapping[str, Any] | None = None, seed: int = 0, source: str | Path | None = None,
                 device: str = "cpu", on_step=None, plugin_manager: PluginManager | None = None,
                 cache: ArtifactCache | None = None) -> Path:
    """A base from any registered preparer (built once and cached, or pointed at, for ``load``)."""
    pm, cache = plugin_manager or get_plugin_manager(), cache or ArtifactCache()
    component = pm.base_preparers().get(preparer)
    component.resolve_params(dict(params or {}))  # unknown or bad parameters fail before any work
    data = suite_data(suite, seed, suite_params, plugin_manager=pm, cache=cache) if component.cached else None
    return artifacts.prepare_base(pm, cache, data, ComponentChoice(preparer, dict(params or {})), 0,
                                  source=None if source is None else Path(source).resolve(), device=device,
                                  on_step=on_step)


def train_expert(base: str | Path, categories: Sequence[str], *, trainer: str = "full_finetune",
                 params: Mapping[str, Any] | None = None, suite: str = "micro-t0",
                 suite_params: Mapping[str, Any] | None = None, seed: int = 0, device: str = "cpu", on_step=None,
                 plugin_manager: PluginManager | None = None, cache: ArtifactCache | None = None) -> Path:
    """``base`` fine-tuned by ``trainer`` on a suite's ``categories`` (built once and cached)."""
    pm, cache = plugin_manager or get_plugin_manager(), cache or ArtifactCache()
    component = pm.expert_trainers().get(trainer)
    component.resolve_params(dict(params or {}))
    data = suite_data(suite, seed, suite_params, plugin_manager=pm, cache=cache)
    return artifacts.expert(pm, cache, data, Path(base).resolve(), list(categories),
                            ComponentChoice(trainer, dict(params or {})), device=device, on_step=on_step)


def evaluate(models: Sequence[str | Path], *, suite: str = "micro-t0", datasets: Sequence[str] | None = None,
             split: str = "test", evaluator: str = "lm-eval", params: Mapping[str, Any] | None = None,
             suite_params: Mapping[str, Any] | None = None, seed: int = 0, use_cache: bool = True,
             plugin_manager: PluginManager | None = None, cache: ArtifactCache | None = None,
             on_model=None) -> dict[str, tuple[dict[str, float], bool]]:
    """Raw scores per model (dataset -> score) and whether they came from the evaluation cache.

    One evaluation session per process serves every model of an architecture, as in a run's workers.
    ``on_model(path)`` is called before each model (progress)."""
    pm, cache = plugin_manager or get_plugin_manager(), cache or ArtifactCache()
    component = pm.evaluators().get(evaluator)
    resolved = component.resolve_params({**dict(params or {}), "split": split})
    choice = ComponentChoice(evaluator, {k: v for k, v in resolved.items() if k != "split"})
    data = suite_data(suite, seed, suite_params, plugin_manager=pm, cache=cache)
    chosen = tuple(datasets or pm.suites().get(suite).datasets())
    out: dict[str, tuple[dict[str, float], bool]] = {}
    for m in models:
        if on_model:
            on_model(m)
        job = jobs.EvalJob(str(cache.root), Path(m), suite, data, chosen, choice, split,
                           ModelRole("base", seed, "-", "-"), use_cache=use_cache)
        result = job.run()
        out[str(m)] = (result.scores, result.cached)
    return out
