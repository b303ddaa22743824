"""The streaming merge engine.

Order of work, so that errors come before cost:
1. method, parameters, weights, dtype, device and output location are checked (no file opened);
2. every input's metadata is read and cross-checked: names, shapes, dtypes, architectures;
3. tensors are merged one name at a time from memory maps and streamed into safetensors shards in a
   temporary directory, which replaces the target only when everything (hash checks included) passed.

Peak memory for an elementwise method is about (N + 2) float32 copies of the largest tensor plus a fixed
overhead, never the size of the models; a method that needs whole tensors also holds each input's
tensor in float32 and whatever temporaries its maths makes. Workers share one budget for those whole tensors,
(N + 2) float32 copies of the largest tensor (:class:`_MemoryGate`): a tensor of the largest size is merged with
nothing beside it, on all the workers' cores.
"""

from __future__ import annotations

import json
import math
import queue
from collections import deque
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from mergebench.core.card import write_card
from mergebench.core import vocab
from mergebench.core.context import TensorContext, content_key
from mergebench.core.errors import InputError, MergebenchError, OutputError, ParameterError
from mergebench.core.hashing import combined_sha256, sha256_file
from mergebench.core.memory import return_free_heap
from mergebench.core.merge_ops import ordered_map, set_torch_threads
from mergebench.core.plugin_manager import PluginManager, get_plugin_manager
from mergebench.core.recipe import ModelInput, Recipe
from mergebench.core.registry import MergeFn, MergeMethod
from mergebench.core.tensor_params import ParameterPlan, TensorParams, layer_index
from mergebench.core.tensor_io import HUGE_PAGE, ModelSource, TensorInfo, iter_config_files
from mergebench.core.writer import AtomicDirectory, OutputTensor, ShardWriter, parse_size, plan_shards

# progress(stage, bytes_done, bytes_total, tensor_name)
ProgressCallback = Callable[[str, int, int, str], None]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                      torch.float64: "float64"}


@dataclass
class MergeResult:
    """What a merge produced and how."""

    output: Path
    method: str
    parameters: dict[str, Any]
    seed: int
    tensors_merged: int
    tensors_copied: int
    seconds: float
    inputs: list[dict[str, Any]] = field(default_factory=list)
    # data-aware methods: per expert, its calibration data file, that file's sha256, the data parameters and the
    # statistics artefact's cache key
    calibration: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: the input tensors it is merged from, and its position over the layers.

    ``inputs`` are (source index, tensor name in that source), the base's first when the plan has one;
    ``experts`` are the recipe's expert indices of the other inputs (for their weights and own
    parameters); ``t`` is the layer position gradients are evaluated at.
    """

    name: str
    inputs: tuple[tuple[int, str], ...]
    experts: tuple[int, ...]
    t: float = 0.0


@dataclass
class _Plan:
    """Everything a merge needs, resolved from metadata before any tensor is read."""

    method: MergeMethod
    params: dict[str, Any]  # method-level values (settings that vary per tensor as given)
    settings: ParameterPlan
    sources: list[ModelSource]  # the base first when there is one, then the recipe's experts
    has_base: bool
    jobs: list[TensorJob]
    tensor_params: dict[str, TensorParams]
    out_dtype: torch.dtype | None
    device: torch.device
    layers: int | None = None  # the output's layer count when slices changed it
    vocab: vocab.VocabAlignment | None = None  # when vocabularies are aligned by token
    vocab_names: frozenset[str] = frozenset()  # the output tensors indexed by token
    # per recipe expert, its calibration statistics (``get(tensor_name) -> statistic | None``), for data-aware methods
    statistics: list[Any] | None = None

    @property
    def base(self) -> ModelSource | None:
        return self.sources[0] if self.has_base else None

    @property
    def experts(self) -> list[ModelSource]:
        return self.sources[1:] if self.has_base else self.sources

    @property
    def template(self) -> ModelSource:
        return self.sources[0]

    @property
    def names(self) -> list[str]:
        return [j.name for j in self.jobs]

    def info(self, job: TensorJob) -> TensorInfo:
        """The output tensor's metadata: its first input's, under the output name."""
        source, name = job.inputs[0]
        info = self.sources[source].tensors[name]
        if self.vocab is not None and job.name in self.vocab_names:
            return replace(info, name=job.name, shape=(self.vocab.size, *info.shape[1:]), dtype=info.dtype)
        return replace(info, name=job.name)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise ParameterError(f"unknown dtype '{name}' (valid: {', '.join(sorted(set(DTYPES)))})") from None


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ParameterError(f"unknown device '{name}' (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device '{name}' requested, but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ParameterError(f"device '{name}' is not supported (use cpu or cuda)")
    return device


def _describe(role: str, source: ModelSource) -> str:
    return f"{role} ({source.reference})"


def _check_compatible(template: ModelSource, role_t: str, other: ModelSource, role_o: str,
                      aligned: bool = False) -> None:
    """Same architecture, same tensor names, same shapes, float where the template is float. Vocabulary
    tensors may differ in rows only when they are ``aligned`` by token (a tokenizer_source is set)."""
    a, b = template.config, other.config
    if a is not None and b is not None:
        for key in ("model_type", "architectures"):
            if key in a and key in b and a[key] != b[key]:
                raise InputError(
                    f"{_describe(role_o, other)} is a {b[key]} model but {_describe(role_t, template)} is a {a[key]} "
                    f"model ({key} in config.json); merging needs one architecture"
                )
    names = template.ordered_names()
    for name in names:
        if name not in other.tensors:
            missing = sum(1 for n in names if n not in other.tensors)
            raise InputError(
                f"{_describe(role_o, other)} has no tensor '{name}' that {role_t} has "
                f"({missing} tensor(s) missing in all)"
            )
    for name in other.ordered_names():
        if name not in template.tensors:
            raise InputError(f"{_describe(role_o, other)} has a tensor '{name}' that {role_t} does not have")
    for name in names:
        ti, oi = template.tensors[name], other.tensors[name]
        if ti.shape != oi.shape and vocab.is_vocab_tensor(name, ti.shape, vocab.vocab_size(template)) \
                and vocab.is_vocab_tensor(name, oi.shape, vocab.vocab_size(other)) and ti.shape[1:] == oi.shape[1:]:
            if aligned:
                continue
            raise vocab.mismatch_error(name, ti.shape[0], role_t, oi.shape[0], _describe(role_o, other))
        if ti.shape != oi.shape:
            raise InputError(
                f"tensor '{name}' has shape {list(oi.shape)} in {_describe(role_o, other)} but "
                f"{list(ti.shape)} in {role_t}"
            )
        if ti.is_float != oi.is_float:
            raise InputError(f"tensor '{name}' is {oi.dtype} in {_describe(role_o, other)} but {ti.dtype} in {role_t}")


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def prepare(recipe: Recipe, output: Path | None, *, force: bool = False, allow_pickle: bool = False,
            device: str = "cpu", pm: PluginManager) -> _Plan:
    """Every check that needs no tensor data, in the order that fails cheapest first (``output`` None:
    plan only, as ``mergebench convert`` shows it)."""
    method = pm.merge_methods().get(recipe.method)
    if not recipe.experts:
        raise ParameterError("no experts given: a merge needs at least one expert (--expert PATH)")
    settings = ParameterPlan(method, recipe.parameters, [e.parameters for e in recipe.experts],
                             [e.weight for e in recipe.experts])
    settings.for_tensor("")  # method-level values and cross-checks, before any file is opened
    if method.needs_base and recipe.base is None:
        raise ParameterError(f"merge method '{method.name}' needs a base model (--base PATH)")
    out_dtype = parse_dtype(recipe.dtype)
    torch_device = parse_device(device)
    parse_size(recipe.max_shard_size)
    if output is not None:
        AtomicDirectory(output, force).check()

    base = pm.resolve_model(recipe.base.path, allow_pickle) if recipe.base else None
    experts = [pm.resolve_model(e.path, allow_pickle) for e in recipe.experts]
    for source in ([base] if base else []) + experts:
        if output is not None and source.root is not None and _inside(output, source.root):
            raise OutputError(f"{output}: the output would be inside the input model directory {source.root}")
    sources = ([base] if base is not None else []) + experts
    # each input's path as the recipe names it (slices and tokenizer_source refer to inputs so) -> its source
    index = {e.path: i + (base is not None) for i, e in reversed(list(enumerate(recipe.experts)))}
    if recipe.base is not None:
        index[recipe.base.path] = 0
    alignment = None
    if recipe.tokenizer_source is not None:
        alignment = vocab.build(recipe.tokenizer_source, sources, base is not None, index)
    if recipe.slices:
        from mergebench.core.slices import slice_jobs

        jobs, layers = slice_jobs(recipe, sources, base is not None, index)
    else:
        template = sources[0]
        role_t = "the base" if base is not None else "expert 1"
        for i, expert in enumerate(experts):
            if expert is not template:
                _check_compatible(template, role_t, expert, f"expert {i + 1}", aligned=alignment is not None)
        jobs, layers = identity_jobs(template.ordered_names(), len(sources), base is not None), None
    plan = build_plan(method, settings, sources, base is not None, jobs, out_dtype, torch_device, layers)
    if method.calibration is not None and method.calibration(dict(plan.params)) is not None and not recipe.calibration:
        raise ParameterError(f"merge method '{method.name}' learns from data: give calibration data (recipe key "
                             f"'calibration: {{data: FILE.jsonl}}' or --calibration-data FILE.jsonl)")
    if alignment is not None:
        plan.vocab = alignment
        size = vocab.vocab_size(sources[0])
        plan.vocab_names = frozenset(j.name for j in jobs if vocab.is_vocab_tensor(
            j.inputs[0][1], sources[j.inputs[0][0]].tensors[j.inputs[0][1]].shape, size))
    return plan


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor as a merge will produce it (what ``mergebench convert`` shows)."""

    name: str
    inputs: tuple[str, ...]  # "role: tensor name"
    t: float
    params: dict[str, Any]
    weights: tuple[float, ...]
    expert_params: tuple[dict[str, Any], ...]
    dtype: str
    shape: tuple[int, ...]


def describe(recipe: Recipe, *, allow_pickle: bool = False, pm: PluginManager | None = None) -> list[PlannedTensor]:
    """The resolved per-tensor plan of ``recipe`` from metadata alone (no tensor is read)."""
    plan = prepare(recipe, None, allow_pickle=allow_pickle, pm=pm or get_plugin_manager())
    try:
        rows = []
        for job in plan.jobs:
            tp, info = plan.tensor_params[job.name], plan.info(job)
            rows.append(PlannedTensor(job.name, tuple(f"{_role(plan, s).split(' (')[0]}: {n}" for s, n in job.inputs),
                                      job.t, dict(tp.params), tp.weights, tuple(dict(e) for e in tp.expert_params),
                                      str(_out_dtype(plan, info)).removeprefix("torch."), info.shape))
        return rows
    finally:
        for source in plan.sources:
            source.close()


def identity_jobs(names: list[str], n_sources: int, has_base: bool) -> list[TensorJob]:
    """Every tensor merged from the same name in every input; gradients run over the numbered layers."""
    indices = [i for i in map(layer_index, names) if i is not None]
    last = max(indices, default=0)
    experts = tuple(range(n_sources - has_base))
    return [TensorJob(n, tuple((s, n) for s in range(n_sources)), experts,
                      (layer_index(n) or 0) / last if last and layer_index(n) is not None else 0.0)
            for n in names]


def build_plan(method: MergeMethod, settings: ParameterPlan, sources: list[ModelSource], has_base: bool,
               jobs: list[TensorJob], out_dtype: torch.dtype | None, device: torch.device,
               layers: int | None = None) -> _Plan:
    """Resolve every tensor's parameters and run the method's checks on each distinct set of values."""
    tensor_params: dict[str, TensorParams] = {}
    checked: set = set()
    for job in jobs:
        tp = settings.for_tensor(job.name, job.t, job.experts)
        if not all(math.isfinite(w) for w in tp.weights):
            raise ParameterError(f"expert weights must be finite numbers, got {list(tp.weights)} for tensor '{job.name}'")
        key = (tuple(sorted(tp.params.items())), tp.weights, tuple(tuple(sorted(e.items())) for e in tp.expert_params))
        if method.check is not None and key not in checked:
            method.check(dict(tp.params), tp.weights)
            checked.add(key)
        tensor_params[job.name] = tp
    params = settings.method_level()
    first = tensor_params[jobs[0].name] if jobs else None
    if method.analysis is not None and settings.varies and first is not None \
            and method.analysis(dict(first.params), first.expert_params):
        raise ParameterError(f"merge method '{method.name}' with these parameters needs one pre-pass over the whole "
                             f"model, so its parameters cannot vary by tensor (no gradients or filters)")
    return _Plan(method, params, settings, sources, has_base, jobs, tensor_params, out_dtype, device, layers)


class _Writer:
    """Writes tensors on a background thread so disk writes overlap the next tensor's maths."""

    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                    self.error = exc
            item = None  # the tensor written is not held while the next is awaited

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((name, tensor))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.writer.finish()

    def abort(self) -> None:
        self.error = self.error or RuntimeError("aborted")
        self.queue.put(None)
        self.thread.join()
        self.writer.abort()


# Chunk lengths must be even (random_keep_mask draws two entries per 32-bit word).
CHUNK = 1 << 18  # elements per chunk on the CPU: a few chunks of every input fit in the L2 cache
# A chunked reader lets go of its inputs' mapped pages every huge page (2 MiB) it reads of each input, not every
# chunk (ModelSource.release drops whole huge pages: partial ones split the kernel's mappings, which costs more).
RELEASE_BYTES = HUGE_PAGE
CUDA_CHUNK = 1 << 24  # on a GPU, large chunks amortise the host-to-device copies and kernel launches


def _chunk_size(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else CUDA_CHUNK


def _finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``. A finite sum has neither (NaN and Inf propagate through it), and a sum is half the
    time of aminmax on a chunk; a sum that overflowed from finite entries is settled by aminmax (NaN propagates
    through it). The sum stays in x's dtype: ``sum(dtype=float32)`` of a bfloat16 tensor casts it first, 20x
    slower on a whole tensor (a float16 sum overflows sooner, and then costs the aminmax too)."""
    if x.numel() == 0 or not x.is_floating_point():
        return True
    if math.isfinite(x.sum().item()):  # one torch call fewer than isfinite(...) and bool(...)
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _finite_or_fail(x: torch.Tensor, what: str, name: str) -> None:
    if not _finite(x):
        raise InputError(f"{what}: tensor '{name}' contains NaN or Inf values")


def _out_dtype(plan: _Plan, info: TensorInfo) -> torch.dtype:
    """Floating-point tensors are written in --dtype when given, everything else as the template has it."""
    return plan.out_dtype if (plan.out_dtype is not None and info.is_float) else info.dtype


def _role(plan: _Plan, source: int) -> str:
    if plan.has_base and source == 0:
        return _describe("base", plan.sources[0])
    return _describe(f"expert {source + 1 - plan.has_base}", plan.sources[source])


def _inputs(plan: _Plan, job: TensorJob) -> tuple[list[torch.Tensor], list[str]]:
    raws = [plan.sources[s].load(n) for s, n in job.inputs]
    if plan.vocab is not None and job.name in plan.vocab_names:  # rows permuted into the output vocabulary
        raws = plan.vocab.align([s for s, _ in job.inputs], raws)
    return raws, [_role(plan, s) for s, _ in job.inputs]


def _split(plan: _Plan, tensors: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    return (tensors[0], tensors[1:]) if plan.has_base else (None, tensors)


class _Chunks:
    """Reads one tensor of every input as float32 chunks into the rows of a reused buffer, checking each chunk for
    NaN/Inf.

    The inputs' mapped pages leave the process as they are read (a pass that reads them again faults them back
    in from the page cache): one tensor's inputs are never resident whole, whatever its size. Every chunk costs a
    handful of torch calls whatever the number of inputs (one check over all of them, views made once per
    tensor): each call takes the GIL twice, which the engine's workers otherwise queue for."""

    def __init__(self, plan: _Plan, buffers: torch.Tensor, job: TensorJob, check: bool = True):
        raws, self.roles = _inputs(plan, job)
        self.check = check
        self.flat = [r.reshape(-1) for r in raws]
        self.block = buffers[:len(raws)]
        self.job, self.plan = job, plan
        self.numel = self.flat[0].numel()

    def __iter__(self):
        step = _chunk_size(self.plan.device)
        pieces = [f.split(step) for f in self.flat]
        released = [0] * len(self.flat)  # bytes of each input whose pages this reader has let go of
        for k, offset in enumerate(range(0, self.numel, step)):
            n = min(step, self.numel - offset)
            block = self.block if n == step else self.block[:, :n]
            chunk = block.unbind(0)  # fresh views: a method may empty its inputs (merge_ops.release_)
            for i, (x, piece) in enumerate(zip(chunk, pieces)):
                x.copy_(piece[k])
                read = (offset + n) * self.flat[i].element_size()
                if read - released[i] >= RELEASE_BYTES or offset + n == self.numel:
                    # the pages read so far leave this process's RSS, so a tensor's inputs are never resident whole
                    source, name = self.job.inputs[i]
                    self.plan.sources[source].release(name, released[i], read)
                    released[i] = read
            if self.check and not _finite(block):
                for x, role in zip(chunk, self.roles):  # the first input that holds one, named
                    _finite_or_fail(x, role, self.job.name)
            yield offset, n, _split(self.plan, list(chunk))


def _identical(raws: list[torch.Tensor]) -> bool:
    """All inputs hold the same bytes; a short prefix comparison rejects the usual case cheaply."""
    first = raws[0].reshape(-1)
    others = [r.reshape(-1) for r in raws[1:]]
    if any(r.dtype != first.dtype for r in others):
        return False
    if not all(torch.equal(r[:4096], first[:4096]) for r in others):
        return False
    return all(torch.equal(r, first) for r in others)


def _chunk_buffers(plan: _Plan) -> torch.Tensor:
    """A float32 chunk buffer per input, as the rows of one tensor on the merge device."""
    return torch.empty(len(plan.sources), _chunk_size(plan.device), dtype=torch.float32, device=plan.device)


def _observe(analysis, plan: _Plan, buffers: torch.Tensor, jobs: list[TensorJob],
             progress: ProgressCallback | None = None) -> None:
    """Stream ``jobs``' inputs through every pass of ``analysis``; the first pass also checks for NaN/Inf."""
    total = sum(plan.info(j).nbytes for j in jobs)
    for p in range(analysis.passes):
        done = 0
        for job in jobs:
            for _, _, (base, experts) in _Chunks(plan, buffers, job, check=p == 0):
                analysis.observe(p, job.name, base, experts)
            done += plan.info(job).nbytes
            if progress:
                progress(f"whole-model analysis, pass {p + 1}/{analysis.passes}", done, total, job.name)
        analysis.end_pass(p)


def run_analysis(plan: _Plan, progress: ProgressCallback | None = None):
    """The method's whole-model pre-pass over every floating-point tensor, or None when it has none."""
    floats = [j for j in plan.jobs if plan.info(j).is_float]
    if plan.method.analysis is None or not floats:
        return None
    # parameters cannot vary by tensor when there is a whole-model pre-pass (build_plan refuses it)
    tp = plan.tensor_params[floats[0].name]
    analysis = plan.method.analysis(dict(tp.params), tp.expert_params)
    if analysis is None:
        return None
    if len({j.experts for j in floats}) > 1:
        raise ParameterError(f"merge method '{plan.method.name}' with these parameters needs one pre-pass over the "
                             f"whole model, so every tensor must be merged from the same inputs (no slices)")
    _observe(analysis, plan, _chunk_buffers(plan), floats, progress)
    return analysis


def _check_output(plan: _Plan, merged: Any, name: str, shape: tuple[int, ...]) -> None:
    if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != shape:
        got = tuple(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
        raise MergebenchError(f"merge method '{plan.method.name}' returned {got} for tensor '{name}', expected {shape}")


_OVERFLOW_HINTS = {torch.float16: " (too large for float16? try --dtype bfloat16)",
                   torch.bfloat16: " (too large for bfloat16? try --dtype float32)"}


def _check_finite_output(plan: _Plan, out: torch.Tensor, name: str) -> None:
    """``out`` in the output dtype: a finite float32 result may still overflow when cast to a narrower one."""
    if not _finite(out):
        hint = _OVERFLOW_HINTS.get(out.dtype, "")
        raise MergebenchError(f"merge method '{plan.method.name}' produced NaN or Inf in tensor '{name}'{hint}")


def merge_tensor(plan: _Plan, job: TensorJob, analysis, seed: int, buffers: torch.Tensor,
                 fn: MergeFn | None = None) -> torch.Tensor | None:
    """The one per-tensor merge path, for the streaming engine and in-memory sweeps alike.

    Returns ``fn``'s result (default: the method's ``merge``) for ``job`` in the output dtype, or None
    when there is nothing to merge: a non-float tensor, or inputs that are all the same bytes where the
    method maps equal inputs to themselves (``fixed_point``; the caller copies the first input). Conventions: inputs are checked for NaN/Inf; a stochastic method's
    random streams follow each expert's stored bytes for this tensor (order- and layout-free); an
    elementwise method streams through float32 chunks of every input (per-tensor pre-pass first),
    any other method gets whole float32 tensors ((N + 2) copies of this tensor at most).
    """
    info = plan.info(job)
    if not info.is_float:
        return None
    raws, roles = _inputs(plan, job)
    method = plan.method
    tp = plan.tensor_params[job.name]
    if _identical(raws) and (method.fixed_point is None or method.fixed_point(dict(tp.params), tp.weights,
                                                                              tp.expert_params)):
        _finite_or_fail(raws[0], roles[0], job.name)
        return None
    fn = fn or method.merge
    out_dtype = _out_dtype(plan, info)
    # each expert's bytes hashed (sha256 runs without the GIL): on every core this job was given
    streams = tuple(ordered_map(content_key, _split(plan, raws)[1], torch.get_num_threads())) if method.stochastic \
        else None
    ctx = TensorContext(name=job.name, weights=tp.weights, seed=seed, streams=streams, expert_params=tp.expert_params,
                        analysis=analysis.result_for(job.name) if analysis is not None else None)
    if plan.statistics is not None:  # each expert's statistic for its own input tensor
        names = [n for _, n in job.inputs[plan.has_base:]]
        ctx.statistics = tuple(plan.statistics[e].get(n) for e, n in zip(job.experts, names))
    params = dict(tp.params)
    if not method.elementwise:
        f32 = []
        for raw, role, (source, name) in zip(raws, roles, job.inputs):
            x = raw.to(plan.device, torch.float32, copy=True)
            plan.sources[source].release(name)  # the float32 copy is what the method reads from here on
            _finite_or_fail(x, role, job.name)
            f32.append(x)
        base, experts = _split(plan, f32)
        merged = fn(base, experts, params, ctx)
        del f32, base, experts, x  # the inputs go before the output-dtype copy is made beside the result
        _check_output(plan, merged, job.name, info.shape)
        out = merged.to("cpu", out_dtype)
        _check_finite_output(plan, out, job.name)
        return out
    checked = analysis is not None  # the whole-model pre-pass already checked every input
    if method.tensor_analysis is not None and ctx.analysis is None:
        per_tensor = method.tensor_analysis(params, ctx)
        if per_tensor is not None:
            _observe(per_tensor, plan, buffers, [job])
            ctx.analysis = per_tensor.result_for(job.name)
            checked = True
    out = torch.empty(info.numel, dtype=out_dtype)
    for offset, n, (base, experts) in _Chunks(plan, buffers, job, check=not checked):
        ctx.offset = offset
        merged = fn(base, experts, params, ctx)
        _check_output(plan, merged, job.name, (n,))
        piece = out[offset:offset + n]
        piece.copy_(merged)
        _check_finite_output(plan, piece, job.name)
    return out.view(info.shape)


def _merge_one(plan: _Plan, job: TensorJob, analysis, seed: int, buffers: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The output tensor for ``job`` and whether it went through the method's maths."""
    merged = merge_tensor(plan, job, analysis, seed, buffers)
    if merged is not None:
        return merged, True
    raws, roles = _inputs(plan, job)  # the first: the base, or expert 1 when there is none (aligned if by token)
    out = raws[0].to(_out_dtype(plan, plan.info(job)), copy=True)
    if out.dtype != raws[0].dtype and not _finite(out):  # the input was checked: the cast overflowed
        raise InputError(f"tensor '{job.name}' (copied from the {roles[0]}) overflows to Inf in "
                         f"{str(out.dtype).removeprefix('torch.')}{_OVERFLOW_HINTS.get(out.dtype, '')}")
    return out, False


def _copy_config_files(plan: _Plan, directory: Path) -> None:
    if plan.template.root is None:
        return
    for path in iter_config_files(plan.template.root):
        shutil.copy2(path, directory / path.name)
    config_path = directory / "config.json"
    if plan.vocab is not None:
        vocab.write_tokenizer(plan.vocab, directory)
    if (plan.out_dtype is not None or plan.layers is not None or plan.vocab is not None) and config_path.is_file():
        config = json.loads(config_path.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in config and plan.out_dtype is not None:
                config[key] = DTYPE_CONFIG_NAMES.get(plan.out_dtype, str(plan.out_dtype))
        if plan.vocab is not None:
            config["vocab_size"] = plan.vocab.size
        if plan.layers is not None:  # slices stacked a different number of layers
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if key in config:
                    config[key] = plan.layers
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def _hash_inputs(plan: _Plan, pool: ThreadPoolExecutor) -> list[tuple[str, ModelSource, Future]]:
    sources = ([("base", plan.base)] if plan.base is not None else []) + [
        (f"expert {i + 1}", s) for i, s in enumerate(plan.experts)]
    jobs = []
    for role, source in sources:
        futures = {f.name: pool.submit(sha256_file, f) for f in source.files}
        jobs.append((role, source, futures))
    return jobs


class _MemoryGate:
    """Working memory shared by the workers: a whole-tensor job holds (inputs + 1) float32 copies of its tensor.
    A job waits until its bytes fit in ``capacity`` beside the running ones, or until none runs."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._cond = threading.Condition()

    def acquire(self, size: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + size <= self.capacity)
            self.used += size

    def release(self, size: int) -> None:
        with self._cond:
            self.used -= size
            self._cond.notify_all()


def _working_bytes(plan: _Plan, job: TensorJob) -> int:
    """A whole-tensor job's float32 working set: every input and the output."""
    return (len(job.inputs) + 1) * plan.info(job).numel * 4


def _merge_tensors(plan: _Plan, order: list[TensorJob], analysis, seed: int, workers: int, writer: "_Writer",
                   progress: ProgressCallback | None) -> int:
    """Merge every tensor in ``order`` on ``workers`` threads, handing results to the writer in order.

    Each worker merges whole tensors with its own chunk buffers and one intra-op thread, so the cores
    are used without synchronising inside small ops; results do not depend on which worker ran them.

    Whole-tensor methods share the largest job's working set, (N + 2) float32 copies of the largest tensor
    (:class:`_MemoryGate`): smaller tensors run together as they fit, beside finished outputs waiting for their turn
    to be written, and a tensor of the largest size (an embedding, an output head) starts once the outputs before it
    are handed to the writer and runs with nothing beside it, on every worker's cores (intra-op threads; a method's
    maths may not depend on the thread count, which ``mergebench plugin check`` checks).
    """
    free: queue.Queue = queue.Queue()
    for _ in range(workers):
        free.put(_chunk_buffers(plan))
    # elementwise methods work in their chunk buffers; the others hold whole tensors
    sizes = {j.name: _working_bytes(plan, j) for j in order}
    capacity = max(sizes.values(), default=0)
    gate = None if plan.method.elementwise else _MemoryGate(capacity)

    def alone(job: TensorJob) -> bool:  # more than half the gate: no other of its size (of the largest: nothing) beside it
        return gate is not None and 2 * sizes[job.name] > capacity

    def task(job: TensorJob) -> tuple[torch.Tensor, bool]:
        set_torch_threads(workers if alone(job) else 1)  # every worker's cores for a job that runs alone
        buffers = free.get()
        working = 0
        try:
            if gate is not None:
                gate.acquire(sizes[job.name])
                working = sizes[job.name]
                if alone(job):  # what the smaller jobs before it freed is no longer needed
                    return_free_heap()
            return _merge_one(plan, job, analysis, seed, buffers)
        finally:
            if working:
                gate.release(working)
            free.put(buffers)
            for source, name in job.inputs:
                plan.sources[source].release(name)

    def out_bytes(job: TensorJob) -> int:
        info = plan.info(job)
        return info.numel * _out_dtype(plan, info).itemsize

    # Finished-or-running outputs are held until written in order; a budget of twice the largest
    # output lets one worker get through many small tensors while another merges a large one.
    budget = 2 * max(out_bytes(n) for n in order)
    total, done, merged_count = sum(plan.info(j).nbytes for j in order), 0, 0
    pending: deque[tuple[TensorJob, Future]] = deque()
    pending_bytes = 0

    def write_oldest() -> None:
        nonlocal done, merged_count, pending_bytes
        finished, future = pending.popleft()
        tensor, merged = future.result()
        pending_bytes -= out_bytes(finished)
        merged_count += merged
        writer.put(finished.name, tensor)
        done += plan.info(finished).nbytes
        if progress:
            progress("merging", done, total, finished.name)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for job in order:
                # a job that runs alone starts once the outputs before it are written: none waits beside it
                while pending and (pending_bytes + out_bytes(job) > budget or len(pending) >= 64 or alone(job)):
                    write_oldest()
                for source, name in job.inputs:
                    plan.sources[source].prefetch(name)
                pending.append((job, pool.submit(task, job)))
                pending_bytes += out_bytes(job)
            while pending:
                write_oldest()
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
    return merged_count


def calibrate(plan: _Plan, data: dict[str, Any] | None,
              progress: ProgressCallback | None = None) -> list[dict[str, Any]]:
    """Attach each expert's calibration statistics to ``plan`` when its method asks for them (computed once,
    then read from the cache); per expert, what the card records of them (none when nothing was asked for)."""
    request = plan.method.calibration(dict(plan.params)) if plan.method.calibration is not None else None
    if request is None:
        return []
    from mergebench.core import calibration

    specs, plan.statistics = calibration.per_expert(plan.experts, request, data, plan.device, progress)
    return [{"expert": i + 1, "data": str(spec.path.resolve()), "sha256": sha256_file(spec.path),
             "parameters": spec.parameters(), "statistic": request.kind, "artefact": stats.path.parent.name}
            for i, (spec, stats) in enumerate(zip(specs, plan.statistics))]


def check_free_space(output: Path, needed: int) -> None:
    """Refuse before writing when the output's filesystem cannot hold the merge (its size is known from
    metadata): failing after an hour of merging on a full disk helps nobody."""
    import shutil

    where = Path(output).resolve()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    margin = 16 << 20  # config, tokenizer and card files beside the weights
    if free < needed + margin:
        raise InputError(f"{output}: the merge needs {(needed + margin) / 2**30:.2f} GiB but {where} has "
                         f"{free / 2**30:.2f} GiB free; free some space or choose another output")


def run(recipe: Recipe, output: Path, *, force: bool = False, allow_pickle: bool = False, device: str = "cpu",
        threads: int | None = None, pm: PluginManager | None = None,
        progress: ProgressCallback | None = None) -> MergeResult:
    """Merge as ``recipe`` says into ``output``; raises MergebenchError subclasses for every user error.

    ``threads`` (default: torch's thread count) is the number of tensors merged at once.
    """
    started = time.perf_counter()
    if threads is not None and threads < 1:
        raise ParameterError(f"--threads must be at least 1, got {threads}")
    pm = pm or get_plugin_manager()
    output = Path(output)
    plan = prepare(recipe, output, force=force, allow_pickle=allow_pickle, device=device, pm=pm)
    check_free_space(output, sum(plan.info(j).numel * _out_dtype(plan, plan.info(j)).itemsize for j in plan.jobs))
    calibrated = calibrate(plan, recipe.calibration, progress)
    old_threads = torch.get_num_threads()
    # On a GPU one host thread feeds the device; on the CPU, one worker per core.
    workers = threads or (1 if plan.device.type == "cuda" else old_threads)
    try:
        with AtomicDirectory(output, force) as tmp, ThreadPoolExecutor(max_workers=1) as hasher:
            hash_jobs = _hash_inputs(plan, hasher)
            torch.set_num_threads(workers)  # the whole-model pre-pass runs on one thread, intra-op parallel
            analysis = run_analysis(plan, progress)
            jobs = {j.name: j for j in plan.jobs}
            shards = plan_shards([OutputTensor(j.name, _out_dtype(plan, plan.info(j)), plan.info(j).shape)
                                  for j in plan.jobs], parse_size(recipe.max_shard_size))
            writer = _Writer(ShardWriter(tmp, shards, {"merged_with": "mergebench", "method": plan.method.name}))
            order = [jobs[t.name] for s in shards for t in s.tensors]
            try:
                merged_count = _merge_tensors(plan, order, analysis, recipe.seed, workers, writer, progress)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            _copy_config_files(plan, tmp)
            inputs = _verify_hashes(recipe, hash_jobs)
            result = MergeResult(output, plan.method.name, plan.params, recipe.seed, merged_count,
                                 len(order) - merged_count, time.perf_counter() - started, inputs, calibrated)
            write_card(tmp, recipe, plan.method, result, _dtype_words(plan))
    finally:
        torch.set_num_threads(old_threads)
        for source in plan.sources:
            source.close()
    return result


def _dtype_words(plan: _Plan) -> str:
    if plan.out_dtype is not None:
        return DTYPE_CONFIG_NAMES.get(plan.out_dtype, str(plan.out_dtype))
    floats = sorted({str(i.dtype).removeprefix("torch.") for i in plan.template.tensors.values() if i.is_float})
    return f"as the {'base' if plan.base is not None else 'first expert'} ({', '.join(floats) or 'no floats'})"


def _verify_hashes(recipe: Recipe, hash_jobs) -> list[dict[str, Any]]:
    expected: list[ModelInput | None] = ([recipe.base] if recipe.base else []) + list(recipe.experts)
    inputs = []
    for (role, source, futures), wanted in zip(hash_jobs, expected):
        files = {name: f.result() for name, f in futures.items()}
        digest = combined_sha256(files)
        if wanted is not None and wanted.sha256 and wanted.sha256 != digest:
            raise InputError(
                f"{_describe(role, source)}: content sha256 {digest[:12]}... differs from the recipe's "
                f"{wanted.sha256[:12]}...; the input changed since the recipe was written"
            )
        local = Path(source.reference).expanduser()
        resolved = str(local.resolve()) if local.exists() else source.reference  # hub ids stay as given
        entry = {"role": role, "reference": source.reference, "path": resolved, "sha256": digest, "files": files}
        if role != "base":
            entry["weight"] = recipe.experts[int(role.split()[1]) - 1].weight
        inputs.append(entry)
    return inputs

