"""``mergebench run``: build, train, evaluate and sweep as resumable units of work.

Order: suite data, bases and instruction-tuned bases (in this process, all cores); experts and
multitask models (worker processes); evaluations of those models (workers); one sweep per
(seed, size, base kind, N, method) (workers). Artefacts live in the content-addressed cache; every
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
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from mergebench.core.cache import ArtifactCache
from mergebench.core.errors import InputError, MergebenchError
from mergebench.core.normalise import normalise
from mergebench.core.plugin_manager import PluginManager
from mergebench.study import artifacts, jobs
from mergebench.study.config import RunConfig
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


class _Deferred(Future):
    """A job that runs in this process when its result is first asked for."""

    def __init__(self, fn: Callable, args: tuple):
        super().__init__()
        self._job = (fn, args)

    def run_now(self) -> None:
        fn, args = self._job
        try:
            self.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, like a pool's
            self.set_exception(exc)


class _Inline:
    """The executor interface without processes (workers = 1): jobs run one at a time as they are
    drained, so each is recorded before the next starts (a kill loses at most the one running)."""

    def submit(self, fn: Callable, *args: Any) -> Future:
        return _Deferred(fn, args)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None: ...


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
    """The trained models of one (seed, size): bases by kind, experts and multitask by kind."""

    manifest: dict
    bases: dict[str, Path]
    experts: dict[str, dict[str, Path]]
    multitask: dict[str, Path]


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
        if self.cfg.workers == 1:
            jobs.expect_source(self.source)
            return _Inline()
        import multiprocessing

        return ProcessPoolExecutor(self.cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=jobs.init_worker, initargs=(1, self.source))

    def _drain(self, futures: dict[Future, Any], stage: str, on_done: Callable[[Any, Any], None]) -> None:
        """Wait for ``futures``; record each as it completes (so a kill loses only the ones in flight)."""
        error: BaseException | None = None
        deferred = all(isinstance(f, _Deferred) for f in futures)
        for future in (futures if deferred else as_completed(futures)):
            if deferred:
                future.run_now()
            tag = futures[future]
            try:
                on_done(tag, future.result())
            except BaseException as exc:  # noqa: BLE001 - finish recording the others first
                error = error or exc
            self.reporter.advance(stage, str(tag[0]) if isinstance(tag, tuple) else str(tag))
        if error is not None:
            raise error

    # ---- phases ----------------------------------------------------------------------------------

    def _build_bases(self) -> dict[tuple[int, str], _Models]:
        import torch

        cfg = self.cfg
        total = len(cfg.seeds) * (1 + len(cfg.sizes) * (1 + ("instruction_tuned" in cfg.base_kinds)))
        self.reporter.stage("build bases", total)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        out = {}
        for seed in cfg.seeds:
            self.reporter.update("build bases", f"suite {cfg.suite} (seed {seed})")
            manifest = artifacts.suite(self.pm, self.cache, cfg.suite, seed, cfg.suite_params)
            self.reporter.advance("build bases")
            for size in cfg.sizes:
                self.reporter.update("build bases", f"pretrain {size} base (seed {seed})")
                base = artifacts.base(self.pm, self.cache, manifest, size, {**cfg.pretrain, "seed": cfg.pretrain["seed"] + seed},
                                      on_step=self._on_step("build bases", f"pretrain {size} base (seed {seed})"))
                self.reporter.advance("build bases")
                bases = {"pretrained": base}
                if "instruction_tuned" in cfg.base_kinds:
                    self.reporter.update("build bases", f"instruction-tune {size} base (seed {seed})")
                    bases["instruction_tuned"] = artifacts.instruction_tuned(
                        self.pm, self.cache, manifest, base, {**cfg.instruction_tune, "seed": cfg.instruction_tune["seed"] + seed},
                        on_step=self._on_step("build bases", f"instruction-tune {size} base (seed {seed})"))
                    self.reporter.advance("build bases")
                out[(seed, size)] = _Models(manifest, {k: bases[k] for k in cfg.base_kinds}, {}, {})
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
        futures = {}
        for (seed, size), m in models.items():
            for kind, base in m.bases.items():  # the longest jobs (multitask) first: no long tail at the end
                params = {**cfg.multitask, "seed": cfg.multitask["seed"] + seed}
                f = pool.submit(jobs.train_expert, root, m.manifest, str(base), self.categories, "multitask", params)
                futures[f] = (f"multitask ({size}, {kind}, seed {seed})", seed, size, kind, None)
            for kind, base in m.bases.items():
                for category in self.categories:
                    params = {**cfg.expert, "seed": cfg.expert["seed"] + seed}
                    f = pool.submit(jobs.train_expert, root, m.manifest, str(base), [category], cfg.expert_trainer, params)
                    futures[f] = (f"{category} expert ({size}, {kind}, seed {seed})", seed, size, kind, category)
        self.reporter.stage("train experts", len(futures))

        def done(tag, result):
            _, seed, size, kind, category = tag
            path = Path(result["path"])
            if category is None:
                models[(seed, size)].multitask[kind] = path
            else:
                models[(seed, size)].experts.setdefault(kind, {})[category] = path
        self._drain(futures, "train experts", done)

    def _register_models(self, db: ResultsDB, models: dict[tuple[int, str], _Models]) -> list[tuple]:
        """Record every trained model; return the evaluations still to do: (model key, path, split, datasets)."""
        todo = []
        with db.transaction():
            for (seed, size), m in models.items():
                entries = [("base", kind, None, p) for kind, p in m.bases.items()]
                entries += [("expert", kind, c, p) for kind, ex in m.experts.items() for c, p in ex.items()]
                entries += [("multitask", kind, None, p) for kind, p in m.multitask.items()]
                for role, kind, category, path in entries:
                    db.conn.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    (path.name, role, seed, size, kind, category, str(path), None))
                    todo.append((path.name, path, "test", self.all_datasets, m.manifest))
                    if role == "expert":  # its own category on validation: the sweep's normaliser
                        todo.append((path.name, path, "validation", self.held_in[category],
                                     m.manifest))
        return [t for t in todo if not db.done(self._eval_key(t[0], t[2], t[3]))]

    def _eval_key(self, model: str, split: str, datasets: list[str]) -> str:
        return f"eval:{model}:{split}:{_hash([datasets, self.cfg.evaluator, self.cfg.suite_params])}"

    def _evaluate(self, pool, db: ResultsDB, todo: list[tuple]) -> None:
        futures = {}
        for key, path, split, datasets, manifest in todo:
            params = {**self.cfg.evaluator, "split": split}
            f = pool.submit(jobs.evaluate, str(self.cache.root), str(path), self.cfg.suite, manifest, datasets, params)
            futures[f] = (f"{key[:8]} on {split}", key, split, datasets)
        self.reporter.stage("evaluate models", len(futures))

        def done(tag, result):
            _, key, split, datasets = tag
            spec = {"model": key, "split": split, "datasets": datasets, "evaluator": self.cfg.evaluator}
            db.complete(self._eval_key(key, split, datasets), "evaluation", spec, None, result["seconds"],
                        self._versions(), score_statements(key, split, result["scores"]))
        self._drain(futures, "evaluate models", done)

    def _sweeps(self, pool, db: ResultsDB, models: dict[tuple[int, str], _Models]) -> None:
        cfg = self.cfg
        methods = self.pm.merge_methods()
        futures = {}
        total = 0
        for (seed, size), m in models.items():
            order = expert_order(self.categories, seed)
            db.set_meta(f"expert_order:{seed}", order)
            # the largest merges (longest sweeps) first, so the workers finish together
            for n, kind, name in itertools.product(sorted(cfg.n_experts, reverse=True), cfg.base_kinds, cfg.methods):
                total += 1
                method = methods.get(name)
                categories = order[:n]
                grid = grid_for(method, cfg.search.get(name))
                expert_dirs = [str(m.experts[kind][c]) for c in categories]
                spec = {"seed": seed, "size": size, "base_kind": kind, "n": n, "method": name,
                        "plugin_version": artifacts.plugin_version(self.pm, method), "grid": grid,
                        "base": m.bases[kind].name, "experts": [Path(e).name for e in expert_dirs],
                        "evaluator": cfg.evaluator}
                key = f"sweep:{seed}:{size}:{kind}:{n}:{name}:{_hash(spec)}"
                if db.done(key):
                    continue
                expert_validation = {c: db.scores(m.experts[kind][c].name, "validation") for c in categories}
                job = {"suite": cfg.suite, "manifest": m.manifest, "base_dir": str(m.bases[kind]),
                       "expert_dirs": expert_dirs, "categories": categories, "method": name, "grid": grid,
                       "seed": seed, "eval_params": cfg.evaluator, "expert_validation": expert_validation,
                       "test_datasets": [d for c in categories for d in self.held_in[c]]
                       + [d for ds in self.held_out.values() for d in ds],
                       "output": str(self.run_dir / "merges" / f"{size}-{kind}-n{n}-{name}-seed{seed}")}
                f = pool.submit(jobs.sweep, job)
                futures[f] = (f"{name}, N={n} ({size}, {kind}, seed {seed})", key, spec, m, kind, categories, job["output"])
        self.reporter.stage("sweep merges", total)
        for _ in range(total - len(futures)):
            self.reporter.advance("sweep merges")

        def done(tag, result):
            _, key, spec, m, kind, categories, output = tag
            held_in = {c: self.held_in[c] for c in categories}
            experts_test = {c: db.scores(m.experts[kind][c].name, "test") for c in categories}
            base_test = db.scores(m.bases[kind].name, "test")
            norm = normalise(result["test_scores"], held_in, self.held_out, experts_test, base_test, on_zero="skip")
            model_key = "merge-" + _hash([key])
            statements = [("INSERT OR REPLACE INTO sweep_points VALUES (?, ?, ?, ?)",
                           (key, json.dumps(p["params"], sort_keys=True), p["held_in"], json.dumps(p["scores"])))
                          for p in result["points"]]
            statements += score_statements(model_key, "test", result["test_scores"])
            statements.append(("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (model_key, "merge", spec["seed"], spec["size"], kind, None, output, None)))
            statements.append(("INSERT OR REPLACE INTO merges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (spec["seed"], spec["size"], kind, spec["n"], spec["method"], json.dumps(categories),
                                json.dumps(result["params"], sort_keys=True), result["best"]["held_in"],
                                norm.held_in, norm.held_out, json.dumps(norm.__dict__), model_key, result["seconds"])))
            db.complete(key, "sweep", spec, {"params": result["params"]}, result["seconds"], self._versions(), statements)
        self._drain(futures, "sweep merges", done)

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
                pool.shutdown(wait=False, cancel_futures=True)
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
