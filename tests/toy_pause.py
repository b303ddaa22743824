"""Test plugin: the toy study's components under other names, one of which stops for a minute in a chosen
phase (``TOY_PAUSE_AT`` = prepare | train | evaluate | merge), once per marker directory (``TOY_PAUSE_DIR``),
so a test can SIGKILL a run at a known point and resume it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import mergebench_toy_study as toy
from mergebench import hookimpl
from mergebench.core.registry import MergeMethod
from mergebench.study.components import BasePreparer, Evaluator, ExpertTrainer


def pause(phase: str) -> None:
    if os.environ.get("TOY_PAUSE_AT") != phase:
        return
    marker = Path(os.environ["TOY_PAUSE_DIR"]) / phase
    try:
        marker.touch(exist_ok=False)  # only the first caller stops
    except FileExistsError:
        return
    time.sleep(60)


def die(phase: str) -> None:
    """The first caller in ``TOY_DIE_AT``'s phase kills its own process, as a lost worker or node would."""
    if os.environ.get("TOY_DIE_AT") != phase:
        return
    marker = Path(os.environ["TOY_PAUSE_DIR"]) / f"died-{phase}"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def prepare(params, workdir, inputs):
    pause("prepare")
    return toy.toy_init(params, workdir, inputs)


def train(base, data, params, workdir, on_step=None, device="cpu"):
    pause("train")
    die("train")
    return toy.toy_finetune(base, data, params, workdir, on_step, device)


class Session(toy.ToySession):
    def evaluate(self, state_dict=None):
        if self.params["split"] == "test":
            pause("evaluate")
        return super().evaluate(state_dict)


def mean_merge(base, experts, params, ctx):
    pause("merge")
    return sum(experts) / len(experts)


@hookimpl
def register_base_preparers(register):
    register(BasePreparer(name="pause_init", description="toy_init, pausing", params=(), prepare=lambda p, w, i: prepare(
        {"dim": 8, "noise": 0.05, "seed": 0}, w, i)))


@hookimpl
def register_expert_trainers(register):
    register(ExpertTrainer(name="pause_finetune", description="toy_finetune, pausing", train=lambda b, d, p, w, **kw: train(
        b, d, {"rate": 1.0, "noise": 0.05, "seed": 0}, w, **kw)))


@hookimpl
def register_evaluators(register):
    from mergebench.core.registry import Param

    register(Evaluator(name="pause_score", description="toy_score, pausing",
                       params=(Param("split", str, "test", "split", choices=("validation", "test")),
                               Param("sharpness", float, 4.0, "sharpness")),
                       session=lambda m, s, d, ds, p: Session(Path(m), d, list(ds), p)))


@hookimpl
def register_merge_methods(register):
    register(MergeMethod(name="pause_average", description="the mean, pausing", merge=mean_merge, needs_base=False))
