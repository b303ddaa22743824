"""The run configuration: what to build, merge and evaluate; validated in full before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mergebench.core.errors import InputError, ParameterError
from mergebench.core.plugin_manager import PluginManager
from mergebench.core.registry import _unknown_message

BASE_KINDS = ("pretrained", "instruction_tuned")

EXAMPLE = """\
# mergebench run configuration. Every key is optional; the values shown are the defaults
# (the built-in study in miniature: `mergebench run` with no config runs exactly this).

suite: micro-t0              # a registered suite with generated data (`mergebench suite list`)
suite_params:                # passed to the suite's generator
  train: 2000                # training examples per held-in dataset
  validation: 40             # validation examples per dataset: lambda and density are chosen here
  test: 200                  # test examples per dataset: what the leaderboard reports
seeds: [0]                   # each seed is a full replicate: data, bases, experts, expert order
sizes: [tiny]                # tiny (0.33M parameters), small (1.2M), medium (4.5M)
base_kinds: [pretrained, instruction_tuned]
n_experts: [2, 4, 8]         # how many experts each merge combines (a seeded order picks which)
methods: [average, task_arithmetic, ties, dare_ties]   # or "all" for every registered method
search: {}                   # override a method's search space, e.g. {ties: {lambda: [0.5, 1.0], density: [0.2]}}
pretrain: {}                 # parameters of the `pretrain` base preparer, e.g. {steps: 800, lr: 0.003}
instruction_tune: {}         # parameters of the `instruction_tune` base preparer
expert_trainer: full_finetune
expert: {}                   # parameters of the expert trainer, e.g. {steps: 300}
multitask: {}                # parameters of the `multitask` trainer (the baseline)
evaluator: {batch_size: 64}
workers: 2                   # processes for training and evaluation (one CPU thread each)
"""


@dataclass
class RunConfig:
    suite: str = "micro-t0"
    suite_params: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    sizes: list[str] = field(default_factory=lambda: ["tiny"])
    base_kinds: list[str] = field(default_factory=lambda: list(BASE_KINDS))
    n_experts: list[int] = field(default_factory=lambda: [2, 4, 8])
    methods: list[str] | str = field(default_factory=lambda: ["average", "task_arithmetic", "ties", "dare_ties"])
    search: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    instruction_tune: dict[str, Any] = field(default_factory=dict)
    expert_trainer: str = "full_finetune"
    expert: dict[str, Any] = field(default_factory=dict)
    multitask: dict[str, Any] = field(default_factory=dict)
    evaluator: dict[str, Any] = field(default_factory=lambda: {"batch_size": 64})
    workers: int = 2

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _list(value: Any, key: str, kind: type) -> list:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise InputError(f"config key '{key}': expected a non-empty list of {kind.__name__}, got {value!r}")
    if len(set(values)) != len(values):
        raise InputError(f"config key '{key}': repeated values in {values}")
    return values


def parse(data: dict[str, Any], pm: PluginManager, where: str = "config") -> RunConfig:
    """A validated RunConfig: unknown keys, methods, parameters or values are one clear error."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    known = [f.name for f in fields(RunConfig)]
    for key in data:
        if key not in known:
            raise InputError(_unknown_message(f"key '{key}'", where, known))
    cfg = RunConfig(**data)
    suite = pm.suites().get(cfg.suite)
    if suite.build is None:
        raise InputError(f"{where}: suite '{cfg.suite}' has no generated data; `mergebench run` needs one that does "
                         f"(evaluate hub suites with `mergebench eval`)")
    cfg.suite_params = suite.resolve_params(cfg.suite_params or {})
    cfg.seeds = _list(cfg.seeds, "seeds", int)
    from mergebench.training import SIZES

    cfg.sizes = _list(cfg.sizes, "sizes", str)
    for s in cfg.sizes:
        if s not in SIZES:
            raise InputError(_unknown_message(f"size '{s}'", where, SIZES))
    cfg.base_kinds = _list(cfg.base_kinds, "base_kinds", str)
    for k in cfg.base_kinds:
        if k not in BASE_KINDS:
            raise InputError(_unknown_message(f"base kind '{k}'", where, BASE_KINDS))
    n_categories = len(suite.held_in)
    cfg.n_experts = _list(cfg.n_experts, "n_experts", int)
    for n in cfg.n_experts:
        if not 2 <= n <= n_categories:
            raise InputError(f"{where}: n_experts {n} is outside 2..{n_categories} (the suite's held-in categories)")
    methods = pm.merge_methods()
    cfg.methods = methods.names() if cfg.methods == "all" else _list(cfg.methods, "methods", str)
    for m in cfg.methods:
        methods.get(m)  # unknown method: a did-you-mean error
    if not isinstance(cfg.search, dict):
        raise InputError(f"{where}: 'search' must map method -> parameter -> list of values")
    for m, space in cfg.search.items():
        method = methods.get(m)
        if not isinstance(space, dict):
            raise InputError(f"{where}: search.{m} must map parameter -> list of values")
        for p, values in space.items():
            names = [q.name for q in method.params]
            if p not in names:
                raise ParameterError(_unknown_message(f"parameter '{p}'", f"search.{m}", names))
            param = method.param(p)
            for v in _list(values, f"search.{m}.{p}", object):
                param.coerce(v, f"merge method '{m}'")
    preparers, trainers = pm.base_preparers(), pm.expert_trainers()
    cfg.pretrain = preparers.get("pretrain").resolve_params({**cfg.pretrain, "size": cfg.sizes[0]})
    cfg.pretrain.pop("size")
    cfg.instruction_tune = preparers.get("instruction_tune").resolve_params(cfg.instruction_tune)
    cfg.expert = trainers.get(cfg.expert_trainer).resolve_params(cfg.expert)
    cfg.multitask = trainers.get("multitask").resolve_params(cfg.multitask)
    cfg.evaluator = pm.evaluators().get("lm-eval").resolve_params(cfg.evaluator)
    if not isinstance(cfg.workers, int) or isinstance(cfg.workers, bool) or cfg.workers < 1:
        raise ParameterError(f"{where}: workers must be an integer >= 1, got {cfg.workers!r}")
    return cfg


def load(path: Path | None, pm: PluginManager) -> RunConfig:
    """The config in ``path`` (YAML), or the built-in default when None."""
    if path is None:
        return parse({}, pm, "default config")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse(data or {}, pm, str(path))
