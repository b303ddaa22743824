"""What a plugin registers: typed parameters, the component base class, merge methods, and registries.

The study's component kinds (suites, base preparers, expert trainers, evaluators, executors) are in
:mod:`mergebench.study.components`.

Modelled on mergekit's method registry: every component declares its name, a one-line description,
a reference and typed parameters with defaults, ranges and descriptions, so that the CLI can list
them and bad values are refused before any tensor is read.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Mapping, Protocol, Sequence, TypeVar

from mergebench.core.errors import ParameterError, PluginError

import torch

if TYPE_CHECKING:  # pragma: no cover
    from mergebench.core.analysis import TensorAnalysis
    from mergebench.core.context import TensorContext

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One typed parameter of a component, with its default and allowed values."""

    name: str
    type: type
    default: Any
    description: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    # True when each expert may have its own value (mergekit's per-model "tensor parameters": weight,
    # density, gamma, epsilon): the method reads them with ``ctx.expert_values(name, params)``.
    per_expert: bool = False

    def describe_range(self) -> str:
        if self.choices is not None:
            return " | ".join(str(c) for c in self.choices)
        if self.min is not None and self.max is not None:
            return f"[{self.min}, {self.max}]"
        if self.min is not None:
            return f">= {self.min}"
        if self.max is not None:
            return f"<= {self.max}"
        return "any"

    def coerce(self, value: Any, owner: str) -> Any:
        """Convert ``value`` (possibly a CLI string) to this parameter's type and check its range."""
        where = f"parameter '{self.name}' of {owner}"
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in _TRUE | _FALSE:
                        raise ValueError
                    value = low in _TRUE
                elif not isinstance(value, bool):
                    raise ValueError
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            raise ParameterError(
                f"{where} must be a {self.type.__name__}, got {value!r}"
            ) from None
        if self.type is float and value != value:  # NaN passes every range check
            raise ParameterError(f"{where} must be a number, got NaN")
        if self.choices is not None and value not in self.choices:
            raise ParameterError(f"{where} must be one of {self.describe_range()}, got {value!r}")
        if self.min is not None and value < self.min or self.max is not None and value > self.max:
            raise ParameterError(f"{where} must be in {self.describe_range()}, got {value!r}")
        return value


@dataclass(frozen=True)
class Component:
    """Fields shared by everything a plugin registers."""

    name: str
    description: str
    params: tuple[Param, ...] = ()
    reference: str = ""
    plugin: str = ""  # filled in by the registry: which plugin registered it

    @property
    def kind(self) -> str:
        return "component"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve_params(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``given``; unknown names and bad values raise ParameterError."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        for name in given:
            if name not in known:
                raise ParameterError(_unknown_message(f"parameter '{name}'", f"{self.kind} '{self.name}'", known))
        owner = f"{self.kind} '{self.name}'"
        return {n: (p.coerce(given[n], owner) if n in given else p.default) for n, p in known.items()}

    def resolve_expert_params(self, given: Mapping[str, Any] | None, who: str) -> dict[str, Any]:
        """One expert's own parameter values: only parameters declared ``per_expert``, coerced."""
        given = dict(given or {})
        owner = f"{self.kind} '{self.name}' ({who})"
        out = {}
        for name, value in given.items():
            try:
                p = self.param(name)
            except KeyError:
                raise ParameterError(_unknown_message(f"parameter '{name}'", owner,
                                                      [q.name for q in self.params if q.per_expert])) from None
            if not p.per_expert:
                per = [q.name for q in self.params if q.per_expert]
                raise ParameterError(f"parameter '{name}' of {self.kind} '{self.name}' is one value for the whole merge, "
                                     f"not per expert (per-expert: {', '.join(per) or 'none'}); set it in 'parameters'")
            out[name] = p.coerce(value, owner)
        return out


class MergeFn(Protocol):
    """The maths of a merge method over the tensors of one parameter name.

    ``base``: the base's tensor in float32, or None when the method does not need a base and none was
    given. ``experts``: one float32 tensor per expert, in the recipe's order. For a method declared
    ``elementwise`` these are flat consecutive chunks of the tensor (``ctx.offset`` is the first
    element); otherwise whole tensors in their shape. ``params``: every declared parameter, resolved
    for this tensor (gradients and filters already applied). ``ctx``: the tensor's name, per-expert
    weights and per-expert parameter values, the seed and random streams, pre-pass results.

    Ownership: ``base`` and ``experts`` are scratch copies made for this call; the method may
    overwrite them in place and may return one of them, but must not keep a reference after
    returning. It may also free an expert's memory once done with it (``merge_ops.release_``), so
    that its own temporaries take that place; the base stays whole (a scaled method's ``merge``
    adds the scaled delta to it). Returns the merged float32 tensor, shaped as its inputs.
    """

    def __call__(self, base: "torch.Tensor | None", experts: "list[torch.Tensor]", params: dict[str, Any],
                 ctx: "TensorContext") -> "torch.Tensor": ...


@dataclass(frozen=True)
class MergeMethod(Component):
    """A merge method: its metadata and its maths (a :class:`MergeFn`) over the tensors of one name."""

    merge: MergeFn | None = None
    # For methods of the form theta_0 + scale * delta(...): the lambda-free maths and the scale's name.
    # A sweep computes delta once and applies every scale on top; ``merge`` is derived when omitted.
    delta: MergeFn | None = None
    scale_param: str | None = None
    # Cross-parameter checks run before any tensor is read: check(params, weights) raises ParameterError.
    check: Callable[[dict[str, Any], tuple[float, ...]], None] | None = None
    needs_base: bool = True
    # (params, weights, expert_params) -> whether f(x, ..., x) = x for these values: the engine then copies a
    # tensor whose inputs are all the same bytes (a single input included) without the maths. None: always.
    fixed_point: Callable[[dict[str, Any], tuple[float, ...], tuple[Mapping[str, Any], ...]], bool] | None = None
    # True when a given base takes no part in the maths (linear, karcher, passthrough): reading a mergekit
    # config, a base listed among the models is then one more input, as mergekit treats it
    ignores_base: bool = False
    # True when the maths may draw random numbers (the engine then gives each expert its own random stream)
    stochastic: bool = False
    # For a stochastic method, (params, expert_params) -> whether these values draw any (e.g. DARE at
    # density 1 draws none): only then does the seed change the output. None: always.
    random_when: Callable[[dict[str, Any], tuple[Mapping[str, Any], ...]], bool] | None = None
    # True when each output entry depends only on the same entry of the inputs (plus ctx.analysis):
    # the engine then streams the tensor through ``merge`` in cache-sized flat chunks.
    elementwise: bool = False
    # Optional pre-passes. ``tensor_analysis(params, ctx)`` runs over one tensor's chunks before that tensor is
    # merged (e.g. its top-k magnitude threshold; ``ctx`` is the tensor's TensorContext: per-expert values,
    # random streams); ``analysis(params, expert_params)`` runs over the whole model before any tensor is
    # merged (``expert_params``: each expert's own parameter values). Each returns a TensorAnalysis or None.
    tensor_analysis: Callable[[dict[str, Any], "TensorContext"], "TensorAnalysis | None"] | None = None
    analysis: Callable[[dict[str, Any], tuple[Mapping[str, Any], ...]], "TensorAnalysis | None"] | None = None
    # Data-aware methods (RegMean, Fisher): params -> what to collect from calibration data through each expert
    # (a mergebench.core.calibration.CalibrationRequest), or None when these parameters need nothing. The
    # engine computes (or reads from its cache) the statistics before merging and hands each tensor's
    # per-expert statistic to the maths as ``ctx.statistics``.
    calibration: Callable[[dict[str, Any]], Any] | None = None
    # For a method mergekit also has (same name, same parameter names): the values of our extra convention
    # parameters that reproduce mergekit 0.1.5's numbers, applied when a mergekit config does not set them
    # (e.g. {"rescale": "l1"}). Our own recipes keep the defaults above (the papers' conventions).
    mergekit_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Hyperparameter grid a sweep should try, e.g. {"lambda": [0.0, 0.1, ...], "density": [0.1, 0.2]}.
    search_space: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "merge method"

    def draws_random(self, params: Mapping[str, Any], expert_params: Sequence[Mapping[str, Any]] = ()) -> bool:
        """Whether merging with these resolved parameters draws random numbers, so that the seed (and a
        study's further random draws) can change the output."""
        if not self.stochastic:
            return False
        return self.random_when is None or bool(self.random_when(dict(params), tuple(expert_params)))

    def __post_init__(self) -> None:
        if self.merge is None and self.delta is not None and self.scale_param is not None:
            object.__setattr__(self, "merge", _scaled_merge(self.delta, self.scale_param))
        if self.merge is None or not callable(self.merge):
            raise PluginError(f"merge method '{self.name}' has no callable merge function")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise PluginError(f"merge method '{self.name}' declares a parameter twice: {names}")
        for key in self.mergekit_defaults:
            if key not in names:
                raise PluginError(f"merge method '{self.name}' has a mergekit default for undeclared parameter '{key}'")
        for key in self.search_space:
            if key not in names:
                raise PluginError(f"merge method '{self.name}' searches over undeclared parameter '{key}'")


def _scaled_merge(delta: Callable[..., "torch.Tensor"], scale_param: str) -> Callable[..., "torch.Tensor"]:
    """merge = theta_0 + params[scale_param] * delta(theta_0, experts, params, ctx)."""

    def merge(base, experts, params, ctx):
        d = delta(base, experts, params, ctx)
        # into delta's own result (a scratch tensor, or a new one): torch.add's arithmetic without one more copy
        into = d.shape == base.shape and d.dtype == torch.result_type(base, d) and d is not base
        return torch.add(base, d, alpha=params[scale_param], out=d if into else None)

    merge.__doc__ = f"theta_0 + {scale_param} * ({delta.__doc__ or delta.__name__})"
    return merge


C = TypeVar("C", bound=Component)


class Registry(Generic[C]):
    """Components of one kind by name; a second registration of a name is an error naming both plugins."""

    def __init__(self, kind: str, cls: type[C]):
        self.kind = kind
        self.cls = cls
        self._items: dict[str, C] = {}

    def register(self, item: C, plugin: str) -> None:
        if not isinstance(item, self.cls):
            raise PluginError(
                f"plugin '{plugin}' registered {item!r} as a {self.kind}; expected a {self.cls.__name__}"
            )
        if item.name in self._items:
            other = self._items[item.name].plugin
            raise PluginError(
                f"{self.kind} '{item.name}' is registered twice: by plugin '{other}' and by plugin '{plugin}'; "
                f"uninstall one of them or restrict plugins with MERGEBENCH_LOAD_PLUGINS"
            )
        self._items[item.name] = replace(item, plugin=plugin)

    def get(self, name: str) -> C:
        try:
            return self._items[name]
        except KeyError:
            raise ParameterError(_unknown_message(f"{self.kind} '{name}'", "mergebench", self._items)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(sorted(self._items.values(), key=lambda c: c.name))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)


_STUDY = {"BasePreparer", "ExpertTrainer", "Evaluator", "Executor", "DatasetSpec", "Suite"}


def __getattr__(name: str):
    # the study's component classes live in mergebench.study.components; older imports keep working
    if name in _STUDY:
        from mergebench.study import components

        return getattr(components, name)
    raise AttributeError(name)


def _unknown_message(what: str, where: str, known: Iterable[str]) -> str:
    known = sorted(known)
    name = what.split("'")[1] if "'" in what else what
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    listing = ", ".join(known) if known else "none"
    return f"unknown {what} for {where}{hint} (valid: {listing})"
