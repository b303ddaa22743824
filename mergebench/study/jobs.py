"""Units of work that an executor runs: train a model, evaluate a model, sweep a merge method.

Each job is a frozen dataclass (picklable, so any executor can ship it to a worker process or another
machine) with a ``run()`` that opens what it needs through the plugin manager and returns a typed
result. Models travel as paths on a filesystem every worker sees, never as tensors. Evaluation
sessions are kept per process, so a worker evaluates many models or merges without re-indexing tasks
or reloading the model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mergebench.study.contracts import (CALIBRATION_SPLITS, CalibrationSettings, ComponentChoice, ModelRole,
                                       Resources, SuiteData)

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
    """Set up a worker process: thread count, offline hub access, quiet libraries, the expected source."""
    import torch

    expect_source(source)
    torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mergebench.cli.output import quiet_libraries

    quiet_libraries()


def run_job(job: Job, source: str | None = None) -> Any:
    """What a worker calls: check the code is the runner's, then run the job."""
    if source is not None:
        expect_source(source)
    _check_source()
    return job.run()


def _pm():
    from mergebench.core.plugin_manager import get_plugin_manager

    return get_plugin_manager()


def _cache(root: str):
    from mergebench.study.cache import ArtifactCache

    return ArtifactCache(Path(root))


class Job:
    """The base of every job: ``resources`` for the executor, ``label`` for progress, ``run()`` in a worker."""

    resources: Resources
    label: str

    def run(self) -> Any:  # pragma: no cover - every job overrides it
        raise NotImplementedError


# ---- training -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainResult:
    path: Path
    seconds: float


@dataclass(frozen=True)
class TrainJob(Job):
    """Fine-tune ``base_dir`` on the training data of ``categories`` with ``trainer``."""

    cache_root: str
    data: SuiteData
    base_dir: Path
    categories: tuple[str, ...]
    trainer: ComponentChoice
    role: ModelRole
    device: str = "cpu"
    seed: int = 0  # the replicate: added to the trainer's own seed parameter
    resources: Resources = field(default_factory=Resources)

    @property
    def label(self) -> str:
        return self.role.describe()

    def run(self) -> TrainResult:
        from mergebench.study import artifacts

        started = time.perf_counter()
        path = artifacts.expert(_pm(), _cache(self.cache_root), self.data, Path(self.base_dir), list(self.categories),
                                self.trainer, seed=self.seed, device=self.device)
        return TrainResult(path, time.perf_counter() - started)


# ---- evaluation -----------------------------------------------------------------------------------

def session(model_dir: Path, suite: str, data: SuiteData | None, datasets: tuple[str, ...],
            evaluator: ComponentChoice, split: str):
    """This process's evaluation session for (evaluator, architecture, suite data, split, datasets), made once;
    None when the evaluator has none or cannot swap weights with these parameters (vLLM)."""
    # one session per architecture: models of another size (another config) need their own wrapper
    architecture = (Path(model_dir) / "config.json").read_bytes() if (Path(model_dir) / "config.json").is_file() else b""
    params = {**evaluator.params, "split": split}
    key = (evaluator.name, architecture, None if data is None else str(data.directory),
           tuple(sorted((k, repr(v)) for k, v in params.items())), tuple(datasets))
    if key not in _SESSIONS:
        pm = _pm()
        component = pm.evaluators().get(evaluator.name)
        params = component.resolve_params(params)
        _SESSIONS[key] = (None if component.session is None else
                          component.session(Path(model_dir), pm.suites().get(suite), data, list(datasets), params))
    return _SESSIONS[key]


def score_model(model_dir: Path, suite: str, data: SuiteData | None, datasets: list[str], evaluator: ComponentChoice,
                split: str) -> dict[str, float]:
    """One model directory's scores, through the evaluator's session when it has one."""
    pm = _pm()
    component = pm.evaluators().get(evaluator.name)
    s = session(model_dir, suite, data, tuple(datasets), evaluator, split)
    if s is not None:
        from mergebench.study.weights import load_state_dict

        return s.evaluate(load_state_dict(model_dir))
    params = component.resolve_params({**evaluator.params, "split": split})
    return component.evaluate([Path(model_dir)], pm.suites().get(suite), data, list(datasets), params)[0]


@dataclass(frozen=True)
class EvalResult:
    scores: dict[str, float]
    seconds: float
    cached: bool
    examples: dict[str, Any] | None = None  # dataset -> per-example values (numpy arrays), when the evaluator gives them


@dataclass(frozen=True)
class EvalJob(Job):
    """Score one model on ``datasets`` of ``split``, from the evaluation cache when it was scored before."""

    cache_root: str
    model_dir: Path
    suite: str
    data: SuiteData | None
    datasets: tuple[str, ...]
    evaluator: ComponentChoice
    split: str
    role: ModelRole
    resources: Resources = field(default_factory=Resources)
    use_cache: bool = True  # False: evaluate again (and keep the cached scores as they are)

    @property
    def label(self) -> str:
        return f"{self.role.describe()} on {self.split}"

    def run(self) -> EvalResult:
        from mergebench.study import artifacts, per_example

        started = time.perf_counter()
        pm, cache = _pm(), _cache(self.cache_root)
        found = (artifacts.cached_results(pm, cache, Path(self.model_dir), self.data, list(self.datasets),
                                          self.evaluator, self.split) if self.use_cache else None)
        cached = found is not None
        if cached:
            scores, examples = found[0], found[1] or None
        else:
            scores, examples = per_example.collect(self.evaluator.name, score_model(
                Path(self.model_dir), self.suite, self.data, list(self.datasets), self.evaluator, self.split))
            if self.use_cache:
                artifacts.store_scores(pm, cache, Path(self.model_dir), self.data, scores, self.evaluator, self.split,
                                       examples)
        return EvalResult(dict(scores), time.perf_counter() - started, cached, examples)


# ---- sweeps ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPoint:
    params: dict[str, Any]
    held_in: float | None  # normalised held-in score on validation (None: nothing could be normalised)
    scores: dict[str, float]  # raw validation scores


@dataclass(frozen=True)
class SweepResult:
    points: list[SweepPoint]
    best: SweepPoint
    test_scores: dict[str, float]
    params: dict[str, Any]  # the chosen merge's resolved parameters
    seconds: float
    test_examples: dict[str, Any] | None = None  # the chosen merge's per-example test values, when the evaluator gives them


def best_point(points: list[SweepPoint]) -> SweepPoint:
    """The point with the highest validation held-in score; the first in grid order on a tie; a point that
    nothing could normalise ranks last."""
    return max(points, key=lambda p: -float("inf") if p.held_in is None else p.held_in)


@dataclass(frozen=True)
class SweepJob(Job):
    """Score a method's grid on validation, write the chosen merge, score it on test.

    ``seed`` is the merge's seed (a stochastic method's random draws): the study seed, or a further draw's own
    seed under ``draws: K``. ``expert_validation[category][dataset]``: each merged category's expert on validation, the sweep's
    normaliser. Test scores are computed only for the chosen merge, after the choice.
    """

    suite: str
    data: SuiteData | None
    base_dir: Path
    expert_dirs: tuple[Path, ...]
    categories: tuple[str, ...]
    held_in: Mapping[str, tuple[str, ...]]  # category -> its dataset names
    method: str
    grid: tuple[Mapping[str, Any], ...]
    seed: int
    evaluator: ComponentChoice
    expert_validation: Mapping[str, Mapping[str, float]]
    test_datasets: tuple[str, ...]
    output: Path
    device: str = "cpu"
    name: str = ""
    resources: Resources = field(default_factory=Resources)
    memory_limit: int = 16 << 30  # bytes of weights the in-memory path may hold; beyond: every point on disk
    # data-aware methods: where each expert's calibration data comes from (None: the method needs none)
    calibration: CalibrationSettings | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.method} sweep"

    def calibration_data(self) -> dict[str, Any] | None:
        """The engine's ``calibration`` mapping: per expert, a JSONL file of its own category's (prompt,
        completion) pairs from the configured split, written beside the merges under a name that is the
        hash of its content (so equal data gives equal files, and the statistics cache hits)."""
        if self.calibration is None:
            return None
        import hashlib
        import json

        from mergebench.core.errors import InputError
        from mergebench.training import read_pairs

        if self.calibration.split not in CALIBRATION_SPLITS:  # a config never gets here with test data
            raise InputError(f"calibration data may come from train or validation, not {self.calibration.split!r}")
        if self.data is None:
            raise InputError(f"{self.method} learns from calibration data, but suite '{self.suite}' has no data files")
        directory = Path(self.output).parent / "calibration-data"
        directory.mkdir(parents=True, exist_ok=True)
        files = []
        for category in self.categories:
            paths = [self.data.require(d, self.calibration.split, f"calibration of the {category} expert")
                     for d in self.held_in[category]]
            text = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in read_pairs(paths))
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            path = directory / f"{category}-{self.calibration.split}-{digest}.jsonl"
            if not path.is_file():
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(text)
                os.replace(tmp, path)  # another worker writing the same file writes the same bytes
            files.append(str(path))
        return {"data": files, **self.calibration.data_parameters()}

    def weights_bytes(self) -> int:
        """The base's and experts' weights on disk: what the in-memory path would hold."""
        dirs = [Path(self.base_dir), *map(Path, self.expert_dirs)]
        return sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors"))

    def _engine_merge(self, method, params: Mapping[str, Any], pm, output: Path):
        from mergebench.core import api

        return api.merge(method.name, base=self.base_dir if method.needs_base else None, experts=list(self.expert_dirs),
                         output=output, seed=self.seed, force=True, threads=1, plugin_manager=pm,
                         device=self.device, calibration=self.calibration_data(), **params)

    def run(self) -> SweepResult:
        import tempfile

        from mergebench.study import per_example
        from mergebench.study.normalise import normalise

        started = time.perf_counter()
        pm = _pm()
        method = pm.merge_methods().get(self.method)
        held_in = {c: list(self.held_in[c]) for c in self.categories}
        val_datasets = [d for c in self.categories for d in held_in[c]]
        output = Path(self.output)
        output.parent.mkdir(parents=True, exist_ok=True)

        def normalised(scores: dict[str, float]) -> float | None:
            return normalise(scores, held_in, {}, self.expert_validation, {}, on_zero="skip").held_in

        def score_dir(path: Path) -> dict[str, float]:
            return dict(score_model(path, self.suite, self.data, val_datasets, self.evaluator, "validation"))

        def score_engine(params) -> dict[str, float]:
            with tempfile.TemporaryDirectory(prefix=f".{output.name}-point-", dir=output.parent) as tmp:
                self._engine_merge(method, params, pm, Path(tmp) / "merged")
                return score_dir(Path(tmp) / "merged")

        points: list[SweepPoint] = []
        if (self.weights_bytes() > self.memory_limit or
                session(Path(self.base_dir), self.suite, self.data, tuple(val_datasets), self.evaluator,
                        "validation") is None):
            # too large to hold in memory, or no weight-swapping session: every point is merged to disk by the
            # streaming engine and scored from there
            for params in self.grid:
                scores = score_engine(params)
                points.append(SweepPoint(dict(params), normalised(scores), scores))
        else:
            points = self._in_memory_points(method, val_datasets, normalised)
        best = best_point(points)
        result = self._engine_merge(method, best.params, pm, output)
        test_scores, test_examples = per_example.collect(self.evaluator.name, score_model(
            output, self.suite, self.data, list(self.test_datasets), self.evaluator, "test"))
        return SweepResult(points, best, test_scores, result.parameters, time.perf_counter() - started, test_examples)

    def _in_memory_points(self, method, val_datasets, normalised: Callable) -> list[SweepPoint]:
        from mergebench.core import in_memory
        from mergebench.study.weights import load_state_dict

        val = session(Path(self.base_dir), self.suite, self.data, tuple(val_datasets), self.evaluator, "validation")
        base = load_state_dict(Path(self.base_dir)) if method.needs_base else None
        experts = [load_state_dict(Path(d)) for d in self.expert_dirs]
        statistics = self._statistics(method)

        def score(state) -> SweepPoint:
            scores = dict(val.evaluate(state))  # the scores alone: points keep no per-example values
            return SweepPoint({}, normalised(scores), scores)

        points: list[SweepPoint] = []
        base_point: SweepPoint | None = None
        scale = method.scale_param if method.delta is not None else None
        groups: dict[tuple, list[Mapping[str, Any]]] = {}
        for params in self.grid:
            groups.setdefault(tuple(sorted((k, v) for k, v in params.items() if k != scale)), []).append(params)
        for grid in groups.values():
            if scale is not None and base is not None:
                delta = in_memory.merge_delta(method, grid[0], base, experts, seed=self.seed,
                                              statistics=statistics(grid[0]))
                for params in grid:
                    value = method.resolve_params(params)[scale]
                    if value == 0:  # theta_0 + 0 * delta is the base whatever the other parameters: score it once
                        base_point = base_point or score(base)
                        point = base_point
                    else:
                        point = score(in_memory.apply_delta(base, delta, value))
                    points.append(SweepPoint(dict(params), point.held_in, point.scores))
                del delta
            else:
                for params in grid:
                    point = score(in_memory.merge(method, params, base, experts, seed=self.seed,
                                                  statistics=statistics(params)))
                    points.append(SweepPoint(dict(params), point.held_in, point.scores))
        return points

    def _statistics(self, method) -> Callable[[Mapping[str, Any]], list[Any] | None]:
        """params -> per expert, the calibration statistics the method asks for at them (None: it asks for
        none), computed or read from the cache once per kind, exactly as the engine's merge of that point gets."""
        if method.calibration is None:
            return lambda params: None
        from mergebench.core import calibration
        from mergebench.core.tensor_io import open_local

        found: dict[Any, list[Any]] = {}

        def get(params: Mapping[str, Any]) -> list[Any] | None:
            request = method.calibration(method.resolve_params(params))
            if request is None:
                return None
            if request not in found:
                sources = [open_local(str(d), Path(d), False) for d in self.expert_dirs]
                try:
                    found[request] = calibration.per_expert(sources, request, self.calibration_data(), self.device)[1]
                finally:
                    for source in sources:
                        source.close()
            return found[request]

        return get
