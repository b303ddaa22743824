"""The study's component kinds: suites, base preparers, expert trainers, evaluators and executors.

Each is a :class:`~mergebench.core.registry.Component` (name, description, reference, typed parameters)
with the callables its contract names; docs/plugins.md documents each contract with an example. They
register themselves with the plugin manager as the component kinds of their registration hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from mergebench.core.plugin_manager import add_component_kind
from mergebench.core.registry import Component


@dataclass(frozen=True)
class BasePreparer(Component):
    """Builds or loads a base model: ``prepare(params, workdir, inputs) -> model directory``.

    ``inputs`` is a :class:`mergebench.study.contracts.PrepareInputs` (the run's suite data, the source
    base when it starts from another, device, progress callback). ``cached=False`` for a preparer that
    only points at an existing model (``load``): it is called with ``workdir=None`` and returns that path.
    """

    prepare: Callable[..., Any] | None = None
    cached: bool = True
    needs_source: bool = False  # True: it starts from another base (``from:`` in the config, --base on the CLI)

    @property
    def kind(self) -> str:
        return "base preparer"


@dataclass(frozen=True)
class ExpertTrainer(Component):
    """Fine-tunes a base into an expert: ``train(base, data, params, workdir, *, on_step, device) -> model
    directory``; ``data`` is the list of training JSONL files (``query``/``answer`` or multiple-choice rows)."""

    train: Callable[..., Any] | None = None

    @property
    def kind(self) -> str:
        return "expert trainer"


class Scores(dict):
    """What an evaluator may return for one model instead of a plain ``{dataset: score}`` dict: the same dict,
    plus ``examples[dataset]``: the metric's value on each example of the split, in the dataset's order, whose
    mean is the dataset's score (lm-eval's per-sample results). The study keeps them so that intervals and paired
    tests can be computed from the run (:mod:`mergebench.study.per_example`); without them, statistics are over
    seeds only."""

    def __init__(self, scores: Mapping[str, float] | None = None, examples: Mapping[str, Any] | None = None):
        super().__init__(scores or {})
        self.examples = dict(examples or {})


@dataclass(frozen=True)
class Evaluator(Component):
    """Scores models on a suite: ``evaluate(models, suite, manifest, datasets, params) -> [per-dataset scores]``.

    ``session(model_dir, suite, manifest, datasets, params)``, when given, returns an object whose
    ``evaluate(state_dict=None)`` scores the loaded model, or another one's weights swapped in: what
    sweeps use to evaluate many merges without reloading tasks or models. Either may return :class:`Scores`
    (a dict with per-example values) instead of a plain dict.
    """

    evaluate: Callable[..., Any] | None = None
    session: Callable[..., Any] | None = None
    # () -> dict of whatever else decides scores besides the evaluator's own source and parameters (library
    # versions, scoring code): part of the evaluation cache's key
    identity: Callable[[], dict[str, Any]] | None = None

    @property
    def kind(self) -> str:
        return "evaluator"


@dataclass(frozen=True)
class Executor(Component):
    """Runs a study's jobs somewhere: ``start(params, options) -> pool``.

    ``options`` is a :class:`mergebench.study.executors.ExecutorOptions` (worker count, the source
    fingerprint jobs must match, environment for workers). The pool has ``submit(job) -> Future`` (the
    future's result is ``job.run()``'s) and ``shutdown(cancel=False)``.
    """

    start: Callable[..., Any] | None = None

    @property
    def kind(self) -> str:
        return "executor"


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a suite: its task format and the metric its category is scored by."""

    name: str
    output_type: str  # "multiple_choice" or "generate_until"
    metric: str  # "acc", "exact_match" or "rouge_l"


@dataclass(frozen=True)
class Suite(Component):
    """A benchmark suite as data: held-in and held-out categories -> datasets, and how to get them.

    ``build(directory, seed, params) -> manifest`` writes a generated suite (JSONL splits, corpus,
    tokenizer) and returns its manifest (``files[dataset][split]`` absolute paths); suites of hub
    datasets have ``task_dir`` instead: lm-eval YAML configs that resolve their data themselves.
    """

    held_in: Mapping[str, tuple[DatasetSpec, ...]] = field(default_factory=dict)
    held_out: Mapping[str, tuple[DatasetSpec, ...]] = field(default_factory=dict)
    build: Callable[..., dict] | None = None
    task_dir: str | None = None
    version: str = "1"

    @property
    def kind(self) -> str:
        return "suite"

    def datasets(self, group: str | None = None) -> dict[str, DatasetSpec]:
        groups = [self.held_in, self.held_out] if group is None else [getattr(self, group)]
        return {d.name: d for g in groups for specs in g.values() for d in specs}

    def category_of(self, dataset: str) -> str:
        for group in (self.held_in, self.held_out):
            for category, specs in group.items():
                if any(d.name == dataset for d in specs):
                    return category
        raise KeyError(dataset)


add_component_kind("register_base_preparers", "base preparer", BasePreparer)
add_component_kind("register_expert_trainers", "expert trainer", ExpertTrainer)
add_component_kind("register_evaluators", "evaluator", Evaluator)
add_component_kind("register_suites", "suite", Suite)
add_component_kind("register_executors", "executor", Executor)
