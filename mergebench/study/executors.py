"""Executors: where a study's jobs run. ``local`` (worker processes on this machine, the default) and ``ray``
(Ray Core tasks on a Ray cluster: a local one, or one started across machines, e.g. under SLURM).

Every executor takes :class:`~mergebench.study.jobs.Job` objects and returns concurrent futures of their
results; the runner, in the driver process, is the only writer of the results database. A job declares
the resources it needs (:class:`~mergebench.study.contracts.Resources`) and the executor places it.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from mergebench.core.errors import InputError, MergebenchError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.registry import Param
from mergebench.study.components import Executor
from mergebench.study import jobs


@dataclass(frozen=True)
class ExecutorOptions:
    """What the runner tells an executor when it starts one.

    ``workers``: how many jobs to run at once where the executor decides (the local pool's size).
    ``source``: the fingerprint of mergebench's source the run started with; jobs refuse to run other code.
    ``env``: environment variables every worker needs (MERGEBENCH_HOME, plugin selection, offline flags).
    """

    workers: int = 1
    source: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)


class JobPool(Protocol):
    """What ``Executor.start`` returns."""

    def submit(self, job: jobs.Job) -> Future: ...

    def shutdown(self, cancel: bool = False) -> None: ...


def worker_env() -> dict[str, str]:
    """The environment a worker on another process or machine needs to act as this one."""
    names = ("MERGEBENCH_HOME", "MERGEBENCH_LOAD_PLUGINS", "MERGEBENCH_PLUGINS", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE",
             "HF_DATASETS_OFFLINE", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONPATH")
    return {n: os.environ[n] for n in names if n in os.environ}


# ---- local -----------------------------------------------------------------------------------------

class _Deferred(Future):
    """A job that runs in this process when the runner first waits for it."""

    def __init__(self, job: jobs.Job, source: str | None):
        super().__init__()
        self._job, self._source = job, source

    def run_now(self) -> None:
        if self.done():
            return
        try:
            self.set_result(jobs.run_job(self._job, self._source))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, like a pool's
            self.set_exception(exc)


class InlinePool:
    """Jobs run one at a time in this process as the runner drains them (workers = 1), so each is recorded
    before the next starts: a kill loses at most the one running."""

    sequential = True

    def __init__(self, source: str | None):
        self.source = source

    def submit(self, job: jobs.Job) -> Future:
        return _Deferred(job, self.source)

    def shutdown(self, cancel: bool = False) -> None: ...


class ProcessPool:
    """Worker processes on this machine (spawned, one CPU thread each)."""

    sequential = False

    def __init__(self, workers: int, source: str | None):
        import multiprocessing

        self.source = source
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=jobs.init_worker, initargs=(1, source))

    def submit(self, job: jobs.Job) -> Future:
        return self._pool.submit(jobs.run_job, job, self.source)

    def shutdown(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)


def start_local(params: Mapping[str, Any], options: ExecutorOptions) -> JobPool:
    workers = params.get("workers") or options.workers
    return InlinePool(options.source) if workers == 1 else ProcessPool(workers, options.source)


# ---- ray -------------------------------------------------------------------------------------------

def _ray_task(job: jobs.Job, source: str | None) -> Any:
    """A job in a Ray worker: threads as the job's CPUs, then the usual source check and run."""
    jobs.init_worker(max(1, int(job.resources.cpus)), source)
    return jobs.run_job(job, source)


class RayPool:
    """Each job a Ray task with the job's resources; lost workers and failed nodes are retried by Ray."""

    sequential = False

    def __init__(self, params: Mapping[str, Any], options: ExecutorOptions):
        try:
            import ray
        except ImportError:
            raise InputError("the ray executor needs Ray: pip install 'mergebench[ray]'") from None
        self.ray, self.source, self.params = ray, options.source, params
        self._started = False
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        runtime_env = {"env_vars": {**worker_env(), **options.env}}
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"runtime_env": runtime_env, "include_dashboard": False,
                                      "log_to_driver": bool(params["log_to_driver"])}
            if params["address"]:
                kwargs["address"] = params["address"]
            else:
                kwargs.update(num_cpus=params["num_cpus"] or options.workers, num_gpus=params["num_gpus"])
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise InputError(f"ray executor: cannot reach the Ray cluster at {params['address']!r} ({exc})") from None
            self._started = True
        self._remote = ray.remote(_ray_task)
        self._refs: list = []

    def submit(self, job: jobs.Job) -> Future:
        r = job.resources
        options: dict[str, Any] = {"num_cpus": r.cpus, "num_gpus": r.gpus, "max_retries": self.params["max_retries"],
                                   # a worker that raises an OSError (a node's disk, a lost mount) is retried
                                   # too; an error in the user's input or a plugin is not: it would fail again
                                   "retry_exceptions": [OSError]}
        if r.memory_bytes:
            options["memory"] = r.memory_bytes
        ref = self._remote.options(**options).remote(job, self.source)
        self._refs.append(ref)
        return _unwrap_ray(ref.future(), self.ray)

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self._refs:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - already finished or gone
                    pass
        if self._started:
            self.ray.shutdown()


def _unwrap_ray(future: Future, ray) -> Future:
    """A future whose exception is the job's own (Ray wraps it in a RayTaskError) or one clear line."""
    out: Future = Future()

    def done(f: Future) -> None:
        exc = f.exception()
        if exc is None:
            out.set_result(f.result())
            return
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            out.set_exception(cause)
        elif isinstance(exc, ray.exceptions.WorkerCrashedError):
            out.set_exception(MergebenchError(f"a Ray worker died while running a job and its retries ran out ({exc})"))
        else:
            out.set_exception(exc)
    future.add_done_callback(done)
    return out


def start_ray(params: Mapping[str, Any], options: ExecutorOptions) -> JobPool:
    return RayPool(params, options)


@hookimpl
def register_executors(register: Callable[[Executor], None]) -> None:
    register(Executor(
        name="local",
        description="Worker processes on this machine (one CPU thread each); workers = 1 runs jobs in-process.",
        params=(Param("workers", int, 0, "processes (0: the config's `workers`)", min=0),),
        start=start_local))
    register(Executor(
        name="ray",
        description="Ray Core tasks on a Ray cluster, each placed by the CPUs/GPUs/memory its job declares; "
                    "lost workers are retried. Models travel through the shared filesystem, never the object store.",
        reference="Moritz et al., Ray: A Distributed Framework for Emerging AI Applications, OSDI 2018",
        params=(Param("address", str, "", "cluster address ('auto': the running cluster; empty: start a local one)"),
                Param("num_cpus", int, 0, "CPUs of a local cluster (0: the config's `workers`)", min=0),
                Param("num_gpus", int, 0, "GPUs of a local cluster (logical ones work for placement tests)", min=0),
                Param("max_retries", int, 3, "times a job whose worker died is retried", min=0),
                Param("log_to_driver", bool, False, "show workers' output in this terminal")),
        start=start_ray))
