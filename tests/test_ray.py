"""The Ray executor on a local Ray cluster (2 CPUs, 2 logical GPUs): the same leaderboard as the local
executor, jobs placed by the resources they declare, and a worker killed mid-job retried."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_resume import env_for
from toy_study import write_config

ray = pytest.importorskip("ray")


def run(config, run_dir, env, *extra):
    done = subprocess.run([sys.executable, "-m", "mergebench", "run", str(config), "--run-dir", str(run_dir),
                           "--no-leaderboard", *extra], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def board(run_dir, env):
    done = subprocess.run([sys.executable, "-m", "mergebench", "leaderboard", str(run_dir), "--format", "json"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [{k: r[k] for k in ("key", "held_in", "held_out", "params")} for r in json.loads(done.stdout)]


def test_ray_gives_the_local_leaderboard_and_retries_a_killed_worker(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(tmp_path / "c.yaml", seeds=[0], n_experts=[2], methods=["average", "task_arithmetic", "ties"],
                          search={"task_arithmetic": {"lambda": [0.5, 1.0]}, "ties": {"lambda": [1.0], "density": [0.5]}},
                          expert_trainer="pause_finetune")
    local_env = env_for(tmp_path / "home-local")
    run(config, tmp_path / "local", local_env)
    # separate caches: the Ray run trains, evaluates and merges everything itself
    ray_env = env_for(tmp_path / "home-ray", TOY_DIE_AT="train", TOY_PAUSE_DIR=str(markers), RAY_AUTH_MODE="disabled")
    run(config, tmp_path / "ray", ray_env, "--executor", "ray")
    assert (markers / "died-train").exists()  # a worker did die mid-job, and the run still finished
    assert board(tmp_path / "ray", ray_env) == board(tmp_path / "local", local_env)


def test_jobs_get_the_gpus_they_declare(tmp_path):
    """On a cluster with 2 logical GPUs, a job that asks for one GPU sees exactly one device."""
    from mergebench.study.contracts import Resources
    from mergebench.study.executors import ExecutorOptions, start_ray

    class Probe:
        resources = Resources(cpus=1, gpus=1)
        label = "probe"

        def run(self):
            return os.environ.get("CUDA_VISIBLE_DEVICES")

    os.environ["RAY_AUTH_MODE"] = "disabled"
    pool = start_ray({"address": "", "num_cpus": 2, "num_gpus": 2, "max_retries": 0, "log_to_driver": False},
                     ExecutorOptions(workers=2, env={"PYTHONPATH": os.pathsep.join(sys.path)}))
    try:
        seen = [f.result(timeout=120) for f in [pool.submit(Probe()) for _ in range(4)]]
    finally:
        pool.shutdown()
    assert set(seen) <= {"0", "1"} and all(len(s) == 1 for s in seen)


def test_jobs_are_placed_on_the_node_that_has_what_they_ask(tmp_path):
    """On a simulated two-node cluster (one node without GPUs, one with), GPU jobs land on the GPU node and
    CPU-only jobs may land anywhere; the executor connects to the cluster by its address."""
    from ray.cluster_utils import Cluster

    from mergebench.study.contracts import Resources
    from mergebench.study.executors import ExecutorOptions, start_ray

    class Where:
        label = "where"

        def __init__(self, gpus):
            self.resources = Resources(cpus=1, gpus=gpus)

        def run(self):
            import ray

            return ray.get_runtime_context().get_node_id()

    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    try:
        pool = start_ray({"address": cluster.address, "num_cpus": 0, "num_gpus": 0, "max_retries": 0,
                          "log_to_driver": False},
                         ExecutorOptions(workers=2, env={"PYTHONPATH": os.pathsep.join(sys.path)}))
        try:
            on_gpu = {f.result(timeout=120) for f in [pool.submit(Where(1)) for _ in range(3)]}
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
    assert on_gpu == {gpu_node.node_id}
