"""The run configuration: what to build, merge and evaluate; validated in full before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergebench.core.errors import InputError, ParameterError
from mergebench.core.plugin_manager import PluginManager
from mergebench.core.registry import _unknown_message
from mergebench.study.contracts import CALIBRATION_SPLITS, BaseChoice, CalibrationSettings, ComponentChoice

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
methods: [average, task_arithmetic, ties, dare_ties]   # or "all": every registered method that can merge N experts
draws: 1                     # stochastic methods (dare_ties): K merges per seed, each its own random draw
calibration: {split: train, samples: 128, max_length: 256}  # data-aware methods (regmean, fisher): each
                             # expert's statistics from its own category's split (train or validation, never test)
search: {}                   # override a method's search space, e.g. {ties: {lambda: [0.5, 1.0], density: [0.2]}}
pretrain: {}                 # parameters of the `pretrain` base preparer, e.g. {steps: 800, lr: 0.003}
instruction_tune: {}         # parameters of the `instruction_tune` base preparer
expert_trainer: full_finetune
expert: {}                   # parameters of the expert trainer, e.g. {steps: 300}
multitask: {}                # parameters of the `multitask` trainer (the baseline)
evaluator: {batch_size: 64}  # lm-eval's parameters; or {name: EVALUATOR, params: {...}} for another
workers: 2                   # processes for training and evaluation (one CPU thread each)
# executor: local            # or {name: ray, params: {address: auto}} (pip install 'mergebench[ray]')
# device: cpu                # cuda: every stage on the GPU (jobs get theirs from the executor)
# sweep_memory_gib: 16       # host memory a sweep may hold weights in; beyond it, points merge to disk
#
# Real models: `bases` replaces sizes / base_kinds / pretrain / instruction_tune, naming each base's preparer:
# bases:
#   - {size: 7b, kind: pretrained, preparer: load, params: {model: Qwen/Qwen2.5-7B}}
#   - {size: 7b, kind: instruction_tuned, preparer: load, params: {model: Qwen/Qwen2.5-7B-Instruct}}
# expert_trainer: {name: hf_trainer, params: {steps: 2000, lr: 3.0e-5, bf16: true}}
# multitask: {name: hf_trainer, params: {steps: 8000}}     # or false: no multitask baseline
# See examples/configs/paper-scale.yaml and `mergebench run CONFIG --plan`.
"""


@dataclass
class RunConfig:
    """A validated run configuration. Every component is named by its registered name (no name is fixed in
    code); ``to_dict`` gives the canonical form, which ``parse`` accepts again."""

    suite: str = "micro-t0"
    suite_params: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    n_experts: list[int] = field(default_factory=lambda: [2, 4, 8])
    methods: list[str] = field(default_factory=lambda: ["average", "task_arithmetic", "ties", "dare_ties"])
    # random draws per seed of each stochastic method (its sweep repeated with other merge seeds)
    draws: int = 1
    # data-aware methods' calibration data (each expert's own category, from the train or validation split)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    # method -> {N: why} for the (method, N) pairs the study skips: the method's own check refuses N experts (a
    # two-model method at N >= 2); with methods: all, a method that can merge none of the N is left out of methods
    unmergeable: dict[str, dict[int, str]] = field(default_factory=dict)
    search: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    bases: list[BaseChoice] = field(default_factory=list)
    expert_trainer: ComponentChoice = field(default_factory=lambda: ComponentChoice("full_finetune"))
    multitask: ComponentChoice | None = field(default_factory=lambda: ComponentChoice("multitask"))
    evaluator: ComponentChoice = field(default_factory=lambda: ComponentChoice("lm-eval"))
    executor: ComponentChoice = field(default_factory=lambda: ComponentChoice("local"))
    workers: int = 2
    device: str = "cpu"
    storage: str | None = None  # a directory every worker sees (shared filesystem) for run outputs; None: run dir
    # host memory a sweep may fill with the base's and experts' weights to score grid points without writing
    # them; larger merges have each point written by the streaming engine and scored from disk
    sweep_memory_gib: float = 16.0

    @property
    def sizes(self) -> list[str]:
        return list(dict.fromkeys(b.size for b in self.bases if b.studied))

    @property
    def base_kinds(self) -> list[str]:
        """The kinds of base the study compares (a base built only as another's source is not one)."""
        return list(dict.fromkeys(b.kind for b in self.bases if b.studied))

    def base(self, size: str, kind: str) -> BaseChoice:
        return next(b for b in self.bases if b.size == size and b.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "suite_params": dict(self.suite_params), "seeds": list(self.seeds),
                "n_experts": list(self.n_experts), "methods": list(self.methods), "draws": self.draws,
                "calibration": self.calibration.to_dict(), "search": self.search,
                "bases": [b.to_dict() for b in self.bases], "expert_trainer": self.expert_trainer.to_dict(),
                "multitask": None if self.multitask is None else self.multitask.to_dict(),
                "evaluator": self.evaluator.to_dict(), "executor": self.executor.to_dict(),
                "workers": self.workers, "device": self.device, "storage": self.storage,
                "sweep_memory_gib": self.sweep_memory_gib}


KNOWN_KEYS = ("suite", "suite_params", "seeds", "sizes", "base_kinds", "n_experts", "methods", "draws", "calibration",
              "search",
              "bases",
              "pretrain", "instruction_tune", "expert_trainer", "expert", "multitask", "evaluator", "executor",
              "workers", "device", "storage", "sweep_memory_gib")


def _list(value: Any, key: str, kind: type) -> list:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise InputError(f"config key '{key}': expected a non-empty list of {kind.__name__}, got {value!r}")
    if len(set(map(repr, values))) != len(values):
        raise InputError(f"config key '{key}': repeated values in {values}")
    return values


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"config key '{key}': expected a mapping, got {value!r}")
    return dict(value)


def _choice(value: Any, key: str, registry, default: str, legacy_params: Any = None) -> ComponentChoice:
    """A component named by ``value``: a name, ``{name: ..., params: {...}}``, or (the older form) a mapping
    of the default component's parameters. Unknown names and parameters are did-you-mean errors."""
    params: dict[str, Any] = _mapping(legacy_params, key)
    if value is None:
        name = default
    elif isinstance(value, str):
        name = value
    elif isinstance(value, dict):
        value = dict(value)
        if "name" in value or "params" in value:
            name = value.pop("name", default)
            params.update(_mapping(value.pop("params", None), f"{key}.params"))
            if value:
                raise InputError(f"config key '{key}': unknown field(s) {sorted(value)} (valid: name, params)")
        else:
            name, params = default, {**params, **value}
    else:
        raise InputError(f"config key '{key}': expected a component name or {{name, params}}, got {value!r}")
    if not isinstance(name, str):
        raise InputError(f"config key '{key}': the component name must be a string, got {name!r}")
    component = registry.get(name)
    return ComponentChoice(name, component.resolve_params(params))


def _sets(value: Any, param: str) -> bool:
    """Whether a component's config entry sets ``param`` explicitly."""
    if not isinstance(value, dict):
        return False
    return param in value or param in (value.get("params") or {})


def _legacy_bases(data: dict[str, Any], pm: PluginManager, where: str) -> list[dict[str, Any]]:
    """The micro suite's keys (sizes, base_kinds, pretrain, instruction_tune) as ``bases`` entries."""
    from mergebench.training import SIZES

    sizes = _list(data.get("sizes", ["tiny"]), "sizes", str)
    for s in sizes:
        if s not in SIZES:
            raise InputError(_unknown_message(f"size '{s}'", where, SIZES))
    kinds = _list(data.get("base_kinds", list(BASE_KINDS)), "base_kinds", str)
    for k in kinds:
        if k not in BASE_KINDS:
            raise InputError(_unknown_message(f"base kind '{k}'", where, BASE_KINDS))
    pretrain = _mapping(data.get("pretrain"), "pretrain")
    tune = _mapping(data.get("instruction_tune"), "instruction_tune")
    out = []
    for size in sizes:
        out.append({"size": size, "kind": "pretrained", "preparer": "pretrain", "params": {**pretrain, "size": size}})
        if "instruction_tuned" in kinds:
            out.append({"size": size, "kind": "instruction_tuned", "preparer": "instruction_tune", "params": tune,
                        "from": "pretrained"})
    keep = [b for b in out if b["kind"] in kinds or any(o.get("from") == b["kind"] and o["kind"] in kinds for o in out)]
    for b in keep:  # a pretrained base built only to be instruction-tuned is marked so the study skips it
        b["study"] = b["kind"] in kinds
    return keep


def _bases(entries: Any, pm: PluginManager, where: str) -> list[BaseChoice]:
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{where}: 'bases' must be a non-empty list of {{size, kind, preparer, params, from}}")
    out: list[BaseChoice] = []
    preparers = pm.base_preparers()
    for i, entry in enumerate(entries):
        key = f"bases[{i}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: {key} must be a mapping with size, kind, preparer, params (and from)")
        unknown = set(entry) - {"size", "kind", "preparer", "params", "from", "study"}
        if unknown:
            raise InputError(_unknown_message(f"field '{sorted(unknown)[0]}'", f"{where} {key}",
                                              ["size", "kind", "preparer", "params", "from", "study"]))
        size, kind = entry.get("size", "model"), entry.get("kind", "pretrained")
        if not isinstance(size, str) or not isinstance(kind, str):
            raise InputError(f"{where}: {key}: size and kind are labels (strings)")
        if "preparer" not in entry:
            raise InputError(f"{where}: {key} names no preparer (e.g. preparer: load, params: {{model: ...}})")
        preparer = _choice({"name": entry["preparer"], "params": entry.get("params")}, key, preparers, "")
        source = entry.get("from")
        if preparers.get(preparer.name).needs_source and source is None:
            raise InputError(f"{where}: {key} ({size}, {kind}): base preparer '{preparer.name}' starts from another "
                             f"base; name it with from: (e.g. from: pretrained)")
        if source is not None and not any(b.size == size and b.kind == source for b in out):
            raise InputError(f"{where}: {key} ({size}, {kind}) starts from base kind '{source}', which no earlier "
                             f"entry of size '{size}' defines")
        if any(b.size == size and b.kind == kind for b in out):
            raise InputError(f"{where}: two bases are ({size}, {kind}); each (size, kind) once")
        studied = entry.get("study", True)
        if not isinstance(studied, bool):
            raise InputError(f"{where}: {key}: study must be true or false")
        out.append(BaseChoice(size, kind, preparer, source, studied))
    if not any(b.studied for b in out):
        raise InputError(f"{where}: every base has study: false; nothing to compare")
    return out


def _calibration(given: Any, where: str) -> CalibrationSettings:
    """The ``calibration`` key: a mapping of CalibrationSettings' fields; test data is refused."""
    if given is None:
        return CalibrationSettings()
    if not isinstance(given, dict):
        raise InputError(f"{where}: calibration must be a mapping, e.g. {{split: train, samples: 128}}")
    defaults = CalibrationSettings()
    known = list(defaults.to_dict())
    for key in given:
        if key not in known:
            raise InputError(_unknown_message(f"key '{key}'", f"{where}: calibration", known))
    split = given.get("split", defaults.split)
    if split not in CALIBRATION_SPLITS:
        why = " (test data is what the leaderboard reports: no method may learn from it)" if split == "test" else ""
        raise InputError(f"{where}: calibration.split must be {' or '.join(CALIBRATION_SPLITS)}, got {split!r}{why}")
    values = {}
    for key, least in (("samples", 1), ("max_length", 2), ("batch_size", 1), ("seed", None)):
        value = given.get(key, getattr(defaults, key))
        if not isinstance(value, int) or isinstance(value, bool) or (least is not None and value < least):
            raise InputError(f"{where}: calibration.{key} must be an integer"
                             f"{'' if least is None else f' >= {least}'}, got {value!r}")
        values[key] = value
    return CalibrationSettings(split, **values)


def _cannot_merge(method, cfg: RunConfig) -> dict[int, str]:
    """{N: why} for each N of the study that ``method`` cannot merge: its check refuses N experts at some point of its
    grid.

    The study merges N experts of equal weight 1 onto a base, over the method's search space (or the config's
    override of it): each (N, grid point) goes through the method's ``check``, as a merge would."""
    from mergebench.core.errors import MergebenchError
    from mergebench.study.runner import grid_for

    out: dict[int, str] = {}
    grid = [method.resolve_params(point) for point in grid_for(method, cfg.search.get(method.name))]
    if method.check is None:
        return out
    for n in cfg.n_experts:
        for params in grid:
            try:
                method.check(params, (1.0,) * n)
            except MergebenchError as exc:
                out[n] = str(exc)
                break
    return out


def parse(data: dict[str, Any], pm: PluginManager, where: str = "config") -> RunConfig:
    """A validated RunConfig: unknown keys, components, parameters or values are one clear error."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    for key in data:
        if key not in KNOWN_KEYS:
            raise InputError(_unknown_message(f"key '{key}'", where, KNOWN_KEYS))
    cfg = RunConfig()
    cfg.suite = data.get("suite", cfg.suite)
    suite = pm.suites().get(cfg.suite)
    if suite.build is None:
        raise InputError(f"{where}: suite '{cfg.suite}' has no generated data; `mergebench run` needs one that does "
                         f"(evaluate hub suites with `mergebench eval`)")
    cfg.suite_params = suite.resolve_params(_mapping(data.get("suite_params"), "suite_params"))
    cfg.seeds = _list(data.get("seeds", cfg.seeds), "seeds", int)
    n_categories = len(suite.held_in)
    cfg.n_experts = _list(data.get("n_experts", cfg.n_experts), "n_experts", int)
    for n in cfg.n_experts:
        if not 2 <= n <= n_categories:
            raise InputError(f"{where}: n_experts {n} is outside 2..{n_categories} (the suite's held-in categories)")
    methods = pm.merge_methods()
    given = data.get("methods", cfg.methods)
    if given != "all":
        cfg.methods = _list(given, "methods", str)
        for m in cfg.methods:
            methods.get(m)  # unknown method: a did-you-mean error
    cfg.draws = data.get("draws", cfg.draws)
    if not isinstance(cfg.draws, int) or isinstance(cfg.draws, bool) or cfg.draws < 1:
        raise InputError(f"{where}: draws must be an integer >= 1 (random draws per seed of stochastic methods), "
                         f"got {cfg.draws!r}")
    cfg.calibration = _calibration(data.get("calibration"), where)
    cfg.search = data.get("search") or {}
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
    if given == "all":  # every registered method, by name, but those that can merge none of the study's N
        cfg.unmergeable = {m: r for m in methods.names() if (r := _cannot_merge(methods.get(m), cfg))}
        cfg.methods = [m for m in methods.names() if len(cfg.unmergeable.get(m, {})) < len(cfg.n_experts)]
        if not cfg.methods:
            raise InputError(f"{where}: methods: all, but no registered merge method can merge "
                             f"{', '.join(map(str, cfg.n_experts))} experts")
    else:
        for m in cfg.methods:
            reasons = _cannot_merge(methods.get(m), cfg)
            if len(reasons) == len(cfg.n_experts):
                n, reason = next(iter(reasons.items()))
                raise InputError(f"{where}: merge method '{m}' cannot merge N={n} experts ({reason}), nor any N of "
                                 f"n_experts; remove it from methods or change n_experts")
            if reasons:
                cfg.unmergeable[m] = reasons
    legacy = [k for k in ("sizes", "base_kinds", "pretrain", "instruction_tune") if k in data]
    if "bases" in data and legacy:
        raise InputError(f"{where}: 'bases' replaces {', '.join(repr(k) for k in legacy)}; give one or the other")
    cfg.bases = _bases(data["bases"] if "bases" in data else _legacy_bases(data, pm, where), pm, where)
    trainers = pm.expert_trainers()
    cfg.expert_trainer = _choice(data.get("expert_trainer"), "expert_trainer", trainers, "full_finetune",
                                 data.get("expert"))
    cfg.multitask = (None if "multitask" in data and data["multitask"] is False
                     else _choice(data.get("multitask"), "multitask", trainers, "multitask"))
    chosen = _choice(data.get("evaluator", {"batch_size": 64}), "evaluator", pm.evaluators(), "lm-eval")
    evaluator = pm.evaluators().get(chosen.name)
    if "split" not in [p.name for p in evaluator.params]:
        raise InputError(f"{where}: evaluator '{evaluator.name}' declares no 'split' parameter; the study scores "
                         f"validation (to choose hyperparameters) and test apart")
    # the split is the study's to set (validation for sweeps, test for the leaderboard), never the config's
    cfg.evaluator = ComponentChoice(chosen.name, {k: v for k, v in chosen.params.items() if k != "split"})
    cfg.executor = _choice(data.get("executor"), "executor", pm.executors(), "local")
    cfg.workers = data.get("workers", cfg.workers)
    if not isinstance(cfg.workers, int) or isinstance(cfg.workers, bool) or cfg.workers < 1:
        raise ParameterError(f"{where}: workers must be an integer >= 1, got {cfg.workers!r}")
    cfg.device = data.get("device", cfg.device)
    if not isinstance(cfg.device, str) or not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise InputError(f"{where}: device must be 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if "device" in cfg.evaluator.params and cfg.device != "cpu" and not _sets(data.get("evaluator"), "device"):
        # the run's device, unless the evaluator's own parameters choose another
        cfg.evaluator = ComponentChoice(cfg.evaluator.name, {**cfg.evaluator.params, "device": cfg.device})
    cfg.sweep_memory_gib = data.get("sweep_memory_gib", cfg.sweep_memory_gib)
    if isinstance(cfg.sweep_memory_gib, bool) or not isinstance(cfg.sweep_memory_gib, (int, float)) \
            or cfg.sweep_memory_gib < 0:
        raise InputError(f"{where}: sweep_memory_gib must be a number of GiB >= 0, got {cfg.sweep_memory_gib!r}")
    cfg.storage = data.get("storage")
    if cfg.storage is not None and not isinstance(cfg.storage, str):
        raise InputError(f"{where}: storage must be a directory path, got {cfg.storage!r}")
    return cfg


def skipped(cfg: RunConfig) -> list[str]:
    """One line per method the study leaves out, or runs at some N only (``unmergeable``)."""
    out = []
    for name, reasons in sorted(cfg.unmergeable.items()):
        ns = ", ".join(map(str, sorted(reasons)))
        what = "left out" if name not in cfg.methods else f"not run at N={ns}"
        out.append(f"merge method {name} {what}: {next(iter(reasons.values()))}")
    return out


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
