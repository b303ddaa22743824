"""``mergebench run CONFIG --plan``: every job a run would do, what each asks of a machine, and which inputs
are missing, worked out offline from metadata alone (config files and safetensors headers; no weights).

Memory estimates (documented in docs/scale-out.md, "Planning"):

- training (full fine-tuning, AdamW, fp32 master weights): 16 bytes per parameter, plus 20% for
  activations and buffers (gradient checkpointing keeps activations small);
- evaluation: the weights in the evaluator's dtype, plus 20% (KV cache, logits);
- a sweep: the base and N experts' weights in host memory (the in-memory sweep) when they fit in the
  config's ``sweep_memory_gib``, else nothing (each point merged to disk by the streaming engine), plus one
  evaluation;
- GPUs per job: enough GPUs of ``gpu_memory`` to hold the estimate (one at least when the run's device is CUDA).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebench.core.plugin_manager import PluginManager
from mergebench.study.config import RunConfig
from mergebench.study.contracts import BaseChoice, Resources
from mergebench.study.runner import expert_order, grid_for, random_grid

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


@dataclass(frozen=True)
class ModelInfo:
    """What metadata says about a base: where it is, its parameter count and dtype (None: not known)."""

    reference: str
    path: Path | None
    parameters: int | None
    dtype_bytes: int
    estimated: bool = False  # parameters guessed from the name, not read from the files


@dataclass(frozen=True)
class PlannedJobs:
    kind: str  # "train", "evaluate", "sweep"
    what: str
    count: int
    resources: Resources
    points: int = 0  # sweep grid points (each scored on validation)


@dataclass
class Plan:
    jobs: list[PlannedJobs] = field(default_factory=list)
    bases: dict[tuple[str, str], ModelInfo] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for j in self.jobs:
            out[j.kind] = out.get(j.kind, 0) + j.count
        out["sweep points"] = sum(j.points for j in self.jobs)
        out["GPU jobs"] = sum(j.count for j in self.jobs if j.resources.gpus)
        return out


def _safetensors_parameters(path: Path) -> tuple[int, int] | None:
    """(parameters, bytes per parameter) from the safetensors headers of a model directory."""
    from mergebench.core.tensor_io import open_local

    try:
        source = open_local(str(path), path, allow_pickle=False)
    except Exception:  # noqa: BLE001 - not readable as safetensors: unknown
        return None
    try:
        infos = list(source.tensors.values())
        if not infos:
            return None
        numel = sum(i.numel for i in infos)
        return numel, max(1, round(sum(i.nbytes for i in infos) / numel))
    finally:
        source.close()


def _guess_from_name(reference: str) -> int | None:
    m = re.search(r"(\d+(?:\.\d+)?)\s*([bBmM])\b", reference.replace("-", " ").replace("_", " "))
    if not m:
        return None
    return int(float(m.group(1)) * (1e9 if m.group(2) in "bB" else 1e6))


def describe_base(base: BaseChoice, pm: PluginManager, built: dict[tuple[str, str], ModelInfo]) -> ModelInfo:
    """What a base will be, from metadata: a loaded model's files, a pretrained size's config, or its source's."""
    params = dict(base.preparer.params)
    if "model" in params and params["model"]:  # the `load` preparer (or any that points at a model)
        from mergebench.plugins.base_preparers import find_model

        path = find_model(params)
        counted = _safetensors_parameters(path) if path is not None else None
        if counted is not None:
            return ModelInfo(params["model"], path, counted[0], counted[1])
        return ModelInfo(params["model"], path, _guess_from_name(params["model"]), 2, estimated=True)
    if "size" in params and base.preparer.name == "pretrain":
        import torch
        from transformers import LlamaForCausalLM

        from mergebench.training import llama_config

        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(params["size"], 1024))
        return ModelInfo(f"pretrain {params['size']}", None, sum(p.numel() for p in model.parameters()), 4)
    if base.source is not None and (base.size, base.source) in built:
        source = built[(base.size, base.source)]
        return ModelInfo(f"{base.preparer.name} of {source.reference}", None, source.parameters, source.dtype_bytes)
    return ModelInfo(base.preparer.name, None, None, 4)


def describe_built(path: Path) -> ModelInfo:
    """A built or loaded base's parameter count and dtype from its safetensors headers."""
    counted = _safetensors_parameters(Path(path))
    return ModelInfo(str(path), Path(path), *(counted if counted is not None else (None, 4)))


def _missing_datasets(cfg: RunConfig, pm: PluginManager) -> list[str]:
    """Datasets a hub suite's task configs name that are in neither local Hugging Face cache."""
    suite = pm.suites().get(cfg.suite)
    if suite.task_dir is None:
        return []
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub")).expanduser()
    wanted: set[str] = set()
    local = {p.stem: p for p in Path(suite.task_dir).glob("*.yaml")}
    needs_index = {name for name in suite.datasets() if name not in local}
    found = _lm_eval_task_configs(needs_index) if needs_index else {}
    for name in suite.datasets():
        config = _yaml_config(local[name]) if name in local else found.get(name, {})
        if config.get("dataset_path") and config["dataset_path"] != "json":
            wanted.add(config["dataset_path"])
    missing = []
    for dataset in sorted(wanted):
        flat = dataset.replace("/", "___")
        if not (datasets_cache / flat).exists() and not (hub_cache / ("datasets--" + dataset.replace("/", "--"))).exists():
            missing.append(f"dataset {dataset} (suite {cfg.suite}) is not in the local Hugging Face cache")
    return missing


def _yaml_config(path: Path, depth: int = 0) -> dict[str, Any]:
    """A task YAML's keys (``!function`` tags dropped), with the file it ``include``s under it."""
    import yaml

    text = re.sub(r"!function\s+\S+", "null", path.read_text())
    config = yaml.safe_load(text) or {}
    if "include" in config and depth < 3:
        config = {**_yaml_config(path.parent / config["include"], depth + 1), **config}
    return config


def _lm_eval_task_configs(names: set[str]) -> dict[str, dict[str, Any]]:
    """lm-eval's own task configs for ``names``, found by scanning its YAMLs' ``task:`` lines (seconds faster
    than building lm-eval's whole task index)."""
    try:
        import lm_eval
    except ImportError:
        return {}
    pattern = re.compile(r"^task:\s*(\S+)\s*$", re.M)
    out: dict[str, dict[str, Any]] = {}
    for path in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"):
        try:
            m = pattern.search(path.read_text(errors="ignore"))
        except OSError:
            continue
        if m and m.group(1).strip("'\"") in names and m.group(1) not in out:
            out[m.group(1).strip("'\"")] = _yaml_config(path)
    return out


def gpus_for(nbytes: int, gpu_memory: int, device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    return max(1, math.ceil(nbytes / gpu_memory))


def job_resources(info: ModelInfo, kind: str, cfg: RunConfig, n: int = 0, gpu_memory_gib: float = 80.0) -> Resources:
    """What one job on a base like ``info`` asks of its machine: GPUs by the device memory the estimate needs,
    host memory (what Ray's ``memory`` resource counts) by what is loaded there."""
    n_params = info.parameters or 0
    eval_bytes = int(n_params * DTYPE_BYTES.get(str(cfg.evaluator.params.get("dtype", "float32")), 4) * 1.2)
    gpu_memory = int(gpu_memory_gib * 2**30)
    on_gpu = cfg.device.startswith("cuda")
    if kind == "train":
        need = int(n_params * 16 * 1.2)
        return Resources(1, gpus_for(need, gpu_memory, cfg.device), int(n_params * info.dtype_bytes) if on_gpu else need)
    if kind == "evaluate":
        return Resources(1, gpus_for(eval_bytes, gpu_memory, cfg.device), int(n_params * info.dtype_bytes) if on_gpu
                         else eval_bytes)
    in_memory = int(n_params * info.dtype_bytes * (n + 1))
    # beyond the config's sweep memory, each point is merged to disk by the streaming engine instead
    host = in_memory if in_memory <= cfg.sweep_memory_gib * 2**30 else 0
    return Resources(1, gpus_for(eval_bytes, gpu_memory, cfg.device), host + (0 if on_gpu else eval_bytes))


def make_plan(cfg: RunConfig, pm: PluginManager, gpu_memory_gib: float = 80.0, check_inputs: bool = True) -> Plan:
    plan = Plan()
    for b in cfg.bases:
        info = describe_base(b, pm, plan.bases)
        plan.bases[(b.size, b.kind)] = info
        if check_inputs and "model" in b.preparer.params and info.path is None:
            plan.missing.append(f"model {info.reference} ({b.size}, {b.kind}) is not in the local Hugging Face cache")
    if check_inputs:
        plan.missing += _missing_datasets(cfg, pm)
    suite = pm.suites().get(cfg.suite)
    categories = list(suite.held_in)
    n_max = max(cfg.n_experts)
    held_in_datasets = sum(len(ds) for ds in suite.held_in.values())
    all_datasets = len(suite.datasets())
    for b in cfg.bases:
        if not b.studied:
            continue
        info = plan.bases[(b.size, b.kind)]
        where = f"{b.size} {b.kind}"
        n_experts = len({c for seed in cfg.seeds for c in expert_order(categories, seed)[:n_max]})
        trainings = len(cfg.seeds) * (n_experts + (cfg.multitask is not None))
        plan.jobs.append(PlannedJobs("train", f"{where}: {n_experts} experts"
                                     + (" + multitask" if cfg.multitask is not None else "") + " per seed",
                                     trainings, job_resources(info, "train", cfg, gpu_memory_gib=gpu_memory_gib)))
        models = len(cfg.seeds) * (1 + n_experts + (cfg.multitask is not None))
        plan.jobs.append(PlannedJobs("evaluate", f"{where}: base, experts, multitask on test "
                                     f"({all_datasets} datasets); experts on validation",
                                     models + len(cfg.seeds) * n_experts,
                                     job_resources(info, "evaluate", cfg, gpu_memory_gib=gpu_memory_gib)))
        for n in sorted(cfg.n_experts):
            for name in cfg.methods:
                if n in cfg.unmergeable.get(name, {}):
                    continue
                method = pm.merge_methods().get(name)
                points = len(grid_for(method, cfg.search.get(name)))
                random = random_grid(method, cfg.search.get(name))
                sweeps = len(cfg.seeds) * (cfg.draws if random else 1)  # draws: K of methods that draw random numbers
                plan.jobs.append(PlannedJobs(
                    "sweep", f"{where}: {name}, N={n} ({points} points on {held_in_datasets} validation sets max)"
                    + (f", {cfg.draws} random draws per seed" if sweeps > len(cfg.seeds) else ""),
                    sweeps, job_resources(info, "sweep", cfg, n, gpu_memory_gib), points * sweeps))
        if info.parameters is None:
            plan.notes.append(f"{where}: parameter count unknown (not a loadable model and no size); memory not estimated")
        elif info.estimated:
            plan.notes.append(f"{where}: parameters estimated from the name ({info.parameters / 1e9:.1f}B): "
                              f"the model is not in the local cache")
    for name, reasons in cfg.unmergeable.items():
        for n, reason in sorted(reasons.items()):
            plan.notes.append(f"{name} is not run at N={n}: {reason}")
    return plan


def to_json(plan: Plan) -> str:
    return json.dumps({
        "bases": [{"size": s, "kind": k, "reference": i.reference, "path": None if i.path is None else str(i.path),
                   "parameters": i.parameters, "estimated": i.estimated} for (s, k), i in plan.bases.items()],
        "jobs": [{"kind": j.kind, "what": j.what, "count": j.count, "points": j.points, "cpus": j.resources.cpus,
                  "gpus": j.resources.gpus, "memory_bytes": j.resources.memory_bytes} for j in plan.jobs],
        "totals": plan.totals(), "missing": plan.missing, "notes": plan.notes}, indent=2) + "\n"
