"""Units of work that run in worker processes: train a model, evaluate models, sweep a merge method.

Each job takes and returns plain data (paths, dicts), opens what it needs through the plugin
manager, and keeps evaluation sessions per process, so a worker evaluates many models or merges
without re-indexing tasks or reloading the model. Workers use one CPU thread each: on small models
two processes do more work than one process with two threads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_SESSIONS: dict[tuple, Any] = {}
_EXPECTED_SOURCE: str | None = None


def source_fingerprint() -> str:
    """A hash of mergebench's own source files as they are on disk now (a few milliseconds)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        digest.update(str(f.relative_to(root)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def expect_source(fingerprint: str | None) -> None:
    """Jobs in this process refuse to run once mergebench's source differs from ``fingerprint``."""
    global _EXPECTED_SOURCE
    _EXPECTED_SOURCE = fingerprint


def _check_source() -> None:
    # worker processes import modules when they first need them: after an upgrade or an edit under a
    # running run they would mix the runner's code with new code and fail in ways that look like bugs
    if _EXPECTED_SOURCE is not None and source_fingerprint() != _EXPECTED_SOURCE:
        from mergebench.core.errors import MergebenchError

        raise MergebenchError("mergebench's source files changed while this run was going (an upgrade or an "
                              "edit), so its processes would mix old and new code; run `mergebench run` again: "
                              "it resumes with the new code and redoes nothing already recorded")


def init_worker(threads: int = 1, source: str | None = None) -> None:
    import torch

    expect_source(source)
    torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mergebench.cli.output import quiet_libraries

    quiet_libraries()


def _pm():
    from mergebench.core.plugin_manager import get_plugin_manager

    return get_plugin_manager()


def _cache(root: str):
    from mergebench.core.cache import ArtifactCache

    return ArtifactCache(Path(root))


def train_expert(cache_root: str, manifest: dict, base_dir: str, categories: list[str], trainer: str,
                 params: dict) -> dict:
    from mergebench.study import artifacts

    _check_source()
    started = time.perf_counter()
    path = artifacts.expert(_pm(), _cache(cache_root), manifest, Path(base_dir), categories, trainer, params)
    return {"path": str(path), "seconds": time.perf_counter() - started}


def session(model_dir: str, suite: str, manifest: dict, datasets: tuple[str, ...], params: dict):
    """This process's evaluation session for (architecture, suite data, split, datasets), made once."""
    # one session per architecture: models of another size (another config) need their own wrapper
    architecture = (Path(model_dir) / "config.json").read_bytes()
    key = (architecture, manifest.get("directory"), params["split"], params["batch_size"], tuple(datasets))
    if key not in _SESSIONS:
        pm = _pm()
        evaluator = pm.evaluators().get("lm-eval")
        _SESSIONS[key] = evaluator.session(Path(model_dir), pm.suites().get(suite), manifest, list(datasets), params)
    return _SESSIONS[key]


def evaluate(cache_root: str, model_dir: str, suite: str, manifest: dict, datasets: list[str], params: dict) -> dict:
    """Scores of one model, from the evaluation cache when this model was scored on this data before."""
    from mergebench.evaluators.lm_eval_adapter import load_state_dict
    from mergebench.study import artifacts

    _check_source()
    started = time.perf_counter()
    pm, cache = _pm(), _cache(cache_root)
    scores = artifacts.cached_scores(pm, cache, Path(model_dir), manifest, list(datasets), params)
    cached = scores is not None
    if not cached:
        s = session(model_dir, suite, manifest, tuple(datasets), params)
        scores = s.evaluate(load_state_dict(Path(model_dir)))
        artifacts.store_scores(pm, cache, Path(model_dir), manifest, scores, params)
    return {"scores": scores, "seconds": time.perf_counter() - started, "cached": cached}


def _engine_merge(method, params: dict, job: dict, pm) -> dict:
    """One grid point merged by the streaming engine into a scratch directory beside the output."""
    import tempfile

    from mergebench.core import api
    from mergebench.evaluators.lm_eval_adapter import load_state_dict

    output = Path(job["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}-point-", dir=output.parent) as tmp:
        api.merge(method.name, base=job["base_dir"] if method.needs_base else None, experts=job["expert_dirs"],
                  output=Path(tmp) / "merged", seed=job["seed"], force=True, threads=1, plugin_manager=pm, **params)
        return load_state_dict(Path(tmp) / "merged")


def sweep(job: dict) -> dict:
    """Evaluate a method's search grid on validation, write the chosen merge, evaluate it on test.

    ``job``: suite, manifest, base_dir, expert_dirs, categories, method, grid (list of parameter
    dicts), seed, eval_params, expert_validation (category -> dataset -> score), test_datasets, output.
    """
    from mergebench.core import api, in_memory
    from mergebench.core.normalise import normalise
    from mergebench.evaluators.lm_eval_adapter import load_state_dict

    _check_source()
    started = time.perf_counter()
    pm = _pm()
    suite = pm.suites().get(job["suite"])
    method = pm.merge_methods().get(job["method"])
    base = load_state_dict(Path(job["base_dir"])) if method.needs_base else None
    experts = [load_state_dict(Path(d)) for d in job["expert_dirs"]]
    held_in = {c: [d.name for d in suite.held_in[c]] for c in job["categories"]}
    val_datasets = tuple(d for c in job["categories"] for d in held_in[c])
    val = session(job["base_dir"], job["suite"], job["manifest"], val_datasets, {**job["eval_params"], "split": "validation"})

    def score(state) -> tuple[float, dict]:
        scores = val.evaluate(state)
        return normalise(scores, held_in, {}, job["expert_validation"], {}, on_zero="skip").held_in, scores

    points = []
    base_point = None
    scale = method.scale_param if method.delta is not None else None
    groups: dict[tuple, list[dict]] = {}
    for params in job["grid"]:
        groups.setdefault(tuple(sorted((k, v) for k, v in params.items() if k != scale)), []).append(params)
    for _, grid in groups.items():
        if not in_memory.supports(method, method.resolve_params(grid[0]), len(experts)):
            # a whole-model pre-pass (TIES trimmed over the whole task vector): each point is merged by
            # the engine, which runs the pre-pass, and read back
            for params in grid:
                held, scores = score(_engine_merge(method, params, job, pm))
                points.append({"params": params, "held_in": held, "scores": scores})
        elif scale is not None and base is not None:
            delta = in_memory.merge_delta(method, grid[0], base, experts, seed=job["seed"])
            for params in grid:
                value = method.resolve_params(params)[scale]
                if value == 0:  # theta_0 + 0 * delta is the base whatever the other parameters: score it once
                    base_point = base_point or score(base)
                    held, scores = base_point
                else:
                    held, scores = score(in_memory.apply_delta(base, delta, value))
                points.append({"params": params, "held_in": held, "scores": scores})
            del delta
        else:
            for params in grid:
                held, scores = score(in_memory.merge(method, params, base, experts, seed=job["seed"]))
                points.append({"params": params, "held_in": held, "scores": scores})
    # the first best in grid order (deterministic); a point no dataset could normalise ranks last
    best = max(points, key=lambda p: -float("inf") if p["held_in"] is None else p["held_in"])
    result = api.merge(method.name, base=job["base_dir"] if method.needs_base else None, experts=job["expert_dirs"],
                       output=job["output"], seed=job["seed"], force=True, threads=1, plugin_manager=pm,
                       **best["params"])
    test = session(job["base_dir"], job["suite"], job["manifest"], tuple(job["test_datasets"]),
                   {**job["eval_params"], "split": "test"})
    test_scores = test.evaluate(load_state_dict(Path(job["output"])))
    return {"points": points, "best": best, "test_scores": test_scores,
            "params": result.parameters, "seconds": time.perf_counter() - started}
