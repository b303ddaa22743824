"""Calibration statistics for data-aware merge methods: what they ask for, how it is collected, where it is kept.

A method declares ``MergeMethod.calibration = params -> CalibrationRequest | None``; the engine parses the
recipe's ``calibration`` mapping (:meth:`CalibrationData.parse`), calls :func:`statistics` once per expert
and hands each tensor's per-expert statistic to the maths as ``ctx.statistics``.

Data (``calibration: {data: FILE.jsonl, samples: 128, max_length: 256, batch_size: 8, seed: 0}``, or
``--calibration-data FILE.jsonl``; ``data`` may also list one file per expert, ``--calibration-data`` given once
per expert, so that each expert's statistics come from its own task's data): one JSON object per line, ``{"text": ...}``, or a pair joined into one
text with nothing in between: ``{"prompt", "completion"}``, ``{"input", "target"}`` or ``{"query",
"answer"}`` (the suites' rows; completions carry their own leading space). Blank lines are skipped. With
more than ``samples`` rows, ``samples`` of them are drawn without replacement (``random.Random(seed)``)
and used in file order. Each text is tokenized by the expert's own tokenizer with its defaults (a Llama
tokenizer adds BOS) and cut from the left to ``max_length`` tokens, so a pair's completion survives.

Kinds of statistics (every expert runs as transformers' ``AutoModelForCausalLM`` from its directory, in
float32 on the merge's device, eval mode, no dropout):

- ``gram`` (RegMean, Jin et al., arXiv:2212.09849): for the weight of every ``nn.Linear`` and
  transformers ``Conv1D``, G = X^T X, X the layer's inputs (one row per non-padding token, every token
  of the text), summed over the data in float32, and the token count. One forward pass per expert:
  batches of ``batch_size`` texts, right-padded, padding masked out of attention and out of G (a layer
  whose inputs are not laid out per token, e.g. a mixture-of-experts expert, counts every row it sees).
  Layers that read one input tensor in turn (q/k/v, gate/up) share one product, and each product is computed
  as its lower triangle by blocks of columns, about half of a full X^T X. The output head computes no logits
  in the pass (its input is all a Gram needs). A weight shared with
  another parameter (tied embeddings) gets no Gram: the one tensor serves two roles, so it is averaged.
  ``get(name)`` returns a :class:`Gram`.
- ``fisher`` (Fisher merging, Matena & Raffel, arXiv:2111.09832): the diagonal empirical Fisher of every
  parameter, F = (1/N) sum_n (d log p(x_n) / d theta)^2, the squared gradient of each example's own
  log-likelihood (per example, as the paper; not the square of a batch's summed gradient, as
  FusionBench/MergeLM do). log p(x_n) is the sum over scored tokens of log p(x_t | x_<t): the completion's
  tokens for a pair (the prompt is context), every token after the first for a text. "Empirical": the
  tokens of the data, not samples from the model. ``batch_size`` is unused (one backward per example);
  an example with nothing to score is skipped and not counted. Tied parameters get their Fisher under
  every name the files hold them by. ``get(name)`` returns a :class:`Fisher`: a float32 tensor shaped as the
  parameter, and the L2 norm of the expert's whole Fisher (over every parameter the files hold, a tied one
  counted once), for methods that normalise each expert's Fisher by it.

Statistics are keyed by the files the model would be rebuilt from and nothing else (names as the model's
``state_dict``, kept only where the model's files hold that tensor), and cached as one safetensors
artefact under ``MERGEBENCH_HOME/artifacts/calibration/KEY/``, KEY a hash of: the model's content hash
(combined sha256 of its weight, config and tokenizer files), the data file's sha256, the request, this
module's source (the code version), the data parameters and the transformers version. A second call
reads the artefact without loading the model. ``get`` reads one tensor at a time from it (``safe_open``),
so a merge holds one layer's statistics per expert. A statistic that several names share (the Gram of an input
that q/k/v or gate/up all read, a tied parameter's Fisher) is stored once, the other names mapped to it in the
artefact's metadata (``same_as``).

Peak memory while collecting: the model in float32 on the device, plus one batch's activations and, for
``gram``, one in x in product at a time on the device and every linear layer's Gram on the CPU
(sum over layers of in_features^2 x 4 bytes, about 1.2x the float32 model for a Llama), or, for ``fisher``,
gradients and the running sum on the device (3x the float32 model in all).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import uuid
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import torch

from mergebench.core.errors import InputError, ParameterError
from mergebench.core.hashing import combined_sha256, sha256_file
from mergebench.core.paths import mergebench_home
from mergebench.core.registry import Param

log = logging.getLogger(__name__)

KINDS = ("gram", "fisher")
MANIFEST = "mergebench-artifact.json"  # the study's artefact cache marks a finished entry with the same file
ARTEFACT = "statistics.safetensors"
_FIELDS = ("text",), ("prompt", "completion"), ("input", "target"), ("query", "answer")
_PARAMS = (
    Param("samples", int, 128, "calibration examples drawn from the file", min=1),
    Param("max_length", int, 256, "tokens per example at most (cut from the left)", min=2),
    Param("batch_size", int, 8, "examples per forward pass (gram)", min=1),
    Param("seed", int, 0, "seed for drawing the examples"),
)

# progress(stage, done, total, name), as the engine's
ProgressCallback = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class CalibrationRequest:
    """What a data-aware method needs from each expert: ``kind`` is ``gram`` or ``fisher`` (module docstring)."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ParameterError(f"unknown calibration statistic '{self.kind}' (valid: {', '.join(KINDS)})")


@dataclass(frozen=True)
class Gram:
    """X^T X of one linear layer's inputs (in x in, float32) over ``tokens`` tokens. ``transposed``: the
    weight is stored (in, out), as transformers' ``Conv1D`` (GPT-2) does, instead of nn.Linear's (out, in)."""

    matrix: torch.Tensor
    tokens: int
    transposed: bool = False


@dataclass(frozen=True)
class Fisher:
    """One parameter's diagonal Fisher (float32, shaped as the parameter) and ``model_norm``: the L2 norm of the
    expert's Fisher over the whole model (every parameter its files hold, a tied one counted once)."""

    values: torch.Tensor
    model_norm: float


@dataclass(frozen=True)
class CalibrationData:
    """The calibration examples: (prompt, completion) pairs, a text being a pair with an empty prompt."""

    path: Path
    samples: int = 128
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0
    rows: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def parse(cls, mapping: Mapping[str, Any] | None) -> CalibrationData:
        """The recipe's ``calibration`` mapping, checked, with the file read and validated (no model is loaded)."""
        if not mapping or not isinstance(mapping, Mapping) or not mapping.get("data"):
            raise ParameterError("calibration needs a data file: recipe key 'calibration: {data: FILE.jsonl}' "
                                 "or --calibration-data FILE.jsonl")
        known = {p.name: p for p in _PARAMS}
        unknown = sorted(set(mapping) - set(known) - {"data"})
        if unknown:
            raise ParameterError(f"unknown calibration key(s) {unknown} (valid: data, {', '.join(known)})")
        values = {n: p.coerce(mapping[n], "calibration") if n in mapping else p.default for n, p in known.items()}
        path = Path(str(mapping["data"])).expanduser()
        return cls(path, rows=_read_rows(path), **values)

    @classmethod
    def parse_each(cls, mapping: Mapping[str, Any] | None, experts: int) -> list[CalibrationData]:
        """Per expert, its calibration data. ``data`` is one file for every expert, or a list of one file per
        expert in recipe order: each expert's own task data, as RegMean and Fisher merging compute each model's
        statistics on the data it was trained for (what ``mergebench run`` gives)."""
        files = mapping.get("data") if isinstance(mapping, Mapping) else None
        if not isinstance(files, (list, tuple)):
            return [cls.parse(mapping)] * experts
        if len(files) != experts:
            raise ParameterError(f"calibration data lists {len(files)} file(s) for {experts} expert(s); give one "
                                 f"file for all of them, or one per expert in order")
        return [cls.parse({**mapping, "data": f}) for f in files]

    def parameters(self) -> dict[str, int]:
        return {p.name: getattr(self, p.name) for p in _PARAMS}

    def chosen(self) -> list[tuple[str, str]]:
        """The rows used: all of them, or ``samples`` drawn by ``seed``, in file order."""
        if len(self.rows) <= self.samples:
            return list(self.rows)
        return [self.rows[i] for i in sorted(random.Random(self.seed).sample(range(len(self.rows)), self.samples))]


def _read_rows(path: Path) -> tuple[tuple[str, str], ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such calibration data file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory; calibration data is a JSONL file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read calibration data ({getattr(exc, 'strerror', None) or exc})") from None
    rows = []
    expected = 'expected {"text": ...}, or "prompt"/"completion", "input"/"target" or "query"/"answer" strings'
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path} line {number}: not JSON ({exc.args[0] if exc.args else exc})") from None
        fields = next((f for f in _FIELDS if isinstance(row, dict) and all(k in row for k in f)), None)
        if fields is None or not all(isinstance(row[k], str) for k in fields):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise InputError(f"{path} line {number}: {expected}; got {got}")
        rows.append(("", row["text"]) if fields == ("text",) else (row[fields[0]], row[fields[1]]))
    if not rows:
        raise InputError(f"{path}: no calibration examples (the file is empty); write one JSON object per line, "
                         f'e.g. {{"text": "..."}}')
    return tuple(rows)


class Statistics:
    """One expert's statistics, read lazily from their artefact: ``get(tensor_name)`` -> :class:`Gram` (gram),
    a :class:`Fisher` (fisher), or None where the tensor has none."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = frozenset(f.keys())
        self.kind = meta.get("kind", "")
        self._same_as: dict[str, str] = json.loads(meta.get("same_as", "{}"))  # a name -> the name it is stored under
        self._names = stored | self._same_as.keys()
        self.tokens: dict[str, int] = json.loads(meta.get("tokens", "{}"))
        self.transposed = frozenset(json.loads(meta.get("transposed", "[]")))
        self.examples = int(meta.get("examples", "0"))
        self.model_norm = float(meta.get("model_norm", "nan"))

    def names(self) -> list[str]:
        return sorted(self._names)

    def get(self, name: str) -> Gram | Fisher | None:
        if name not in self._names:
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:  # one open per call: thread-safe
            tensor = f.get_tensor(self._same_as.get(name, name))
        if self.kind == "gram":
            return Gram(tensor, self.tokens.get(name, 0), name in self.transposed)
        return Fisher(tensor, self.model_norm)


def statistics(source, request: CalibrationRequest, data: CalibrationData, device: torch.device | str = "cpu",
               progress: ProgressCallback | None = None) -> Statistics:
    """``request``'s statistics of the model ``source`` (a ModelSource) over ``data``: from the cache, or
    computed (one forward pass per batch for gram, one forward and backward per example for fisher) and cached."""
    if source.root is None or not (Path(source.root) / "config.json").is_file():
        raise InputError(f"{source.reference}: calibration runs the model, so it needs a model directory with "
                         f"config.json and tokenizer files, not a bare weights file")
    spec = {"model": model_hash(source), "data": sha256_file(data.path), "request": asdict(request),
            "code": code_version(), "parameters": data.parameters(), "transformers": _transformers_version()}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
    entry = mergebench_home() / "artifacts" / "calibration" / key
    if not (entry / MANIFEST).is_file():
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(entry.with_name(key + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process computing the same entry: wait, then read it
            if not (entry / MANIFEST).is_file():
                _build(entry, spec, source, request, data, torch.device(device), progress)
    return Statistics(entry / ARTEFACT)


def per_expert(sources, request: CalibrationRequest, mapping: Mapping[str, Any] | None,
               device: torch.device | str = "cpu", progress: ProgressCallback | None = None
               ) -> tuple[list[CalibrationData], list[Statistics]]:
    """Each expert's data (:meth:`CalibrationData.parse_each` of the recipe's ``calibration`` mapping) and its
    statistics: what a merge, and a study's in-memory sweep of it, hand the maths."""
    specs = CalibrationData.parse_each(mapping, len(sources))
    return specs, [statistics(source, request, spec, device=device, progress=progress)
                   for source, spec in zip(sources, specs)]


def model_hash(source) -> str:
    """Combined sha256 of the model's weight files and of its config and tokenizer files."""
    from mergebench.core.tensor_io import iter_config_files

    files = {f"weights/{p.name}": sha256_file(p) for p in source.files}
    files.update({p.name: sha256_file(p) for p in iter_config_files(Path(source.root))})
    return combined_sha256(files)


def code_version() -> str:
    return sha256_file(Path(__file__))


def _transformers_version() -> str:
    from importlib.metadata import version  # not importing transformers: a cached merge never needs it

    return version("transformers")


def _build(entry: Path, spec: dict, source, request: CalibrationRequest, data: CalibrationData,
           device: torch.device, progress: ProgressCallback | None) -> None:
    from safetensors.torch import save_file

    model = load_model(Path(source.root), device)
    tokenizer = load_tokenizer(Path(source.root))
    examples = [encode(tokenizer, prompt, completion, data.max_length) for prompt, completion in data.chosen()]
    examples = [e for e in examples if e[0]]
    if not examples:
        raise InputError(f"{data.path}: every calibration example is empty after tokenization")
    stage = f"calibrating {Path(source.reference).name or source.reference} ({request.kind})"
    if request.kind == "gram":
        tensors, meta = _grams(model, examples, data.batch_size, _pad_id(tokenizer), device, stage, progress)
    else:
        tensors, meta = _fishers(model, examples, device, stage, progress)
    kept = {n: t for n, t in tensors.items() if n in source.tensors}
    if not kept:
        raise InputError(f"{source.reference}: none of the {len(tensors)} {request.kind} statistics names a tensor in "
                         f"the model's files (e.g. '{next(iter(tensors), '?')}'); its state_dict names differ")
    if len(kept) < len(tensors):
        log.warning("%s: %d %s statistics name no tensor in the files (e.g. '%s'); those tensors are averaged",
                    source.reference, len(tensors) - len(kept), request.kind, next(n for n in tensors if n not in kept))
    if request.kind == "fisher":
        meta["model_norm"] = _model_norm(kept, meta.pop("tied"))
    kept, meta["same_as"] = _one_copy_each(kept)
    meta = {"kind": request.kind, **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}}
    tmp = entry.with_name(f".{entry.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        save_file({n: t.contiguous() for n, t in kept.items()}, str(tmp / ARTEFACT), metadata=meta)
        (tmp / MANIFEST).write_text(json.dumps({"kind": "calibration", "key": entry.name, "spec": spec}, indent=2,
                                               sort_keys=True))
        if entry.exists():  # a stale entry without a manifest (interrupted)
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _one_copy_each(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(each distinct tensor object under the first of its names, {every further name: that name}). Layers that read
    one input (q/k/v, gate/up) share a Gram, a tied parameter its Fisher: stored once (at Llama's shapes the shared
    Grams are 3 of 7 per layer), as safetensors keeps no shared storage."""
    first: dict[int, str] = {}
    stored: dict[str, torch.Tensor] = {}
    same_as: dict[str, str] = {}
    for name, tensor in tensors.items():
        if id(tensor) in first:
            same_as[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
            stored[name] = tensor
    return stored, same_as


def _model_norm(tensors: dict[str, torch.Tensor], tied: list[list[str]]) -> float:
    """The L2 norm over all of ``tensors`` (in float64), each group of ``tied`` names counted once."""
    also = {name for group in tied for name in sorted(n for n in group if n in tensors)[1:]}
    return math.sqrt(sum(float(t.double().square().sum()) for n, t in tensors.items() if n not in also))


def load_model(root: Path, device: torch.device) -> torch.nn.Module:
    """The causal LM in float32 on ``device``, eval mode (no dropout)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for an unloadable model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{root}: cannot load as a causal language model for calibration ({first})") from None
    return model.to(device).eval()


def load_tokenizer(root: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root))
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{root}: no usable tokenizer for calibration ({first})") from None


def encode(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """(token ids of prompt + completion, first position whose token is scored by fisher), cut from the left.

    The prompt's length is its own token count (a prefix of the joined text's tokens when the completion
    starts at a word boundary; one too many for a tokenizer that ends every text with an end token); a text
    (empty prompt) scores every token after the first."""
    ids = list(tokenizer(prompt + completion)["input_ids"])
    start = len(tokenizer(prompt)["input_ids"]) if prompt else 1
    cut = max(0, len(ids) - max_length)
    return ids[cut:], max(1, start - cut)


def _pad_id(tokenizer) -> int:
    """Padded positions hold any id (they are masked out): the pad token, else EOS, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


def _aliases(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every name each parameter goes by (tied parameters have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


GRAM_BLOCK = 256  # columns per block of the lower triangle: 45% of a full x^T x's time (1024 x 2048, 2 threads)


def _add_lower_gram_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc's lower triangle (diagonal included) += that of x^T x, by blocks of columns: a Gram is symmetric, and
    the blocks above the diagonal would be (k + 1) / 2k of the work for k blocks."""
    n = x.shape[1]
    for start in range(0, n, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, n)
        acc[start:stop, :stop].addmm_(x[:, start:stop].T, x[:, :stop])


def _symmetrize_(lower: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle ``lower`` holds, written over ``lower``'s upper triangle by blocks
    of GRAM_BLOCK columns (whole-matrix tril and transpose made three temporaries: 28 -> 5 ms at 2048 x 2048)."""
    n = lower.shape[0]
    for start in range(0, n, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, n)
        lower[:start, start:stop] = lower[start:stop, :start].T
        diagonal = lower[start:stop, start:stop]  # its upper half was computed too: BLAS need not make it exact
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)
    return lower


class _NoLogits:
    """The output head returns no logits while a Gram pass runs: nothing reads them, and at a 32k vocabulary
    they are a third of a small model's forward pass. Hooks on the head still see its input. A model whose
    forward needs them fails on the first batch, and the pass starts again with the head as it is."""

    def __init__(self, model: torch.nn.Module, kinds: tuple[type, ...]):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head = head if isinstance(head, kinds) else None

    def __enter__(self) -> Self:
        if self.head is not None:
            self.head.forward = lambda x: x.new_empty((*x.shape[:-1], 0))  # shadows the class's forward
        return self

    def __exit__(self, *exc) -> None:
        if self.head is not None:
            del self.head.forward


class _SharingChanged(Exception):
    """A layer that read another's input in the first batch did not in a later one."""


class _NeedsLogits(Exception):
    """The model's forward failed on the first batch without its logits."""


def _grams(model, examples, batch_size, pad, device, stage, progress):
    conv1d: tuple[type, ...] = ()
    try:
        from transformers.pytorch_utils import Conv1D

        conv1d = (Conv1D,)
    except ImportError:  # pragma: no cover - transformers without GPT-2's Conv1D
        pass
    aliases = _aliases(model)
    widths: dict[str, int] = {}  # each layer's input width
    transposed: list[str] = []
    recorders: list = [None]  # the current attempt's record(name, x)

    handles = []
    for module_name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, *conv1d)):
            continue
        name = f"{module_name}.weight"
        if len(aliases[id(module.weight)]) > 1:  # tied (e.g. lm_head = embed_tokens): averaged, no Gram
            continue
        is_conv = isinstance(module, conv1d)
        widths[name] = module.weight.shape[0] if is_conv else module.weight.shape[1]
        if is_conv:
            transposed.append(name)
        handles.append(module.register_forward_hook(lambda m, inputs, out, name=name: recorders[0](name, inputs[0])))

    def attempt(share: bool, no_logits: bool):
        """Sums X^T X (lower triangles) over the data: per layer, or, where ``share``, once per input tensor that
        consecutive layers read in turn (q/k/v, gate/up) as in the first batch; raises _SharingChanged where a
        later batch breaks that pattern, _NeedsLogits where the first batch fails without logits."""
        lower = {name: torch.zeros(n, n) for name, n in widths.items()}
        rows = dict.fromkeys(widths, 0)
        owner: dict[str, str] = {}  # a layer's accumulator: its own, or (first batch) that of the layer whose input it shares
        state: dict = {"last": None, "last_owner": None, "batch": 0, "called": set()}

        def record(name: str, x: torch.Tensor) -> None:
            if name not in owner:
                shared = share and state["batch"] == 0 and x is state["last"]
                owner[name] = state["last_owner"] if shared else name
            state["called"].add(name)
            if owner[name] != name:
                if x is not state["last"] or state["last_owner"] != owner[name]:
                    raise _SharingChanged(name)
                return
            if x is not state["last"]:  # (one it did not share in the first batch gets its own product)
                state["last"], state["last_owner"] = x, name
            x = x.detach()
            mask = state["mask"]
            if x.shape[:-1] == mask.shape:
                x = x.reshape(-1, x.shape[-1]) if state["unpadded"] else x[mask]
            else:  # not laid out per token (e.g. a mixture-of-experts expert's rows): every row counts
                x = x.reshape(-1, x.shape[-1])
            x = x.to(torch.float32)
            if x.device == lower[name].device:
                _add_lower_gram_(lower[name], x)
            else:  # the sums stay in host memory, as a large model's do not fit beside it on the device
                product = torch.zeros_like(lower[name], device=x.device)
                _add_lower_gram_(product, x)
                lower[name] += product.cpu()
            rows[name] += x.shape[0]

        recorders[0] = record
        with torch.no_grad(), _NoLogits(model, (torch.nn.Linear, *conv1d)) if no_logits else nullcontext():
            for first in range(0, len(examples), batch_size):
                batch = [ids for ids, _ in examples[first:first + batch_size]]
                width = max(map(len, batch))
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.bool)
                for row, seq in enumerate(batch):  # right padding: causal attention keeps real tokens exact
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = True
                state["mask"], state["unpadded"] = mask.to(device), all(len(seq) == width for seq in batch)
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device, torch.long), use_cache=False)
                except _SharingChanged:
                    raise
                except Exception:
                    if no_logits and state["batch"] == 0:
                        raise _NeedsLogits from None
                    raise
                # a layer sharing its owner's input in a batch where one of them was not called would get
                # the wrong sums
                if any((name in state["called"]) != (mine in state["called"]) for name, mine in owner.items()):
                    raise _SharingChanged("a layer was called without the layer whose input it shares")
                if state["batch"] == 0:  # a layer that shares another's input needs no sums of its own
                    for name, mine in owner.items():
                        if mine != name:
                            del lower[name]
                state.update(last=None, last_owner=None, called=set(), batch=state["batch"] + 1)
                if progress:
                    progress(stage, first + len(batch), len(examples), "")
        return lower, owner, rows

    share, no_logits = True, True
    try:
        while True:
            try:
                lower, owner, rows = attempt(share, no_logits)
                break
            except _NeedsLogits:  # this model's forward reads its logits: again, with them
                no_logits = False
            except _SharingChanged:  # every layer its own product
                share = False
    finally:
        for h in handles:
            h.remove()
    full = {name: _symmetrize_(acc) for name, acc in lower.items()}
    grams: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    for name in widths:  # every reader of an input gets its owner's tensor itself (saved once)
        mine = owner.get(name, name)  # a layer the data never reached keeps its zeros
        grams[name] = full[mine]
        tokens[name] = rows[mine]
    return grams, {"tokens": tokens, "transposed": transposed}


def _fishers(model, examples, device, stage, progress):
    aliases = _aliases(model)
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for done, (ids, start) in enumerate(examples, start=1):
        if len(ids) > start:
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x, use_cache=False).logits[0, start - 1:-1].to(torch.float32)
            log_likelihood = torch.log_softmax(logits, dim=-1).gather(1, x[0, start:, None]).sum()
            grads = torch.autograd.grad(log_likelihood, params, allow_unused=True)
            for total, g in zip(sums, grads):
                if g is not None:  # a parameter the example does not reach has gradient 0
                    total.addcmul_(g, g)
            count += 1
        if progress:
            progress(stage, done, len(examples), "")
    if count == 0:
        raise InputError("no calibration example has a token to score for the Fisher (each needs at least two tokens, "
                         "or a non-empty completion)")
    tensors = {}
    for p, total in zip(params, sums):
        fisher = total.div_(count).cpu()
        for name in aliases[id(p)]:  # every name of a tied parameter (saved once)
            tensors[name] = fisher
    tied = [names for names in aliases.values() if len(names) > 1]
    return tensors, {"examples": str(count), "tied": tied}
