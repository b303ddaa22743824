"""lm-evaluation-harness, in-process and offline: task configs written once, many models evaluated.

Indexing tasks and building the task dictionary cost far more than evaluating a tiny model, so a
:class:`LMEvalSession` does them once and then evaluates each model by loading its weights into one
wrapped ``HFLM`` (``load_state_dict``), instead of calling ``simple_evaluate`` per model.

Multiple-choice tasks are scored by log-likelihood accuracy (``acc``); generation tasks by exact match
or ROUGE-L, computed in the task's own ``process_results`` (ROUGE variants not registered in lm-eval
would otherwise be fetched from the hub). Bootstrap standard errors are off by default. Every evaluation
also returns lm-eval's per-sample values of the task's metric (its ``log_samples`` output, in document
order) as :class:`~mergebench.study.components.Scores`, so the study can resample test examples.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from mergebench.core.errors import InputError, MergebenchError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.registry import Param
from mergebench.study.components import Evaluator, Scores
from mergebench.study.contracts import SuiteData
from mergebench.study.weights import load_state_dict

METRICS = {"multiple_choice": ("acc",), "generate_until": ("exact_match", "rouge_l")}
_UTILS = Path(__file__).with_name("lm_eval_task_utils.py")


@dataclass(frozen=True)
class TaskSpec:
    """One dataset as an lm-eval task: where its JSONL splits are and how it is scored.

    JSONL fields: ``query`` (the prompt), then ``choices`` (list of strings) and ``label`` (index) for
    multiple choice, or ``answer`` (string) for generation.
    """

    name: str
    output_type: str  # "multiple_choice" or "generate_until"
    metric: str  # "acc", "exact_match" or "rouge_l"
    data_files: Mapping[str, str]  # split -> absolute JSONL path
    max_gen_toks: int = 24

    def __post_init__(self) -> None:
        if self.metric not in METRICS.get(self.output_type, ()):
            raise MergebenchError(f"task '{self.name}': metric '{self.metric}' does not suit '{self.output_type}'")


def task_config(spec: TaskSpec, split: str) -> dict[str, Any]:
    """The lm-eval YAML config (as a dict) that evaluates ``spec`` on ``split``."""
    if split not in spec.data_files:
        raise InputError(f"task '{spec.name}' has no '{split}' split (it has {sorted(spec.data_files)})")
    path = Path(spec.data_files[split])
    if not path.is_absolute():
        raise InputError(f"task '{spec.name}': data file {path} must be an absolute path")
    config: dict[str, Any] = {
        "task": spec.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": spec.output_type,
        # bare column names, not "{{query}}": lm-eval compiles a Jinja template for every document it
        # renders (no cache), which was half the time of a multiple-choice task on a tiny model
        "doc_to_text": "query",
    }
    if spec.output_type == "multiple_choice":
        config |= {"doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
                   "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    else:
        config |= {"doc_to_target": "answer", "target_delimiter": "",
                   "generation_kwargs": {"until": ["\n"], "max_gen_toks": spec.max_gen_toks, "do_sample": False},
                   "process_results": f"lm_eval_task_utils.process_{spec.metric}",
                   "metric_list": [{"metric": spec.metric, "aggregation": "mean", "higher_is_better": True}]}
    return config


def write_task_configs(directory: Path, specs: Iterable[TaskSpec], split: str) -> list[str]:
    """Write one YAML per task (plus the shared scoring module) into ``directory``; returns task names."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_UTILS, directory / _UTILS.name)
    names = []
    for spec in specs:
        config = task_config(spec, split)
        function = config.pop("process_results", None)
        text = yaml.safe_dump(config, sort_keys=False)
        if function:  # a YAML tag that lm-eval resolves to a function in the YAML's directory
            text += f"process_results: !function {function}\n"
        (directory / f"{spec.name}.yaml").write_text(text)
        names.append(spec.name)
    return names


@contextlib.contextmanager
def _quiet():
    """lm-eval passes ``disable=`` to its tqdm bars, so TQDM_DISABLE cannot hide them: when it is set
    (the CLI sets it; it draws its own progress), what lm-eval writes to stderr is dropped."""
    if os.environ.get("TQDM_DISABLE") != "1":
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


class LMEvalSession:
    """Tasks indexed once and one HFLM wrapper; ``evaluate`` swaps a model's weights in and scores it."""

    def __init__(self, task_dir: Path, task_names: list[str], model, tokenizer, batch_size: int = 64,
                 max_length: int | None = None, include_defaults: bool = False, limit: int | None = None,
                 model_args: Mapping[str, Any] | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-request bars; mergebench shows its own
        try:
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager, get_task_dict
        except ImportError:
            raise MergebenchError("the lm-eval evaluator needs lm-eval and accelerate: pip install 'mergebench[eval]'") from None
        with _quiet():
            manager = TaskManager(include_path=str(Path(task_dir).resolve()), include_defaults=include_defaults)
            self.task_dict = get_task_dict(task_names, manager)
        self.task_names = task_names
        self.limit = limit or None
        self.model = model.eval()
        kwargs = {**(model_args or {}), **({"max_length": max_length} if max_length else {})}
        self.lm = HFLM(pretrained=self.model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        self.lm.tok_encode = _memoised_tok_encode(self.lm.tok_encode)

    def evaluate(self, state_dict: Mapping[str, Any] | None = None) -> Scores:
        """Scores per task (the task's one metric) of the wrapped model, after loading ``state_dict``, with each
        task's per-example values."""
        import torch
        from lm_eval import evaluator

        if state_dict is not None:
            missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
            if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
                raise InputError(f"weights do not fit the evaluated architecture (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
        with torch.no_grad(), _quiet():
            out = evaluator.evaluate(self.lm, self.task_dict, limit=self.limit, bootstrap_iters=0, verbosity="ERROR",
                                     log_samples=True)
        return results_of(out, self.task_names)


def results_of(out: Mapping[str, Any], task_names: Iterable[str]) -> Scores:
    """Each task's score (its one metric) from lm-eval's results, with its per-sample values of that metric in
    document order (from ``samples``, when lm-eval logged them)."""
    scores, examples = {}, {}
    for name in task_names:
        result = out["results"][name]
        key = next(k for k in result if k.endswith(",none") and not k.endswith("_stderr,none"))
        scores[name] = float(result[key])
        metric, _, filter_name = key.partition(",")
        samples = [s for s in (out.get("samples") or {}).get(name, []) if s.get("filter", "none") == filter_name]
        if samples and all(metric in s for s in samples):
            examples[name] = [float(s[metric]) for s in sorted(samples, key=lambda s: s["doc_id"])]
    return Scores(scores, examples)


def _memoised_tok_encode(tok_encode):
    """``HFLM.tok_encode`` with its results kept: lm-eval encodes every choice's context again and
    every request again for each model a session evaluates, which cost a tiny model more than its
    forward passes. The tokenizer never changes within a session, so equal arguments give equal ids."""
    cache: dict[tuple, list[int]] = {}

    def encode(string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
               **kwargs) -> list[int]:
        if kwargs:
            return tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len)
        if key not in cache:
            cache[key] = tok_encode(string, add_special_tokens, left_truncate_len)
        return list(cache[key])  # a copy: callers may extend or slice in place

    return encode


def suite_tasks(suite, data: SuiteData | None, datasets: Iterable[str], max_gen_toks: int = 32) -> list[TaskSpec]:
    """TaskSpecs for a generated suite's ``datasets`` (data files from its built :class:`SuiteData`)."""
    if data is None:
        raise InputError(f"suite '{suite.name}' needs its built data (run `mergebench suite build {suite.name}`)")
    specs = suite.datasets()
    out = []
    for name in datasets:
        d = specs[name]
        tokens = max_gen_toks
        if d.metric == "exact_match":  # generation steps past the longest answer cannot change the score
            tokens = min(max_gen_toks, _longest_answer_bytes(data.files[name]) + 4)
        out.append(TaskSpec(name, d.output_type, d.metric, dict(data.files[name]), max_gen_toks=tokens))
    return out


def _longest_answer_bytes(files: Mapping[str, str]) -> int:
    """The longest reference answer in any split, in bytes: a byte-level token holds at least one byte."""
    import json

    longest = 0
    for path in files.values():
        with open(path) as fh:
            for line in fh:
                longest = max(longest, len(json.loads(line).get("answer", "").encode()))
    return longest


def parse_model_args(text: str) -> dict[str, Any]:
    """lm-eval's ``model_args`` string ("k=v,k=v") as a dict, values typed as lm-eval types them."""
    from lm_eval.utils import simple_parse_args_string

    try:
        return simple_parse_args_string(text) if text else {}
    except ValueError:
        raise InputError(f"evaluator 'lm-eval': model_args must look like 'key=value,key=value', got {text!r}") from None


def _task_dir(tmp: Path, suite, data: SuiteData | None, datasets: list[str], split: str) -> tuple[Path, bool]:
    """Task configs for ``datasets``: rendered from the suite's built data, or the hub suite's own YAMLs."""
    if data is None and suite.task_dir is not None:  # not built: its own YAMLs plus lm-eval's built-in tasks
        return Path(suite.task_dir), True
    write_task_configs(tmp, suite_tasks(suite, data, datasets), split)
    return tmp, False


def load_for_eval(model_dir: Path, device: str, dtype: str):
    """A causal LM and its tokenizer on ``device`` in ``dtype`` ("auto": as the model's config says)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise InputError(f"{model_dir}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device), tok


class SuiteSession(LMEvalSession):
    """An LMEvalSession over some datasets of a suite, for one split, with its task configs in a temp dir."""

    def __init__(self, model_dir: Path, suite, data: SuiteData | None, datasets: list[str], params: dict):
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="mergebench-tasks-")
        task_dir, include_defaults = _task_dir(Path(self._tmp.name), suite, data, list(datasets), params["split"])
        model, tokenizer = load_for_eval(Path(model_dir), params["device"], params["dtype"])
        super().__init__(task_dir, list(datasets), model, tokenizer, batch_size=params["batch_size"],
                         include_defaults=include_defaults, limit=params["limit"],
                         model_args=parse_model_args(params["model_args"]))


def _session(model_dir, suite, data, datasets, params):
    if params["backend"] != "hf":
        return None  # vLLM loads weights itself: no swapping, every model (and sweep point) is scored from disk
    return SuiteSession(Path(model_dir), suite, data, list(datasets), params)


def vllm_model_args(model_dir: Path, params: dict) -> dict[str, Any]:
    """The model_args of lm-eval's vLLM backend for one model directory (tensor parallelism from model_args)."""
    args = {"pretrained": str(model_dir), "dtype": params["dtype"], "batch_size": params["batch_size"],
            "data_parallel_size": 1}  # inside an executor's job: the executor spreads models, not vLLM
    args.update(parse_model_args(params["model_args"]))
    return args


def _evaluate_vllm(models, suite, data, datasets, params) -> list[dict[str, float]]:
    import tempfile

    try:
        import vllm  # noqa: F401
    except ImportError:
        raise InputError("evaluator 'lm-eval' with backend vllm needs vLLM (pip install vllm; GPU only)") from None
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = []
    with tempfile.TemporaryDirectory(prefix="mergebench-tasks-") as tmp:
        task_dir, include_defaults = _task_dir(Path(tmp), suite, data, list(datasets), params["split"])
        manager = TaskManager(include_path=str(task_dir), include_defaults=include_defaults)
        for m in models:
            with _quiet():
                out = simple_evaluate(model="vllm", model_args=vllm_model_args(Path(m), params), tasks=list(datasets),
                                      task_manager=manager, limit=params["limit"] or None, bootstrap_iters=0,
                                      log_samples=True)
            results.append(results_of(out, datasets))
    return results


def _evaluate_suite(models, suite, data, datasets, params) -> list[Scores]:
    if not models:
        return []
    if params["backend"] == "vllm":
        return _evaluate_vllm(models, suite, data, datasets, params)
    session = SuiteSession(Path(models[0]), suite, data, list(datasets), params)
    return [session.evaluate()] + [session.evaluate(load_state_dict(Path(m))) for m in models[1:]]


def evaluate_models(models: list[Path], tasks: list[TaskSpec], split: str = "test", batch_size: int = 64,
                    workdir: Path | None = None) -> list[Scores]:
    """Evaluate several same-architecture model directories on ``tasks`` with one session."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not models:
        return []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        names = write_task_configs(Path(tmp), tasks, split)
        tokenizer = AutoTokenizer.from_pretrained(models[0])
        model = AutoModelForCausalLM.from_pretrained(models[0])
        session = LMEvalSession(Path(tmp), names, model, tokenizer, batch_size=batch_size)
        results = [session.evaluate()]
        for path in models[1:]:
            results.append(session.evaluate(load_state_dict(path)))
    return results


def _identity() -> dict[str, Any]:
    """lm-eval's version and the task configs' scoring functions: a new metric must not hit old scores."""
    import hashlib

    import lm_eval

    return {"lm_eval": getattr(lm_eval, "__version__", "?"),
            "scoring": hashlib.sha256(_UTILS.read_bytes()).hexdigest()[:16]}


@hookimpl
def register_evaluators(register):
    register(
        Evaluator(
            name="lm-eval",
            description="lm-evaluation-harness in-process: tasks indexed once, models swapped into one HFLM.",
            reference="Gao et al., The Language Model Evaluation Harness, doi:10.5281/zenodo.10256836",
            params=(Param("split", str, "test", "which split to score", choices=("validation", "test")),
                    Param("batch_size", int, 64, "examples per forward pass", min=1),
                    Param("backend", str, "hf", "lm-eval model backend (vllm: GPU only, no weight swapping)",
                          choices=("hf", "vllm")),
                    Param("device", str, "cpu", "where the model runs: cpu, cuda, cuda:N"),
                    Param("dtype", str, "float32", "weights' dtype while scoring (auto: the model's own)",
                          choices=("auto", "float32", "bfloat16", "float16")),
                    Param("model_args", str, "", "more lm-eval model_args, e.g. 'tensor_parallel_size=2,max_length=4096'"),
                    Param("limit", int, 0, "score at most this many examples per task (0: all)", min=0)),
            evaluate=_evaluate_suite,
            session=_session,
            identity=_identity,
        )
    )

