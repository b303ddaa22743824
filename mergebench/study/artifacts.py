"""Cached builds of the study's artefacts: suite data, bases, instruction-tuned bases, experts, multitask.

Each lives in the content-addressed :class:`~mergebench.core.cache.ArtifactCache` under a key made of
everything that determines it: the plugin that builds it and its version, its parameters, its seed
and the keys of its inputs (an expert's key contains its base's key, which contains the suite's).
The same functions serve ``mergebench run`` (in worker processes) and the stage commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from mergebench.core.cache import ArtifactCache
from mergebench.core.errors import InputError
from mergebench.core.plugin_manager import PluginManager
from mergebench.core.registry import Component

OnStep = Callable[[int, int, float], None]


def plugin_version(pm: PluginManager, component: Component) -> str:
    """The version of the distribution that registered ``component`` (mergebench's for built-ins)."""
    import mergebench

    return pm.distributions.get(component.plugin, ("mergebench", mergebench.__version__))[1]


def code_hash(*functions: Callable) -> str:
    """A hash of the source files that define ``functions`` (and of the shared training loop): a changed
    generator or trainer gets new cache entries even when nobody bumped a version number."""
    import hashlib
    import inspect

    from mergebench import training
    from mergebench.suites import world

    shared = {inspect.getsourcefile(training), inspect.getsourcefile(world)}
    files = sorted({inspect.getsourcefile(f) for f in functions if f is not None} | shared)
    digest = hashlib.sha256()
    for f in files:
        digest.update(Path(f).read_bytes())
    return digest.hexdigest()[:16]


def _ident(pm: PluginManager, component: Component, *also: Callable) -> dict[str, str]:
    """Plugin, name, version and a hash of the source of the component's work (and of ``also``)."""
    fn = (getattr(component, "build", None) or getattr(component, "prepare", None) or getattr(component, "train", None)
          or getattr(component, "evaluate", None))
    return {"plugin": component.plugin, "name": component.name, "version": plugin_version(pm, component),
            "code": code_hash(fn, *also)}


def load_manifest(directory: Path) -> dict:
    """A generated suite's manifest with every path re-rooted at ``directory`` (entries move when built)."""
    try:
        manifest = json.loads((Path(directory) / "suite.json").read_text())
    except (OSError, ValueError):
        raise InputError(f"{directory}: not a built suite (no readable suite.json); run `mergebench suite build`") from None
    directory = Path(directory).resolve()
    manifest["files"] = {name: {split: str(directory / Path(p).name) for split, p in splits.items()}
                         for name, splits in manifest["files"].items()}
    if "tokenizer" in manifest:
        manifest["tokenizer"] = str(directory / "tokenizer")
    manifest["directory"] = str(directory)
    return manifest


def suite(pm: PluginManager, cache: ArtifactCache, name: str, seed: int, params: dict[str, Any]) -> dict:
    """The generated suite ``name`` for ``seed`` (built once), as a re-rooted manifest."""
    component = pm.suites().get(name)
    if component.build is None:
        raise InputError(f"suite '{name}' is evaluated from its own task configs; it has nothing to build")
    params = component.resolve_params(params)
    spec = {**_ident(pm, component), "suite_version": component.version, "seed": seed, "params": params}
    path = cache.get_or_build("suite", spec, lambda tmp: component.build(tmp, seed, params))
    return load_manifest(path)


def base(pm: PluginManager, cache: ArtifactCache, manifest: dict, size: str, params: dict[str, Any],
         on_step: OnStep | None = None) -> Path:
    """A pretrained base of ``size`` on the suite's corpus and tokenizer."""
    preparer = pm.base_preparers().get("pretrain")
    params = preparer.resolve_params({**params, "size": size})
    spec = {**_ident(pm, preparer), "suite": Path(manifest["directory"]).name, "params": params}
    return cache.get_or_build("base", spec, lambda tmp: preparer.prepare(
        params, tmp, corpus=Path(manifest["files"]["corpus"]["train"]), tokenizer=Path(manifest["tokenizer"]),
        on_step=on_step))


def instruction_tuned(pm: PluginManager, cache: ArtifactCache, manifest: dict, base_dir: Path,
                      params: dict[str, Any], on_step: OnStep | None = None) -> Path:
    """``base_dir`` instruction-tuned on the suite's instruction mixture (with corpus text mixed in)."""
    preparer = pm.base_preparers().get("instruction_tune")
    params = preparer.resolve_params(params)
    spec = {**_ident(pm, preparer), "base": base_dir.name, "suite": Path(manifest["directory"]).name,
            "params": params}
    return cache.get_or_build("instruction_tuned", spec, lambda tmp: preparer.prepare(
        params, tmp, base=base_dir, data=[Path(manifest["files"]["instructions"]["train"])],
        corpus=Path(manifest["files"]["corpus"]["train"]), on_step=on_step))


def category_files(manifest: dict, suite_component, categories: list[str]) -> list[Path]:
    return [Path(manifest["files"][d.name]["train"]) for c in categories for d in suite_component.held_in[c]]


def expert(pm: PluginManager, cache: ArtifactCache, manifest: dict, base_dir: Path, categories: list[str],
           trainer_name: str, params: dict[str, Any], on_step: OnStep | None = None) -> Path:
    """``base_dir`` fine-tuned by ``trainer_name`` on the training data of ``categories``."""
    trainer = pm.expert_trainers().get(trainer_name)
    params = trainer.resolve_params(params)
    component = pm.suites().get(manifest["suite"])
    spec = {**_ident(pm, trainer), "base": base_dir.name, "suite": Path(manifest["directory"]).name,
            "categories": sorted(categories), "params": params}
    data = category_files(manifest, component, sorted(categories))
    return cache.get_or_build("expert", spec, lambda tmp: trainer.train(base_dir, data, params, tmp, on_step=on_step))


# ---- evaluations ------------------------------------------------------------------------------------

# the files that decide a model's scores (weights, config, tokenizer); not its card or cache manifest
_MODEL_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "model.safetensors.index.json"}


def model_identity(model_dir: Path) -> str:
    """A hash of the contents of the files that decide a model's outputs (hashes are cached by file)."""
    from mergebench.core.hashing import combined_sha256, sha256_file

    files = [p for p in Path(model_dir).iterdir()
             if p.is_file() and (p.suffix == ".safetensors" or p.name in _MODEL_FILES)]
    return combined_sha256({p.name: sha256_file(p) for p in files})


def _evaluation_specs(pm: PluginManager, model_dir: Path, manifest: dict, datasets, params: dict) -> dict:
    """dataset -> the cache spec of the model's score on it (None for a dataset without a local split file)."""
    import lm_eval

    from mergebench.core.hashing import sha256_file
    from mergebench.evaluators import lm_eval_task_utils

    evaluator = pm.evaluators().get("lm-eval")
    # with the task configs' scoring functions in the code hash: a new metric must not hit old scores
    shared = {**_ident(pm, evaluator, evaluator.session, lm_eval_task_utils.process_exact_match),
              "params": params, "lm_eval": lm_eval.__version__, "model": model_identity(model_dir)}
    specs = {}
    for dataset in datasets:
        split_file = manifest.get("files", {}).get(dataset, {}).get(params["split"])
        specs[dataset] = (None if split_file is None
                          else {**shared, "dataset": dataset, "data": sha256_file(Path(split_file))})
    return specs


def cached_scores(pm: PluginManager, cache: ArtifactCache, model_dir: Path, manifest: dict | None,
                  datasets: list[str], params: dict) -> dict[str, float] | None:
    """The model's scores on ``datasets`` if every one was computed before, else None.

    Keyed by the model's file contents, the dataset split's file contents, the evaluator (plugin,
    version, source, parameters) and lm-eval's version, so a copied or re-trained identical model
    hits, and a changed one misses. Suites evaluated from hub task configs (no local files) are not cached.
    """
    if manifest is None:
        return None
    scores = {}
    for dataset, spec in _evaluation_specs(pm, model_dir, manifest, datasets, params).items():
        entry = cache.get("evaluation", spec) if spec else None
        if entry is None:
            return None
        scores[dataset] = json.loads((entry / "score.json").read_text())["score"]
    return scores


def store_scores(pm: PluginManager, cache: ArtifactCache, model_dir: Path, manifest: dict | None,
                 scores: dict[str, float], params: dict) -> None:
    """Record each dataset's score as its own cache entry (written atomically, like every artefact)."""
    if manifest is None:
        return
    for dataset, spec in _evaluation_specs(pm, model_dir, manifest, scores, params).items():
        if spec is not None:
            cache.get_or_build("evaluation", spec, lambda tmp, s=scores[dataset]: (tmp / "score.json").write_text(
                json.dumps({"score": s, "model_dir": str(model_dir)})))
