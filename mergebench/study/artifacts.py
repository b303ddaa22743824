"""Cached builds of the study's artefacts: suite data, bases, instruction-tuned bases, experts, multitask.

Each lives in the content-addressed :class:`~mergebench.study.cache.ArtifactCache` under a key made of
everything that determines it: the plugin that builds it and its version, its parameters, its seed
and the keys of its inputs (an expert's key contains its base's key, which contains the suite's).
The same functions serve ``mergebench run`` (in worker processes) and the stage commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from mergebench.study.cache import ArtifactCache
from mergebench.core.errors import InputError
from mergebench.core.plugin_manager import PluginManager
from mergebench.core.registry import Component
from mergebench.study.contracts import ComponentChoice, OnStep, PrepareInputs, SuiteData



def plugin_version(pm: PluginManager, component: Component) -> str:
    """The version of the distribution that registered ``component`` (mergebench's for built-ins)."""
    import mergebench

    return pm.distributions.get(component.plugin, ("mergebench", mergebench.__version__))[1]


def code_hash(*functions: Callable) -> str:
    """A hash of the source files that define ``functions`` (and of the shared training loop): a changed
    generator or trainer gets new cache entries even when nobody bumped a version number. A function with no
    source file (defined in a notebook or by ``exec``) contributes its compiled code."""
    import hashlib
    import inspect
    import marshal

    from mergebench import training
    from mergebench.suites import world

    digest = hashlib.sha256()
    files = {inspect.getsourcefile(training), inspect.getsourcefile(world)}
    for f in functions:
        if f is None:
            continue
        source = inspect.getsourcefile(f) if callable(f) else None
        if source is not None and Path(source).is_file():
            files.add(source)
        elif hasattr(f, "__code__"):
            digest.update(marshal.dumps(f.__code__))
    for f in sorted(files):
        digest.update(Path(f).read_bytes())
    return digest.hexdigest()[:16]


def _ident(pm: PluginManager, component: Component, *also: Callable) -> dict[str, str]:
    """Plugin, name, version and a hash of the source of the component's work (and of ``also``)."""
    fn = (getattr(component, "build", None) or getattr(component, "prepare", None) or getattr(component, "train", None)
          or getattr(component, "evaluate", None))
    return {"plugin": component.plugin, "name": component.name, "version": plugin_version(pm, component),
            "code": code_hash(fn, *also)}


def suite(pm: PluginManager, cache: ArtifactCache, name: str, seed: int, params: dict[str, Any]) -> SuiteData:
    """The generated suite ``name`` for ``seed`` (built once)."""
    component = pm.suites().get(name)
    if component.build is None:
        raise InputError(f"suite '{name}' is evaluated from its own task configs; it has nothing to build")
    params = component.resolve_params(params)
    spec = {**_ident(pm, component), "suite_version": component.version, "seed": seed, "params": params}

    def build(tmp: Path) -> None:
        built = SuiteData.coerce(component.build(tmp, seed, params), tmp, name, seed)
        SuiteData(name, tmp, built.files, built.tokenizer, seed, built.version or component.version).write()
    return SuiteData.load(cache.get_or_build("suite", spec, build))


def seeded(component: Component, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """``params`` resolved, with the replicate ``seed`` added to the component's own ``seed`` parameter (if any):
    each seed of a study is a full replicate with its own initialisation and batch order."""
    params = component.resolve_params(params)
    if "seed" in params:
        params["seed"] = params["seed"] + seed
    return params


def prepare_base(pm: PluginManager, cache: ArtifactCache, data: SuiteData | None, choice: ComponentChoice,
                 seed: int, source: Path | None = None, device: str = "cpu", on_step: OnStep | None = None) -> Path:
    """The base made by ``choice``'s preparer for replicate ``seed`` (from ``source`` when it starts from another
    base), built once. A preparer that does not build (``cached=False``, e.g. ``load``) is called each time."""
    preparer = pm.base_preparers().get(choice.name)
    params = seeded(preparer, dict(choice.params), seed)
    inputs = PrepareInputs(data=data, source=source, device=device, on_step=on_step)
    if not preparer.cached:
        return Path(preparer.prepare(params, None, inputs))
    spec = {**_ident(pm, preparer), "suite": None if data is None else Path(data.directory).name,
            "source": None if source is None else Path(source).name, "params": params}
    kind = "base" if source is None else "derived_base"
    return cache.get_or_build(kind, spec, lambda tmp: preparer.prepare(params, tmp, inputs))


def expert(pm: PluginManager, cache: ArtifactCache, data: SuiteData, base_dir: Path, categories: list[str],
           trainer: ComponentChoice, seed: int = 0, device: str = "cpu", on_step: OnStep | None = None) -> Path:
    """``base_dir`` fine-tuned by ``trainer`` on the training data of ``categories`` (built once)."""
    component = pm.expert_trainers().get(trainer.name)
    params = seeded(component, dict(trainer.params), seed)
    suite_component = pm.suites().get(data.suite)
    files = data.train_files([d.name for c in sorted(categories) for d in suite_component.held_in[c]],
                             f"expert trainer '{trainer.name}'")
    spec = {**_ident(pm, component), "base": base_dir.name, "suite": Path(data.directory).name,
            "categories": sorted(categories), "params": params}
    return cache.get_or_build("expert", spec, lambda tmp: component.train(
        base_dir, files, params, tmp, on_step=on_step, device=device))


# ---- evaluations ------------------------------------------------------------------------------------

# Files of a model directory that do not decide its scores: the model card and merge record mergebench
# writes beside a merge, the artefact cache's manifest, and a trainer's saved training state. Every
# other file at the top level (weights, config, generation config and whatever a tokenizer may load:
# tokenizer.json/.model, vocab.*, merges.txt, added_tokens.json, chat templates, ...) is hashed.
_NOT_MODEL_FILES = {"README.md", "mergebench.json", "mergebench-artifact.json", "trainer_state.json",
                    "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}


def model_identity(model_dir: Path) -> str:
    """A hash of the contents of every file that may decide a model's outputs (hashes are cached by file).

    Not a list of known names: any tokenizer or config file, whatever its name, is part of the model; only
    files known not to matter (:data:`_NOT_MODEL_FILES`, hidden markers) are left out.
    """
    from mergebench.core.hashing import combined_sha256, sha256_file

    files = [p for p in Path(model_dir).iterdir() if p.is_file() and not p.name.startswith(".")
             and p.name not in _NOT_MODEL_FILES and not p.name.startswith("rng_state")]
    return combined_sha256({p.name: sha256_file(p) for p in files})


def _evaluation_specs(pm: PluginManager, model_dir: Path, data: SuiteData, datasets, evaluator: ComponentChoice,
                      split: str) -> dict:
    """dataset -> the cache spec of the model's score on it (None for a dataset that cannot be keyed: no
    local split file, or no suite spec to say how it is scored)."""
    import dataclasses

    from mergebench.core.hashing import sha256_file
    from mergebench.study.weights import load_state_dict

    suite_specs = pm.suites().get(data.suite).datasets() if data.suite in pm.suites() else {}
    component = pm.evaluators().get(evaluator.name)
    # what else decides its scores (lm-eval: its version and the task configs' scoring functions)
    extra = component.identity() if component.identity is not None else {}
    params = component.resolve_params({**evaluator.params, "split": split})
    # load_state_dict: what reads the weights a session scores
    shared = {**_ident(pm, component, component.session, load_state_dict), "identity": extra, "params": params,
              "model": model_identity(model_dir)}
    specs = {}
    for dataset in datasets:
        splits = data.files.get(dataset, {})
        spec = suite_specs.get(dataset)
        if splits.get(split) is None or spec is None:
            specs[dataset] = None
            continue
        # the dataset's task format and metric, and every split's contents: the evaluator may derive task
        # settings from other splits (the generation budget from the longest answer in any split)
        # "record": entries hold the score and, when the evaluator gives them, its per-example values; entries
        # from before per-example values were kept have another key, so they are evaluated again once
        specs[dataset] = {**shared, "dataset": dataset, "spec": dataclasses.asdict(spec), "record": "score+examples",
                          "data": {s: sha256_file(Path(path)) for s, path in sorted(splits.items())}}
    return specs


def cached_results(pm: PluginManager, cache: ArtifactCache, model_dir: Path, data: SuiteData | None,
                   datasets: list[str], evaluator: ComponentChoice, split: str):
    """The model's (scores, per-example values) on ``datasets`` if every one was computed before, else None.

    Keyed by the contents of the model's files (all but its card and records), the dataset's spec in
    its suite (task format, metric) and split files' contents, the evaluator (plugin, version, source,
    parameters, and what its ``identity()`` adds: lm-eval's version), so a copied or re-trained identical
    model hits, and a changed one misses. Suites evaluated from hub task configs (no local files) are not
    cached. Per-example values: dataset -> array, for the datasets whose evaluation gave them.
    """
    from mergebench.study import per_example

    if data is None:
        return None
    scores, examples = {}, {}
    for dataset, spec in _evaluation_specs(pm, model_dir, data, datasets, evaluator, split).items():
        entry = cache.get("evaluation", spec) if spec else None
        if entry is None:
            return None
        scores[dataset] = json.loads((entry / "score.json").read_text())["score"]
        values = per_example.read_file(entry)
        if values is not None:
            examples[dataset] = values
    return scores, examples


def cached_scores(pm: PluginManager, cache: ArtifactCache, model_dir: Path, data: SuiteData | None,
                  datasets: list[str], evaluator: ComponentChoice, split: str) -> dict[str, float] | None:
    """The model's scores on ``datasets`` if every one was computed before, else None (see :func:`cached_results`)."""
    found = cached_results(pm, cache, model_dir, data, datasets, evaluator, split)
    return None if found is None else found[0]


def store_scores(pm: PluginManager, cache: ArtifactCache, model_dir: Path, data: SuiteData | None,
                 scores: dict[str, float], evaluator: ComponentChoice, split: str,
                 examples: dict | None = None) -> None:
    """Record each dataset's score (and its per-example values, when given) as its own cache entry, written
    atomically like every artefact."""
    from mergebench.study import per_example

    if data is None:
        return

    def write(tmp: Path, dataset: str) -> None:
        (tmp / "score.json").write_text(json.dumps({"score": scores[dataset], "model_dir": str(model_dir)}))
        if examples and dataset in examples:
            per_example.write_file(tmp, examples[dataset])

    for dataset, spec in _evaluation_specs(pm, model_dir, data, scores, evaluator, split).items():
        if spec is not None:
            cache.get_or_build("evaluation", spec, lambda tmp, d=dataset: write(tmp, d))
