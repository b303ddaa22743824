"""The conformance kit: does a merge method keep the contract that every caller of its maths relies on?

``check_method(name_or_method)`` runs a method with its default parameters on small synthetic inputs
(float32 and bfloat16 values, 1-D and 2-D tensors of odd and even sizes, every expert count N in 1..3
that the method accepts) and returns one :class:`InvariantResult` per invariant, in this order:

parameters          every default is within its own range or choices (also as the string a CLI passes),
                    per-expert defaults resolve, search-space and mergekit-default values coerce, and
                    ``scale_param`` is a declared parameter
expert_counts       which N in 1..3 the method accepts; a refusal must come from ``check`` (before any
                    tensor is read), not from the maths
shape_and_dtype     the maths runs and returns a float32 tensor shaped as its inputs (a flat chunk for
                    elementwise methods)
finite_output       finite inputs give a finite output
inputs_unchanged    the maths does not write into ``params`` or the per-expert parameters (callers share one
                    dict across calls: the engine across a tensor's chunks, a plugin's own code as it likes);
                    the state dicts given to in-memory merging and the model files given to the engine are
                    unchanged afterwards (the maths may overwrite its own scratch copies: the MergeFn
                    protocol allows it)
deterministic       the same inputs and seed twice give the same bytes
seed                a ``stochastic`` method's output changes with the seed (skipped when, with the default
                    parameters, it draws nothing from ``ctx.generator_for``); any other method's does not
identity            base and experts all equal to x give x (to float32 rounding): the engine copies such
                    tensors without calling the maths, so the maths must agree with the copy (except
                    where the method's ``fixed_point`` says these parameters do not map x to x)
equal_experts       for methods without a required base (mean-like), equal experts give that expert, with
                    no base and with a different one; methods that need a base are skipped (their output
                    may depend on it: task arithmetic's does)
permutation         equally weighted experts in another order give the same merge (to float32 rounding;
                    in memory, or with the engine for methods that need a whole-model pre-pass)
chunking            for ``elementwise`` methods, the engine's output does not depend on its chunk size
                    (chunks of 2 and 6 elements vs whole tensors; float32 and bfloat16 models)
threads             the engine's output does not depend on its thread count (1 vs 2; bfloat16 models, and
                    float32 ones with a tensor large enough for torch to split reductions across threads,
                    which a whole-tensor method's largest tensor gets)
in_memory_vs_engine in-memory merging (sweeps; run here on 2 torch threads) equals the engine (one thread
                    per worker) bit for bit on float32 models, one tensor large enough for torch to
                    split reductions across threads
speed               information, not pass/fail: time per call relative to ``average`` on the same inputs

A method that learns from calibration data (``calibration``) is only checked for its parameters and
expert counts: the kit has no data. An invariant that cannot be judged because an earlier one failed is
reported as skipped, naming the one that failed: equality of two runs means nothing for a method that is
not deterministic, nor for one that rewrites its parameters as it goes. So each broken contract is
reported once, under its own name.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mergebench.core.context import TensorContext, content_key
from mergebench.core.errors import MergebenchError
from mergebench.core.registry import MergeMethod

INVARIANTS = ("parameters", "expert_counts", "shape_and_dtype", "finite_output", "inputs_unchanged", "deterministic",
              "seed", "identity", "equal_experts", "permutation", "chunking", "threads", "in_memory_vs_engine",
              "speed")
PASS, FAIL, SKIP, INFO = "pass", "fail", "skip", "info"

# 1-D and 2-D tensors, odd and even sizes, a single row: what the maths of a language model's tensors meets
SHAPES = {"mlp.weight": (7, 5), "mlp.bias": (7,), "embed.weight": (12, 6), "norm.weight": (16,),
          "head.weight": (1, 9)}
IDENTITY_SHAPES = {n: SHAPES[n] for n in ("mlp.weight", "mlp.bias", "head.weight")}  # every N: fewer shapes
# 2**20 entries: torch splits a sum over it across threads, and BLAS a dot product (karcher's torch.dot gave other
# bits on 2 threads at this size, not at 192 x 200, above torch's intra-op grain of 32768 entries)
BIG_SHAPE = (1024, 1024)
CHUNKS = (2, 6)  # even (random_keep_mask draws two entries per 32-bit word); they split rows, leave tails
MAX_EXPERTS = 3
DTYPES = (torch.float32, torch.bfloat16)
# "the same to float32 rounding" for permutation and identity: a few ulps of values of order 1
RTOL, ATOL = 1e-5, 1e-6


@dataclass(frozen=True)
class InvariantResult:
    """One invariant's verdict: ``status`` is pass, fail, skip (could not be judged) or info (measured only)."""

    name: str
    passed: bool
    detail: str
    seconds: float
    status: str = ""

    def __post_init__(self) -> None:
        if not self.status:
            object.__setattr__(self, "status", PASS if self.passed else FAIL)


@dataclass
class ConformanceReport:
    """Every invariant's result for one method, in :data:`INVARIANTS` order."""

    method: str
    plugin: str
    expert_counts: tuple[int, ...]
    results: list[InvariantResult] = field(default_factory=list)

    @property
    def failures(self) -> list[InvariantResult]:
        return [r for r in self.results if r.status == FAIL]

    @property
    def ok(self) -> bool:
        return not self.failures

    def result(self, name: str) -> InvariantResult:
        return next(r for r in self.results if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "plugin": self.plugin, "ok": self.ok,
                "expert_counts": list(self.expert_counts),
                "results": [{"name": r.name, "status": r.status, "passed": r.passed, "detail": r.detail,
                             "seconds": round(r.seconds, 4)} for r in self.results]}


def check_method(method: str | MergeMethod, pm=None) -> ConformanceReport:
    """Run every invariant on ``method`` (a registered name, looked up in ``pm``, or a MergeMethod).

    An unknown name raises the registry's ParameterError; a broken method never raises: each problem is
    a failed :class:`InvariantResult` with a one-line detail.
    """
    if isinstance(method, str):
        from mergebench.core.plugin_manager import get_plugin_manager

        method = (pm or get_plugin_manager()).merge_methods().get(method)
    with tempfile.TemporaryDirectory(prefix="mergebench-conformance-") as tmp:
        return _Kit(method, Path(tmp)).run()


def assert_conforms(method: str | MergeMethod, pm=None) -> ConformanceReport:
    """:func:`check_method`, raising AssertionError that lists every failed invariant (for a plugin's tests)."""
    report = check_method(method, pm)
    if not report.ok:
        lines = "\n".join(f"  {r.name}: {r.detail}" for r in report.failures)
        raise AssertionError(f"merge method '{report.method}' breaks {len(report.failures)} invariant(s):\n{lines}")
    return report


# ---- helpers --------------------------------------------------------------------------------------------

class _Skip(Exception):
    """Raised by an invariant that cannot be judged; its message says why."""


class _Info(Exception):
    """Raised by an informational invariant with its measurement."""


def _line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _raised(exc: BaseException) -> str:
    return _line(f"{type(exc).__name__}: {exc}")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bytes (NaN == NaN here, unlike torch.equal)."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _synthetic(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int = 0):
    """A base ~ N(0, 1) and MAX_EXPERTS experts = base + 0.1 N(0, 1), stored in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    experts = [{n: b + 0.1 * torch.randn(b.shape, generator=g) for n, b in base.items()} for _ in range(MAX_EXPERTS)]
    return ({n: t.to(dtype) for n, t in base.items()},
            [{n: t.to(dtype) for n, t in e.items()} for e in experts])


def _write_model(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "conformance", "architectures": ["Toy"]}))
    save_file({n: t.contiguous() for n, t in tensors.items()}, directory / "model.safetensors")
    return directory


def _read_model(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _engine_plugin_manager(method: MergeMethod):
    """A plugin manager holding only the local-model resolver and ``method``, so the engine runs exactly the
    object under test (it may be unregistered, or shadow a registered name)."""
    from mergebench.core import sources
    from mergebench.core.hookspecs import hookimpl
    from mergebench.core.plugin_manager import PluginManager

    class _One:
        @hookimpl
        def register_merge_methods(self, register):
            register(method)

    pm = PluginManager()
    pm.register(sources, name="mergebench.core.sources")
    pm.register(_One(), name=method.plugin or "conformance")
    return pm


def _param_problems(m: MergeMethod) -> list[str]:
    problems = []
    owner = f"merge method '{m.name}'"
    for p in m.params:
        try:
            if p.coerce(p.default, m.name) != p.default:
                problems.append(f"default of '{p.name}' changes when coerced ({p.default!r})")
        except MergebenchError as exc:
            problems.append(f"default of '{p.name}' is not a valid value: {exc}")
            continue
        try:  # the CLI and YAML recipes pass strings
            if m.resolve_params({p.name: str(p.default)})[p.name] != p.default:
                problems.append(f"default of '{p.name}' written as {str(p.default)!r} reads back differently")
        except MergebenchError as exc:
            problems.append(f"default of '{p.name}' written as {str(p.default)!r} is refused: {exc}")
        if p.min is not None and p.max is not None and p.min > p.max:
            problems.append(f"'{p.name}' has min {p.min} > max {p.max}")
        if p.per_expert:
            try:
                m.resolve_expert_params({p.name: p.default}, "expert 1")
            except MergebenchError as exc:
                problems.append(f"per-expert '{p.name}' refuses its default: {exc}")
    for kind, values in (("search_space", m.search_space), ("mergekit_defaults", m.mergekit_defaults)):
        for name, grid in values.items():
            grid = grid if kind == "search_space" else (grid,)
            if kind == "search_space" and not grid:
                problems.append(f"search_space['{name}'] is empty")
            for v in grid:
                try:
                    m.param(name).coerce(v, owner)
                except MergebenchError as exc:
                    problems.append(f"{kind}['{name}'] value {v!r}: {exc}")
    if m.scale_param is not None and m.scale_param not in {p.name for p in m.params}:
        problems.append(f"scale_param '{m.scale_param}' is not a declared parameter")
    return problems


# ---- the kit ---------------------------------------------------------------------------------------------

@dataclass
class _Case:
    label: str
    name: str
    base: torch.Tensor | None
    experts: list[torch.Tensor]


class _Kit:
    def __init__(self, method: MergeMethod, tmp: Path):
        self.m = method
        self.tmp = tmp
        self.params = method.resolve_params({})  # defaults as declared: 'parameters' judges them
        self.data = {dtype: _synthetic(SHAPES, dtype) for dtype in DTYPES}
        self.allowed: list[int] = []
        self.results: dict[str, InvariantResult] = {}
        self.outputs: dict[str, torch.Tensor] = {}  # first run of every case, by label
        self.models: dict[str, tuple[Path, list[Path]]] = {}
        self.engine_runs: dict[tuple, dict[str, torch.Tensor]] = {}
        self.pm = _engine_plugin_manager(method)
        self.mutation: str | None = None  # first change the maths made to its params
        self.drew = False  # whether any call drew from ctx.generator_for
        self.bases = [True] if method.needs_base else [False, True]

    # -- running the maths as the engine does --

    def call(self, base, experts, *, name: str = "t", seed: int = 0, method: MergeMethod | None = None):
        """One call of the maths on float32 scratch copies (flat for elementwise methods), with content-keyed
        streams and the pre-pass result, as the engine makes it; notes any change to params."""
        m = method or self.m
        params = self.params if method is None else m.resolve_params({})
        given, own = copy.deepcopy(params), tuple({} for _ in experts)
        raws = ([base] if base is not None else []) + list(experts)

        def scratch():
            xs = [r.to(torch.float32, copy=True) for r in raws]
            xs = [x.reshape(-1) for x in xs] if m.elementwise else xs
            return (xs[0], xs[1:]) if base is not None else (None, xs)

        streams = tuple(content_key(e) for e in experts) if m.stochastic else None
        ctx = TensorContext(name=name, weights=(1.0,) * len(experts), seed=seed, streams=streams, expert_params=own)
        # the whole-model pre-pass (here over this one tensor), else the per-tensor one, as these parameters ask
        prepasses = ((m.analysis, own), (m.tensor_analysis, ctx))  # what each pre-pass factory is given
        analysis = next((a for a in (f(copy.deepcopy(params), arg) for f, arg in prepasses if f is not None)
                         if a is not None), None)
        if analysis is not None:
            from mergebench.core.analysis import run_analysis

            ctx.analysis = run_analysis(analysis, name, *scratch())
        out = m.merge(*scratch(), given, ctx)
        self.drew = self.drew or bool(ctx._generators)  # it asked for one of ctx's random streams
        if method is None and self.mutation is None:
            changed = [f"params['{k}'] from {params[k]!r} to {given.get(k, '<deleted>')!r}"
                       for k in params if given.get(k, object()) != params[k]]
            changed += [f"params['{k}'] added" for k in given if k not in params]
            changed += [f"expert {i + 1}'s own parameters to {o}" for i, o in enumerate(own) if o]
            if changed:
                self.mutation = f"the maths changed {', '.join(changed)} (tensor '{name}')"
        return out

    def cases(self, dtypes=DTYPES, counts=None, equal: str | None = None, shapes=SHAPES) -> list[_Case]:
        """Every (tensor, dtype, N, with/without base); ``equal``: 'all' makes every input the base's tensor,
        'experts' makes every expert expert 1's tensor (the base, where given, differs)."""
        out = []
        for dtype in dtypes:
            base_sd, expert_sds = self.data[dtype]
            for n in counts or self.allowed:
                for with_base in self.bases:
                    for name, shape in shapes.items():
                        b = base_sd[name] if with_base else None
                        ex = [e[name] for e in expert_sds[:n]]
                        if equal == "all":
                            ex = [base_sd[name]] * n
                        elif equal == "experts":
                            ex = [expert_sds[0][name]] * n
                        label = (f"tensor '{name}' {list(shape)}, N={n}, {str(dtype).removeprefix('torch.')}, "
                                 f"{'with' if with_base else 'no'} base")
                        out.append(_Case(label, name, b, ex))
        return out

    def want_shape(self, case: _Case) -> tuple[int, ...]:
        t = case.experts[0]
        return (t.numel(),) if self.m.elementwise else tuple(t.shape)

    # -- the invariants, each returning its detail or raising _Skip / _Info / AssertionError --

    def parameters(self) -> str:
        problems = _param_problems(self.m)
        assert not problems, "; ".join(problems)
        grid = ", ".join(f"{k} ({len(v)} values)" for k, v in self.m.search_space.items()) or "none"
        return f"{len(self.m.params)} parameter(s); search space: {grid}"

    def expert_counts(self) -> str:
        refused, problems = [], []
        calibration = getattr(self.m, "calibration", None)
        without_data = calibration is not None and calibration(dict(self.params)) is not None
        probes = self.cases(dtypes=(torch.float32,), counts=(1, 2, 3))
        for n in (1, 2, 3):
            if self.m.check is not None:
                try:
                    self.m.check(dict(self.params), (1.0,) * n)
                except MergebenchError as exc:
                    refused.append(f"{n} ({_line(exc, 120)})")
                    continue
                except Exception as exc:  # noqa: BLE001 - a bug in check, reported as such
                    problems.append(f"check with N={n} raised {_raised(exc)}")
                    continue
            case = next(c for c in probes if len(c.experts) == n)
            if not without_data:  # a data-aware method's maths needs ctx.statistics: check alone decides
                try:
                    self.call(case.base, case.experts, name=case.name)
                except MergebenchError as exc:
                    problems.append(f"check accepts N={n} but the maths refuses it ({_line(exc, 120)}); "
                                    f"refuse it in check, before any tensor is read")
                    continue
                except Exception:  # noqa: BLE001 - judged by shape_and_dtype
                    pass
            self.allowed.append(n)
        if not self.allowed:
            problems.append("accepts no N in 1..3")
        assert not problems, "; ".join(problems)
        base = "needs a base" if self.m.needs_base else "base optional"
        return f"accepts N = {', '.join(map(str, self.allowed))} ({base})" + (
            f"; refuses N = {'; '.join(refused)}" if refused else "")

    def main_cases(self) -> list[_Case]:
        """float32 values for every accepted N, bfloat16 values (upcast, as the engine does) for the largest."""
        return self.cases(dtypes=(torch.float32,)) + self.cases(dtypes=(torch.bfloat16,), counts=[max(self.allowed)])

    def rerun_cases(self) -> list[_Case]:
        """float32 values, the largest N: enough to see a second draw or another seed (some maths is slow)."""
        return self.cases(dtypes=(torch.float32,), counts=[max(self.allowed)])

    def shape_and_dtype(self) -> str:
        cases = self.main_cases()
        for case in cases:
            try:
                out = self.call(case.base, case.experts, name=case.name)
            except Exception as exc:  # noqa: BLE001 - a broken method is a result, not a crash
                raise AssertionError(f"{case.label}: merge raised {_raised(exc)}") from None
            want = self.want_shape(case)
            if not isinstance(out, torch.Tensor):
                raise AssertionError(f"{case.label}: returned {type(out).__name__}, not a tensor")
            if tuple(out.shape) != want or out.dtype != torch.float32 or out.device.type != "cpu":
                raise AssertionError(f"{case.label}: returned {out.dtype} {list(out.shape)} on {out.device}, "
                                     f"expected torch.float32 {list(want)} on cpu")
            self.outputs[case.label] = out.detach().clone()
        return (f"{len(cases)} calls, float32 and bfloat16 values, shapes "
                f"{', '.join(str(list(s)) for s in SHAPES.values())}")

    def finite_output(self) -> str:
        for label, out in self.outputs.items():
            if not bool(torch.isfinite(out).all()):
                bad = int((~torch.isfinite(out)).sum())
                raise AssertionError(f"{label}: {bad} of {out.numel()} entries are NaN or Inf")
        return f"{len(self.outputs)} outputs finite"

    def deterministic(self) -> str:
        cases = self.rerun_cases()
        for case in cases:
            again = self.call(case.base, case.experts, name=case.name)
            if not _same_bytes(again, self.outputs[case.label]):
                diff = int((again != self.outputs[case.label]).sum())
                raise AssertionError(f"{case.label}: a second run with seed 0 differs in {diff} entries "
                                     f"(draw from ctx.generator_for(i), not torch's global generator)")
        return f"{len(cases)} tensors (N={max(self.allowed)}) twice with seed 0: same bytes"

    def seed(self) -> str:
        cases = self.rerun_cases()
        differ = [c.label for c in cases
                  if not _same_bytes(self.call(c.base, c.experts, name=c.name, seed=1), self.outputs[c.label])]
        if self.m.stochastic:
            if not differ and not self.drew:  # e.g. randomness only for some parameter values
                raise _Skip("declared stochastic, but with these parameters it draws nothing from "
                            "ctx.generator_for, and seed 1 gives seed 0's output")
            assert differ, "declared stochastic, but seed 1 gives seed 0's output in every case"
            return f"seed 1 changes {len(differ)} of {len(cases)} outputs"
        assert not differ, f"not declared stochastic, but seed 1 changes the output ({differ[0]})"
        return "seed 1 gives seed 0's output (not stochastic)"

    def _close(self, got: torch.Tensor, want: torch.Tensor, label: str, what: str) -> float:
        got = got.reshape(want.shape)
        if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):  # NaN fails here too
            raise AssertionError(f"{label}: {what}; max |difference| {_max_diff(got, want):.3g}")
        return _max_diff(got, want)

    def identity(self) -> str:
        worst, cases = 0.0, self.cases(dtypes=(torch.float32,), equal="all", shapes=IDENTITY_SHAPES)
        fixed_point = getattr(self.m, "fixed_point", None)  # None: f(x, ..., x) = x always (the engine copies)
        if fixed_point is not None:
            cases = [c for c in cases
                     if fixed_point(dict(self.params), (1.0,) * len(c.experts), tuple({} for _ in c.experts))]
            if not cases:
                raise _Skip("declares (fixed_point) that equal inputs need not give themselves with these parameters")
        for case in cases:
            x = case.experts[0].to(torch.float32)
            out = self.call(case.base, case.experts, name=case.name)
            worst = max(worst, self._close(out, x, case.label, "all inputs equal to x do not give x "
                                           "(the engine copies such a tensor without calling the maths)"))
        return "exact" if worst == 0 else f"to rounding (max |difference| {worst:.2g})"

    def equal_experts(self) -> str:
        if self.m.needs_base:
            raise _Skip("needs a base: its output may depend on it (task arithmetic's does)")
        worst = 0.0
        for case in self.cases(dtypes=(torch.float32,), equal="experts", shapes=IDENTITY_SHAPES):
            out = self.call(case.base, case.experts, name=case.name)
            worst = max(worst, self._close(out, case.experts[0].to(torch.float32), case.label,
                                           "equal experts do not give that expert"))
        return "exact" if worst == 0 else f"to rounding (max |difference| {worst:.2g})"

    # -- whole models: the in-memory merge and the engine --

    def model(self, kind: str, n: int) -> tuple[Path | None, list[Path]]:
        """Model directories of ``kind`` (f32, bf16 or big: float32 with one large tensor) for N experts."""
        if kind not in self.models:
            shapes = {**SHAPES, "big.weight": BIG_SHAPE} if kind == "big" else SHAPES
            base, experts = _synthetic(shapes, torch.bfloat16 if kind == "bf16" else torch.float32, seed=1)
            ints = {"position_ids": torch.arange(5)}  # not float: the engine copies it from the template
            root = self.tmp / kind
            base_dir = _write_model(root / "base", {**base, **ints})
            expert_dirs = [_write_model(root / f"e{t}", {**e, **ints}) for t, e in enumerate(experts)]
            self.models[kind] = (base_dir, expert_dirs)
        base_dir, expert_dirs = self.models[kind]
        return (base_dir if self.m.needs_base else None), expert_dirs[:n]

    def engine(self, kind: str, n: int, *, threads: int = 1, chunk: int | None = None,
               order: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
        key = (kind, n, threads, chunk, order)
        if key not in self.engine_runs:
            from mergebench.core import api, engine

            base, experts = self.model(kind, n)
            experts = [experts[i] for i in order] if order else experts
            out = self.tmp / "out" / "-".join(map(str, key))
            old = engine.CHUNK
            engine.CHUNK = chunk or old
            try:
                result = api.merge(self.m.name, base=base, experts=experts, output=out, threads=threads,
                                   plugin_manager=self.pm)
            finally:
                engine.CHUNK = old
            if result.parameters != self.params and self.mutation is None:
                self.mutation = f"the engine's recorded parameters became {result.parameters} (declared {self.params})"
            self.engine_runs[key] = _read_model(out)
        return self.engine_runs[key]

    def _compare_runs(self, got: dict, want: dict, what: str) -> None:
        for name, w in want.items():
            if not _same_bytes(got[name], w):
                diff = int((got[name].float() != w.float()).sum())
                raise AssertionError(f"{what}: tensor '{name}' {list(w.shape)} differs in {diff} of {w.numel()} "
                                     f"entries (max |difference| {_max_diff(got[name], w):.3g})")

    def in_memory(self, kind: str, n: int, order: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
        key = ("in memory", kind, n, order)
        if key not in self.engine_runs:
            self.engine_runs[key] = self._in_memory(kind, n, order)
        return self.engine_runs[key]

    def _in_memory(self, kind: str, n: int, order: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
        from mergebench.core import in_memory

        base_dir, expert_dirs = self.model(kind, n)
        base = _read_model(base_dir) if base_dir else None
        experts = [_read_model(expert_dirs[i]) for i in (order or range(n))]
        before = [{k: v.clone() for k, v in sd.items()} for sd in ([base] if base else []) + experts]
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # sweeps run on several threads, the engine's workers on one each
        try:
            out = in_memory.merge(self.m, {}, base, experts)
        finally:
            torch.set_num_threads(threads)
        for sd, old in zip(([base] if base else []) + experts, before):
            for k, v in old.items():
                if not _same_bytes(sd[k], v) and self.mutation is None:
                    self.mutation = f"in-memory merging changed the caller's state dict (tensor '{k}')"
        return out

    def permutation(self) -> str:
        n = max(self.allowed)
        if n < 2:
            raise _Skip("accepts one expert only")
        def merge(order):
            return self.in_memory("big", n, order)

        want = merge(None)
        worst = 0.0
        for order in (tuple(reversed(range(n))), tuple(range(1, n)) + (0,)):
            got = merge(order)
            for name, w in want.items():
                if w.is_floating_point():
                    worst = max(worst, self._close(got[name], w, f"tensor '{name}', N={n}",
                                                   f"experts in order {[i + 1 for i in order]} change the merge"))
        return f"N={n} in memory, reversed and rotated: " + ("exact" if worst == 0 else f"max |difference| {worst:.2g}")

    def chunking(self) -> str:
        if not self.m.elementwise:
            raise _Skip("not elementwise: the engine passes whole tensors")
        n = max(self.allowed)
        for kind in ("f32", "bf16"):
            whole = self.engine(kind, n)
            for chunk in CHUNKS:
                self._compare_runs(self.engine(kind, n, chunk=chunk), whole,
                                   f"{kind} models, N={n}, chunks of {chunk} vs whole tensors")
        return f"N={n}, float32 and bfloat16 models, chunks of {' and '.join(map(str, CHUNKS))}: same bytes"

    def threads(self) -> str:
        n = max(self.allowed)
        self._compare_runs(self.engine("bf16", n, threads=2), self.engine("bf16", n),
                           f"bf16 models, N={n}, 2 threads vs 1")
        # the largest tensor of a whole-tensor merge runs on every worker's cores: reductions split across threads
        self._compare_runs(self.engine("big", n, threads=2), self.engine("big", n),
                           f"float32 models, N={n}, 2 threads vs 1")
        return f"N={n}, bfloat16 models and float32 ones incl. a {list(BIG_SHAPE)} tensor: same bytes"

    def in_memory_vs_engine(self) -> str:
        n = max(self.allowed)
        self._compare_runs(self.in_memory("big", n), self.engine("big", n),
                           f"N={n}, float32 models, in memory vs engine")
        return f"N={n}, float32 models incl. a {list(BIG_SHAPE)} tensor: same bytes"

    def inputs_unchanged(self) -> str:
        assert self.mutation is None, self.mutation
        return "params, per-expert parameters, state dicts and model files unchanged"

    def model_files_unchanged(self, hashes: dict[Path, str]) -> None:
        for path, digest in hashes.items():
            if hashlib.sha256(path.read_bytes()).hexdigest() != digest and self.mutation is None:
                self.mutation = f"the engine's input file {path.parent.name}/{path.name} changed"

    def speed(self) -> str:
        from mergebench.plugins.average import average

        n = max(self.allowed)
        g = torch.Generator().manual_seed(2)
        base = torch.randn(128, 256, generator=g)
        experts = [base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(n)]
        avg = MergeMethod(name="average", description="", merge=average, needs_base=False, elementwise=True)

        def best(method: MergeMethod | None) -> float:
            times = []
            for _ in range(3):
                started = time.perf_counter()
                self.call(base, experts, name="speed.weight", method=method)
                times.append(time.perf_counter() - started)
            return min(times)

        mine, theirs = best(self.m), best(avg)
        raise _Info(f"{mine / theirs:.1f}x average ({mine * 1e3:.2f} ms vs {theirs * 1e3:.2f} ms, "
                    f"N={n}, {list(base.shape)} float32)")

    # -- running them in order, skipping what cannot be judged --

    def run(self) -> ConformanceReport:
        skip_merge = skip_runs = None  # why invariants that merge / compare runs cannot be judged

        def record(name: str, fn: Callable[[], str], skip: str | None = None) -> InvariantResult:
            started = time.perf_counter()
            if skip:
                status, detail = SKIP, f"skipped: {skip}"
            else:
                try:
                    status, detail = PASS, _line(fn())
                except _Skip as why:
                    status, detail = SKIP, f"skipped: {_line(why)}"
                except _Info as info:
                    status, detail = INFO, _line(info)
                except AssertionError as exc:
                    status, detail = FAIL, _line(exc)
                except Exception as exc:  # noqa: BLE001 - the method's bug, one line, never a traceback
                    status, detail = FAIL, _raised(exc)
            self.results[name] = InvariantResult(name, status != FAIL, detail, time.perf_counter() - started, status)
            return self.results[name]

        record("parameters", self.parameters)
        calibration = getattr(self.m, "calibration", None)
        if calibration is not None and calibration(dict(self.params)) is not None:
            skip_merge = "learns from calibration data (ctx.statistics), which this kit does not build"
        if record("expert_counts", self.expert_counts).status == FAIL and not self.allowed:
            skip_merge = skip_merge or "the method accepts no expert count (see expert_counts)"
        for name in ("shape_and_dtype", "finite_output"):
            if record(name, getattr(self, name), skip_merge).status == FAIL:
                skip_merge = f"the merge itself fails (see {name})"
        skip_runs = skip_merge
        if self.mutation is not None:
            skip_runs = "the maths rewrites its parameters as it goes (see inputs_unchanged)"
        if record("deterministic", self.deterministic, skip_merge).status == FAIL:
            skip_runs = skip_runs or "outputs are not reproducible (see deterministic)"
        record("seed", self.seed, skip_runs)
        record("identity", self.identity, skip_merge)
        record("equal_experts", self.equal_experts, skip_merge)
        hashes = {}
        if not skip_runs:
            for kind in ("f32", "bf16", "big"):
                base, experts = self.model(kind, MAX_EXPERTS)
                hashes.update({f: hashlib.sha256(f.read_bytes()).hexdigest()
                               for d in ([base] if base else []) + experts for f in d.iterdir()})
        for name in ("permutation", "chunking", "threads", "in_memory_vs_engine"):
            record(name, getattr(self, name), skip_runs)
        self.model_files_unchanged(hashes)
        record("inputs_unchanged", self.inputs_unchanged, skip_merge if self.mutation is None else None)
        record("speed", self.speed, skip_merge)
        return ConformanceReport(self.m.name, self.m.plugin, tuple(self.allowed),
                                 [self.results[n] for n in INVARIANTS])
