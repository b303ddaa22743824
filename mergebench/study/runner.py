"""``mergebench run``: build, train, evaluate and sweep as resumable units of work.

Order: suite data, bases and instruction-tuned bases (in this process, all cores); experts and
multitask models (worker processes); evaluations of those models (workers); one sweep per
(seed, size, base kind, N, method), and per further random draw of a stochastic method under
``draws: K`` (workers). Artefacts live in the content-addressed cache; every
completed evaluation and sweep is one transaction in the run's results database, so a rerun skips
what completed and an interrupted one loses only the units in flight.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import random
import time
from concurrent.futures import Future, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mergebench.study.cache import ArtifactCache
from mergebench.core.errors import InputError, MergebenchError, PluginError
from mergebench.study.normalise import normalise
from mergebench.core.plugin_manager import PluginManager
from mergebench.study import artifacts, jobs, per_example
from mergebench.study.config import RunConfig
from mergebench.study.contracts import ModelRole, Resources, SuiteData
from mergebench.study.database import ResultsDB, score_statements

DB_NAME = "results.sqlite"


class Reporter:
    """Progress callbacks; the CLI draws them with rich, tests ignore them."""

    def stage(self, name: str, total: int) -> None: ...

    def update(self, name: str, item: str) -> None: ...

    def advance(self, name: str, item: str = "") -> None: ...


def expert_order(categories: list[str], seed: int) -> list[str]:
    """The seeded order in which held-in categories join merges: N experts are its first N."""
    order = list(categories)
    random.Random(f"mergebench-expert-order-{seed}").shuffle(order)
    return order


def draw_seed(seed: int, draw: int) -> int:
    """The merge seed of a study seed's random draw ``draw`` (``draws: K``): the study seed itself for draw 0
    (what a run without draws uses), a 31-bit hash of (seed, draw) for the others."""
    if draw == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"mergebench-draw-{seed}-{draw}".encode()).digest()[:4], "big") >> 1


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def grid_for(method, overrides: dict[str, list[Any]] | None) -> list[dict[str, Any]]:
    """Every point of the method's search space (its own, or the config's override), in a fixed order."""
    space = dict(method.search_space)
    space.update(overrides or {})
    if not space:
        return [{}]
    keys = sorted(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def random_grid(method, overrides: dict[str, list[Any]] | None) -> bool:
    """Whether some point of the method's grid draws random numbers: only then do ``draws: K`` repeat its sweeps."""
    return any(method.draws_random(method.resolve_params(p)) for p in grid_for(method, overrides))


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One run per directory at a time: a second one fails at once with a clear message."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise InputError(f"{run_dir}: another mergebench run is using this directory "
                             f"(pid {fh.read().strip() or '?'}); wait for it or choose another --run-dir") from None
        fh.truncate(0)
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class _Models:
    """The models of one (seed, size): the suite data, studied bases by kind, experts and multitask by kind."""

    data: SuiteData
    bases: dict[str, Path]
    experts: dict[str, dict[str, Path]] = field(default_factory=dict)
    multitask: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class _Tagged:
    """What the runner remembers about a submitted job until its result is recorded."""

    label: str
    role: ModelRole | None = None
    key: str = ""
    spec: dict | None = None
    extra: Any = None


class Runner:
    def __init__(self, cfg: RunConfig, run_dir: Path, pm: PluginManager, cache: ArtifactCache | None = None,
                 reporter: Reporter | None = None):
        self.cfg, self.run_dir, self.pm = cfg, Path(run_dir), pm
        self.cache = cache or ArtifactCache()
        self.reporter = reporter or Reporter()
        self.suite = pm.suites().get(cfg.suite)
        self.categories = list(self.suite.held_in)
        self.held_in = {c: [d.name for d in ds] for c, ds in self.suite.held_in.items()}
        self.held_out = {c: [d.name for d in ds] for c, ds in self.suite.held_out.items()}
        self.all_datasets = list(self.suite.datasets())
        self.source = jobs.source_fingerprint()  # the code this run started with; jobs check it
        self.models_info: dict[tuple[str, str], Any] = {}

    def _resources(self, size: str, kind: str, job: str, n: int = 0) -> Resources:
        """What a job on the (size, kind) base asks of its machine, from the base's metadata (see plan.py)."""
        from mergebench.study import plan

        info = self.models_info.get((size, kind))
        if info is None:
            return Resources(cpus=1, gpus=1 if self.cfg.device.startswith("cuda") else 0)
        return plan.job_resources(info, job, self.cfg, n)

    # ---- helpers ---------------------------------------------------------------------------------

    def _versions(self) -> dict[str, str]:
        import torch
        import transformers

        import mergebench

        out = {"mergebench": mergebench.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
        try:
            import lm_eval

            out["lm_eval"] = getattr(lm_eval, "__version__", "?")
        except ImportError:
            pass
        for name, (dist, version) in self.pm.distributions.items():
            out[f"plugin:{name}"] = f"{dist} {version}"
        return out

    def _executor(self):
        from mergebench.study.executors import ExecutorOptions

        executor = self.pm.executors().get(self.cfg.executor.name)
        jobs.expect_source(self.source)
        options = ExecutorOptions(workers=self.cfg.workers, source=self.source,
                                  env={"MERGEBENCH_HOME": str(self.cache.root.parent)})
        try:
            return executor.start(dict(self.cfg.executor.params), options)
        except MergebenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin's bug, reported as the plugin's
            raise PluginError(f"executor '{executor.name}' (plugin '{executor.plugin}') failed to start: "
                              f"{type(exc).__name__}: {exc}") from None

    def _drain(self, pool, futures: dict[Future, _Tagged], stage: str, on_done: Callable[[_Tagged, Any], None]) -> None:
        """Wait for ``futures``; record each as it completes (so a kill loses only the ones in flight)."""
        error: BaseException | None = None
        sequential = getattr(pool, "sequential", False)
        for future in (futures if sequential else as_completed(futures)):
            if sequential:
                future.run_now()
            tag = futures[future]
            try:
                on_done(tag, future.result())
            except BaseException as exc:  # noqa: BLE001 - finish recording the others first
                error = error or exc
            self.reporter.advance(stage, tag.label)
        if error is not None:
            raise error

    def _out_dir(self) -> Path:
        return Path(self.cfg.storage) / self.run_dir.resolve().name if self.cfg.storage else self.run_dir

    # ---- phases ----------------------------------------------------------------------------------

    def _build_bases(self) -> dict[tuple[int, str], _Models]:
        import torch

        cfg = self.cfg
        self.reporter.stage("build bases", len(cfg.seeds) * (1 + len(cfg.bases)))
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        out = {}
        for seed in cfg.seeds:
            self.reporter.update("build bases", f"suite {cfg.suite} (seed {seed})")
            data = artifacts.suite(self.pm, self.cache, cfg.suite, seed, cfg.suite_params)
            self.reporter.advance("build bases")
            built: dict[tuple[str, str], Path] = {}
            for b in cfg.bases:
                what = f"{b.preparer.name} {b.size} {b.kind} base (seed {seed})"
                self.reporter.update("build bases", what)
                source = built[(b.size, b.source)] if b.source is not None else None
                built[(b.size, b.kind)] = artifacts.prepare_base(
                    self.pm, self.cache, data, b.preparer, seed, source=source, device=cfg.device,
                    on_step=self._on_step("build bases", what))
                self.reporter.advance("build bases")
            for size in cfg.sizes:
                bases = {b.kind: built[(size, b.kind)] for b in cfg.bases if b.size == size and b.studied}
                out[(seed, size)] = _Models(data, bases)
        from mergebench.study import plan

        for b in cfg.bases:  # parameter counts from the built bases' headers: what jobs ask of executors
            self.models_info[(b.size, b.kind)] = plan.describe_built(built[(b.size, b.kind)])
        return out

    def _on_step(self, stage: str, what: str):
        last = [0.0]

        def on_step(step: int, total: int, loss: float) -> None:
            now = time.monotonic()
            if now - last[0] > 0.25 or step == total:
                last[0] = now
                self.reporter.update(stage, f"{what}: step {step}/{total}, loss {loss:.3f}")
        return on_step

    def _train_experts(self, pool, models: dict[tuple[int, str], _Models]) -> None:
        cfg = self.cfg
        root = str(self.cache.root)
        futures: dict[Future, _Tagged] = {}

        def submit(m: _Models, seed: int, size: str, kind: str, categories: list[str], trainer, role) -> None:
            job = jobs.TrainJob(root, m.data, m.bases[kind], tuple(categories), trainer,
                                ModelRole(role, seed, size, kind, categories[0] if role == "expert" else None),
                                device=cfg.device, seed=seed, resources=self._resources(size, kind, "train"))
            futures[pool.submit(job)] = _Tagged(job.label, job.role)

        for (seed, size), m in models.items():
            if cfg.multitask is not None:  # the longest jobs (multitask) first: no long tail at the end
                for kind in m.bases:
                    submit(m, seed, size, kind, self.categories, cfg.multitask, "multitask")
            # only the experts some merge uses: the first max(N) of this seed's order
            for kind in m.bases:
                for category in expert_order(self.categories, seed)[:max(cfg.n_experts)]:
                    submit(m, seed, size, kind, [category], cfg.expert_trainer, "expert")
        self.reporter.stage("train experts", len(futures))

        def done(tag: _Tagged, result: jobs.TrainResult) -> None:
            role = tag.role
            m = models[(role.seed, role.size)]
            if role.role == "multitask":
                m.multitask[role.base_kind] = Path(result.path)
            else:
                m.experts.setdefault(role.base_kind, {})[role.category] = Path(result.path)
        self._drain(pool, futures, "train experts", done)

    def _register_models(self, db: ResultsDB, models: dict[tuple[int, str], _Models]) -> list[jobs.EvalJob]:
        """Record every trained model; return the evaluations still to do."""
        todo: list[jobs.EvalJob] = []
        with db.transaction():
            for (seed, size), m in models.items():
                entries = [(ModelRole("base", seed, size, kind), p) for kind, p in m.bases.items()]
                entries += [(ModelRole("expert", seed, size, kind, c), p) for kind, ex in m.experts.items()
                            for c, p in ex.items()]
                entries += [(ModelRole("multitask", seed, size, kind), p) for kind, p in m.multitask.items()]
                for role, path in entries:
                    db.conn.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    (path.name, role.role, seed, size, role.base_kind, role.category, str(path), None))
                    todo.append(self._eval_job(path, role, m.data, "test", self.all_datasets))
                    if role.role == "expert":  # its own category on validation: the sweep's normaliser
                        todo.append(self._eval_job(path, role, m.data, "validation", self.held_in[role.category]))
        return [j for j in todo if not db.done(self._eval_key(Path(j.model_dir).name, j.split, list(j.datasets)))]

    def _eval_job(self, path: Path, role: ModelRole, data: SuiteData, split: str, datasets: list[str]) -> jobs.EvalJob:
        return jobs.EvalJob(str(self.cache.root), path, self.cfg.suite, data, tuple(datasets), self.cfg.evaluator,
                            split, role, resources=self._resources(role.size, role.base_kind, "evaluate"))

    def _eval_key(self, model: str, split: str, datasets: list[str]) -> str:
        return f"eval:{model}:{split}:{_hash([datasets, self.cfg.evaluator.to_dict(), self.cfg.suite_params])}"

    def _evaluate(self, pool, db: ResultsDB, todo: list[jobs.EvalJob]) -> None:
        futures = {pool.submit(job): _Tagged(job.label, job.role, extra=job) for job in todo}
        self.reporter.stage("evaluate models", len(futures))

        def done(tag: _Tagged, result: jobs.EvalResult) -> None:
            job: jobs.EvalJob = tag.extra
            key = Path(job.model_dir).name
            spec = {"model": key, "split": job.split, "datasets": list(job.datasets),
                    "evaluator": self.cfg.evaluator.to_dict()}
            db.complete(self._eval_key(key, job.split, list(job.datasets)), "evaluation", spec, None, result.seconds,
                        self._versions(), score_statements(key, job.split, result.scores)
                        + per_example.statements(key, job.split, result.examples))
        self._drain(pool, futures, "evaluate models", done)

    def _sweeps(self, pool, db: ResultsDB, models: dict[tuple[int, str], _Models]) -> None:
        cfg = self.cfg
        methods = self.pm.merge_methods()
        futures: dict[Future, _Tagged] = {}
        total = 0
        for (seed, size), m in models.items():
            order = expert_order(self.categories, seed)
            db.set_meta(f"expert_order:{seed}", order)
            # the largest merges (longest sweeps) first, so the workers finish together
            todo = [(n, kind, name, draw) for n, kind, name in itertools.product(
                sorted(cfg.n_experts, reverse=True), cfg.base_kinds, cfg.methods)
                if n not in cfg.unmergeable.get(name, {})  # the method's check refuses N experts
                for draw in range(cfg.draws if random_grid(methods.get(name), cfg.search.get(name)) else 1)]
            for n, kind, name, draw in todo:
                total += 1
                method = methods.get(name)
                categories = order[:n]
                grid = grid_for(method, cfg.search.get(name))
                expert_dirs = [m.experts[kind][c] for c in categories]
                spec = {"seed": seed, "size": size, "base_kind": kind, "n": n, "method": name,
                        "plugin_version": artifacts.plugin_version(self.pm, method), "grid": grid,
                        "base": m.bases[kind].name, "experts": [e.name for e in expert_dirs],
                        "evaluator": cfg.evaluator.to_dict()}
                calibration = cfg.calibration if method.calibration is not None else None
                if calibration is not None:  # a data-aware method: other calibration data is another unit
                    spec["calibration"] = calibration.to_dict()
                merge_seed = draw_seed(seed, draw)
                if draw:  # a further random draw: its own unit (the first draw keeps the key a run without draws has)
                    spec = {**spec, "draw": draw, "merge_seed": merge_seed}
                key = f"sweep:{seed}:{size}:{kind}:{n}:{name}{f'@draw{draw}' if draw else ''}:{_hash(spec)}"
                if db.done(key):
                    continue
                suffix = f"-draw{draw}" if draw else ""
                job = jobs.SweepJob(
                    suite=cfg.suite, data=m.data, base_dir=m.bases[kind], expert_dirs=tuple(expert_dirs),
                    categories=tuple(categories), held_in={c: tuple(self.held_in[c]) for c in categories},
                    method=name, grid=tuple(grid), seed=merge_seed, evaluator=cfg.evaluator,
                    expert_validation={c: db.scores(m.experts[kind][c].name, "validation") for c in categories},
                    test_datasets=tuple([d for c in categories for d in self.held_in[c]]
                                        + [d for ds in self.held_out.values() for d in ds]),
                    output=self._out_dir() / "merges" / f"{size}-{kind}-n{n}-{name}-seed{seed}{suffix}",
                    device=cfg.device, name=f"{name}, N={n} ({size}, {kind}, seed {seed}{f', draw {draw}' if draw else ''})",
                    resources=self._resources(size, kind, "sweep", n), memory_limit=int(cfg.sweep_memory_gib * 2**30),
                    calibration=calibration)
                futures[pool.submit(job)] = _Tagged(job.label, ModelRole("merge", seed, size, kind), key, spec,
                                                    (m, categories, job.output, draw, merge_seed))
        self.reporter.stage("sweep merges", total)
        for _ in range(total - len(futures)):
            self.reporter.advance("sweep merges")

        def done(tag: _Tagged, result: jobs.SweepResult) -> None:
            m, categories, output, draw, merge_seed = tag.extra
            kind, spec = tag.role.base_kind, tag.spec
            held_in = {c: self.held_in[c] for c in categories}
            experts_test = {c: db.scores(m.experts[kind][c].name, "test") for c in categories}
            base_test = db.scores(m.bases[kind].name, "test")
            norm = normalise(result.test_scores, held_in, self.held_out, experts_test, base_test, on_zero="skip")
            model_key = "merge-" + _hash([tag.key])
            statements = [("INSERT OR REPLACE INTO sweep_points VALUES (?, ?, ?, ?)",
                           (tag.key, json.dumps(p.params, sort_keys=True), p.held_in, json.dumps(p.scores)))
                          for p in result.points]
            statements += score_statements(model_key, "test", result.test_scores)
            statements += per_example.statements(model_key, "test", result.test_examples)
            statements.append(("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (model_key, "merge", spec["seed"], spec["size"], kind, None, str(output), None)))
            chosen = (json.dumps(categories), json.dumps(result.params, sort_keys=True), result.best.held_in,
                      norm.held_in, norm.held_out, json.dumps(norm.__dict__), model_key, result.seconds)
            where = (spec["seed"], spec["size"], kind, spec["n"], spec["method"])
            if draw == 0:
                statements.append(("INSERT OR REPLACE INTO merges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                   where + chosen))
            else:
                statements.append(("INSERT OR REPLACE INTO draws VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                   where + (draw, merge_seed) + chosen))
            db.complete(tag.key, "sweep", spec, {"params": result.params}, result.seconds, self._versions(), statements)
        self._drain(pool, futures, "sweep merges", done)

    # ---- the whole run ---------------------------------------------------------------------------

    def run(self) -> ResultsDB:
        started = time.perf_counter()
        with run_lock(self.run_dir):
            db = ResultsDB(self.run_dir / DB_NAME)
            db.set_meta("config", self.cfg.to_dict())
            db.set_meta("suite", {"name": self.suite.name, "held_in": self.held_in,
                                  "held_out": self.held_out})
            db.set_meta("versions", self._versions())
            models = self._build_bases()
            pool = self._executor()
            try:
                self._train_experts(pool, models)
                self._evaluate(pool, db, self._register_models(db, models))
                self._sweeps(pool, db, models)
            except BaseException:
                pool.shutdown(cancel=True)
                raise
            pool.shutdown()
            db.set_meta("last_run_seconds", time.perf_counter() - started)
        return db


def open_db(run_dir: Path) -> ResultsDB:
    path = Path(run_dir) / DB_NAME
    if not path.is_file():
        raise InputError(f"{run_dir}: no results database ({DB_NAME}); run `mergebench run` first")
    try:
        return ResultsDB(path)
    except Exception as exc:  # noqa: BLE001 - sqlite errors: corrupt or not a database
        raise MergebenchError(f"{path}: cannot open the results database ({exc})") from None
