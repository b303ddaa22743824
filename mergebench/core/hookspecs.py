"""The hooks a mergebench plugin can implement.

Registration hooks receive a ``register`` callback (as in simonw/llm); call it once per component.
Import ``hookimpl`` from ``mergebench`` to implement them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:  # pragma: no cover
    import click

    from mergebench.core.registry import MergeMethod
    from mergebench.study.components import BasePreparer, Evaluator, Executor, ExpertTrainer, Suite
    from mergebench.core.tensor_io import ModelSource

hookspec = HookspecMarker("mergebench")
hookimpl = HookimplMarker("mergebench")


@hookspec
def register_merge_methods(register: Callable[[MergeMethod], None]) -> None:
    """Register merge methods by calling ``register(MergeMethod(...))`` for each."""


@hookspec
def register_base_preparers(register: Callable[[BasePreparer], None]) -> None:
    """Register ways to build or load a base model by calling ``register(BasePreparer(...))``."""


@hookspec
def register_expert_trainers(register: Callable[[ExpertTrainer], None]) -> None:
    """Register ways to turn a base into an expert by calling ``register(ExpertTrainer(...))``."""


@hookspec
def register_evaluators(register: Callable[[Evaluator], None]) -> None:
    """Register model evaluators by calling ``register(Evaluator(...))``."""


@hookspec
def register_executors(register: Callable[[Executor], None]) -> None:
    """Register ways to run a study's jobs (local processes, a Ray cluster, ...) with ``register(Executor(...))``."""


@hookspec
def register_suites(register: Callable[[Suite], None]) -> None:
    """Register benchmark suites (held-in/held-out categories and their datasets) with ``register(Suite(...))``."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``mergebench`` command line group."""


@hookspec(firstresult=True)
def resolve_model(reference: str, allow_pickle: bool) -> ModelSource | None:
    """Open a model reference (path, hub id, ...) as a ModelSource, or return None if it is not yours."""
