"""Merge speed and memory: mergebench against mergekit 0.1.5 on its 20 methods, the I/O floor, and our TIES beyond them.

    python benchmarks/merge_speed.py --quick          # smoke test, under a minute, mergekit not needed
    python benchmarks/merge_speed.py                  # the full run reported in docs/benchmarks.md

For each (size, N, method) the benchmark writes one mergekit YAML config (``METHODS``: the parameters a
typical user config gives, per-model where the method takes them, ``dtype: float32`` and ``out_dtype:
bfloat16`` so both tools compute in float32 and write bf16), and both tools merge from that same file
as subprocesses, the way users run them: ``mergekit-yaml CONFIG OUT`` and ``mergebench merge CONFIG -o
OUT``. The models are locally built bf16 Llama-shaped checkpoints (base + N seeded perturbations,
``models.py``), page cache warm. N is the number of non-base models: ``--experts`` for the methods that
take any number; two-model methods (slerp, nearswap, arcee_fusion: base + 1; nuslerp: base + 2) run
once per size at that count; passthrough is a ``slices`` frankenmerge of two experts' layer ranges.

Per row: the median wall time of ``--runs`` runs (and mergebench's first run, which also hashes the
inputs), peak resident memory of the whole process tree (anonymous and file-backed pages, polled every
10 ms), whether mergebench's anonymous peak stays within the engine's bound ``(N + 2) x largest float32
tensor + fixed overhead`` (the overhead is measured: the anonymous peak of a one-model ``linear`` merge
of the smoke model, i.e. interpreter, torch and mergebench with nothing large loaded), the ratio
mergekit / mergebench, and how far the two outputs are apart: for deterministic methods the max
absolute difference and the share of entries more than one bf16 step apart; for stochastic ones
(random drops, sampled quantiles) the share of entries changed from the base and their mean |change|
in each output (ties and breadcrumbs also count the differing entries that sit at a trim threshold,
where the tools keep different ones of equal magnitude, or where a sign is elected on a zero sum). The floor is the time to read every input byte
and write (and fsync) the output's bytes.

Methods mergekit does not have (``Bench.mergekit`` false): the subspace methods tsv_m, iso_c, iso_cts
(their defaults, from a mergekit-schema config, which mergebench reads for any registered method) and the
data-aware regmean and fisher (their defaults, from a mergebench recipe: ``calibration: {data, samples,
max_length, batch_size, seed}``, which mergekit's schema has no key for) run in mergebench only; their
mergekit columns say "n/a: not in mergekit", and their time is given as a multiple of our own TIES at the
same (size, N) (ties is added to ``--methods`` when they are chosen without it). For regmean and fisher the
statistics are measured apart, per size and kind, once for the largest N (``probe``, a subprocess): the
calibration data is ``--calibration-samples`` seeded texts of ``--calibration-length`` words
(``models.calibration_data``; the models carry a word-level tokenizer, one token per word), and for each
expert, back to back, (a) one plain forward pass over that data (transformers' AutoModelForCausalLM in
float32, the same tokenized batches of ``--calibration-batch`` texts, no hooks; model and tokenizer loading
included and also given apart) and (b) the statistics pass itself (``calibration.statistics``, cold cache;
the model's content hash, which the cache key needs, timed apart), each with its own peak anonymous memory
(this process polled every 5 ms, freed memory given back between phases). The calibration cache
(``MERGEBENCH_HOME/artifacts/calibration`` under ``--workdir``) is emptied when the benchmark starts; the
merges timed afterwards read the statistics from it (a row checks that no cache entry was added), so their
time is the merge with statistics cached, and their memory bound is the engine's plus each expert's largest
statistic (one layer's).

``--quick`` (what CI runs, without mergekit): the smoke model, N = 2, one run, seven methods (one per
engine path, plus tsv_m and regmean, on 16 calibration texts of 64 tokens); every other method is listed
as skipped with that reason and its config is planned by mergebench without reading tensors. mergekit
comes from ``--mergekit-venv`` (default: $MERGEKIT_VENV, the repository's ``.mergekit-venv`` that the
tests use, then ``benchmarks/.venv-mergekit``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SIZES, build, calibration_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_OPTIONS = ["--lazy-unpickle", "--num-threads", "2", "--quiet", "--no-copy-tokenizer"]
COMMON = {"dtype": "float32", "out_dtype": "bfloat16"}  # float32 maths, bf16 output, in both tools

# Per-model values, cycled over the models (model i gets values[i % len]): unequal, as users give them.
WEIGHTS = (0.6, 0.4, 0.5, 0.3)
DENSITIES = (0.5, 0.3, 0.4, 0.6)
# mergekit's README slerp: t over the layers, opposite for attention and MLP, 0.5 elsewhere.
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]


@dataclass(frozen=True)
class Bench:
    """One mergekit method as the benchmark configures it."""

    name: str                                  # merge_method, the same name in both tools
    per_model: dict = field(default_factory=dict)   # per-model parameter -> values cycled over the models
    parameters: dict = field(default_factory=dict)  # top-level parameters
    base: bool = True                          # whether the config names base_model
    count: int | None = None                   # fixed number of non-base models; None: each N of --experts
    min_count: int = 1
    slices: bool = False                       # a passthrough frankenmerge of two experts' layer ranges
    stochastic: bool = False                   # random drops: outputs agree in statistics, not entries
    sampled_above: int | None = None           # entries above which mergekit samples (stochastic there)
    mergekit: bool = True                      # False: mergebench only, timed against our own ties
    calibration: str | None = None             # the statistic a data-aware method needs (gram, fisher)


METHODS = [
    Bench("linear", {"weight": WEIGHTS}, base=False),
    Bench("slerp", parameters={"t": SLERP_T}, count=1),
    Bench("nuslerp", {"weight": (0.6, 0.4)}, count=2),
    Bench("multislerp", {"weight": WEIGHTS}),
    Bench("karcher", base=False),
    Bench("model_stock", min_count=2),
    Bench("nearswap", parameters={"t": 0.001}, count=1),  # experts differ from the base by ~0.002
    Bench("arcee_fusion", count=1, sampled_above=1_000_000),  # quantiles from 1M random entries above that
    Bench("passthrough", base=False, count=2, slices=True),
    Bench("ram"),
    Bench("ramplus_tl"),
    Bench("sce", parameters={"select_topk": 0.1}),
    Bench("task_arithmetic", {"weight": WEIGHTS}),
    Bench("ties", {"weight": WEIGHTS, "density": DENSITIES}),
    Bench("dare_ties", {"weight": WEIGHTS, "density": DENSITIES}, stochastic=True),
    Bench("dare_linear", {"weight": WEIGHTS, "density": DENSITIES}, stochastic=True),
    Bench("breadcrumbs", {"weight": WEIGHTS, "density": (0.9, 0.8), "gamma": (0.01, 0.02)}),
    Bench("breadcrumbs_ties", {"weight": WEIGHTS, "density": (0.9, 0.8), "gamma": (0.01, 0.02)}),
    Bench("della", {"weight": WEIGHTS, "density": (0.5, 0.4), "epsilon": (0.1, 0.15)}, stochastic=True),
    Bench("della_linear", {"weight": WEIGHTS, "density": (0.5, 0.4), "epsilon": (0.1, 0.15)}, stochastic=True),
    # beyond mergekit, with their papers' defaults (alpha 1; regmean alpha 0.9, fisher floor 1e-6; weights 1)
    Bench("tsv_m", mergekit=False),
    Bench("iso_c", mergekit=False),
    Bench("iso_cts", mergekit=False),
    Bench("regmean", base=False, mergekit=False, calibration="gram"),
    Bench("fisher", base=False, mergekit=False, calibration="fisher"),
]
BY_NAME = {b.name: b for b in METHODS}
MERGEKIT = tuple(b.name for b in METHODS if b.mergekit)
BEYOND = tuple(b.name for b in METHODS if not b.mergekit)
TIES = "ties"  # what the methods beyond mergekit are timed against
NOT_IN_MERGEKIT = "n/a: not in mergekit"
# --quick times one method per engine path (elementwise without base, gradient + filter two-model,
# slices, whole-tensor top-k with per-model densities, seeded random drops, whole-tensor SVDs, calibration
# statistics); the others are listed as skipped, with that reason, and their configs are still built and
# planned by mergebench (no tensor read).
QUICK = ("linear", "slerp", "passthrough", "ties", "dare_ties", "tsv_m", "regmean")
QUICK_REASON = "--quick times one method per engine path; the full run times every method"
THREAD_CHECK = "dare_ties"
TRIMMED = ("ties", "breadcrumbs", "breadcrumbs_ties")  # deterministic magnitude trims: ties at the threshold


def n_models(bench: Bench, n: int) -> int:
    return bench.count or n


def config_for(bench: Bench, models: dict[str, Path], n: int, layers: int, calibration: dict | None = None) -> dict:
    """The mergekit config both tools merge: ``models`` maps base, expert0, ... to directories. A data-aware
    method's is a mergebench recipe instead, with ``calibration`` (the recipe's mapping) as its data."""
    k = n_models(bench, n)
    if bench.calibration:
        if not calibration:
            raise ValueError(f"{bench.name} needs calibration settings")
        return {"method": bench.name, "experts": [{"path": str(models[f"expert{i}"])} for i in range(k)],
                "parameters": dict(bench.parameters), "dtype": COMMON["out_dtype"], "calibration": dict(calibration)}
    cfg: dict = {"merge_method": bench.name}
    if bench.base:
        cfg["base_model"] = str(models["base"])
    if bench.slices:  # the usual frankenmerge: the first 3/4 of one model's layers, then the last 3/4 of another
        ranges = [(0, -(-3 * layers // 4)), (layers // 4, layers)]
        cfg["slices"] = [{"sources": [{"model": str(models[f"expert{i}"]), "layer_range": list(ranges[i])}]}
                         for i in range(k)]
    else:
        cfg["models"] = []
        for i in range(k):
            entry: dict = {"model": str(models[f"expert{i}"])}
            if bench.per_model:
                entry["parameters"] = {p: values[i % len(values)] for p, values in bench.per_model.items()}
            cfg["models"].append(entry)
    if bench.parameters:
        cfg["parameters"] = dict(bench.parameters)
    return {**cfg, **COMMON}


def portable(config: dict, models: dict[str, Path]) -> dict:
    """The config with model paths replaced by their names (base, expert0, ...), for the results file."""
    names = {str(path): name for name, path in models.items()}
    text = yaml.safe_dump(config, sort_keys=False)
    for path, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    return yaml.safe_load(text)


def skip_reason(bench: Bench, n: int) -> str | None:
    if n_models(bench, n) < bench.min_count:
        return f"{bench.name} needs at least {bench.min_count} models besides the base"
    return None


def deterministic(bench: Bench, size: str) -> bool:
    if bench.stochastic:
        return False
    return bench.sampled_above is None or SIZES[size].largest_numel <= bench.sampled_above


# ---- measuring a process tree --------------------------------------------------------------------

def _tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for c in children:
            pids.append(int(c))
            frontier.append(int(c))
    return pids


def _rss(pid: int) -> tuple[int, int]:
    anon = file = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
                elif line.startswith("RssFile:") or line.startswith("RssShmem:"):
                    file += int(line.split()[1]) * 1024
        except OSError:
            pass
    return anon, file


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak memory (total, anonymous, file-backed) of a command's process tree."""
    peak = {"total": 0, "anon": 0, "file": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            anon, file = _rss(proc.pid)
            peak["anon"] = max(peak["anon"], anon)
            peak["file"] = max(peak["file"], file)
            peak["total"] = max(peak["total"], anon + file)
            time.sleep(0.01)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    if proc.returncode != 0:
        tail = err.decode().strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed ({proc.returncode}): {tail[0][:300]}")
    return {"seconds": seconds, "peak_bytes": peak["total"], "peak_anon_bytes": peak["anon"],
            "peak_file_bytes": peak["file"], "stdout": out.decode()[-500:]}


def _in_process_seconds(stdout: str) -> float | None:
    """mergebench prints its own merge time (without interpreter and import start-up): '... 2.31 s -> out'."""
    m = re.search(r"([\d.]+) s -> ", stdout)
    return float(m.group(1)) if m else None


def median_run(cmd, runs: int, env=None) -> dict:
    results = [measure(cmd, env) for _ in range(runs)]
    best = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]
    inside = [x for x in (_in_process_seconds(r["stdout"]) for r in results) if x is not None]
    return {**{k: v for k, v in best.items() if k != "stdout"},
            "runs_seconds": [round(r["seconds"], 3) for r in results],
            "in_process_seconds": statistics.median(inside) if inside else None,
            "peak_bytes": max(r["peak_bytes"] for r in results),
            "peak_anon_bytes": max(r["peak_anon_bytes"] for r in results),
            "peak_file_bytes": max(r["peak_file_bytes"] for r in results)}


# ---- the floor and the memory bound ----------------------------------------------------------------

def io_floor(inputs: list[Path], out_bytes: int, scratch: Path, runs: int) -> dict:
    """Read every input byte (page cache warm), then write out_bytes and fsync, as fast as Python can."""
    files = [f for d in inputs for f in sorted(d.glob("*.safetensors"))]
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    reads, writes = [], []
    for _ in range(runs + 1):  # the first read warms the cache
        t = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        with open(scratch, "wb") as fh:
            for i in range(0, out_bytes, len(buf)):
                fh.write(view[:min(len(buf), out_bytes - i)])
            fh.flush()
            os.fsync(fh.fileno())
        writes.append(time.perf_counter() - t)
        scratch.unlink()
    read, write = statistics.median(reads[1:]), statistics.median(writes[1:])
    return {"read_seconds": read, "write_seconds": write, "seconds": read + write,
            "input_bytes": sum(f.stat().st_size for f in files), "output_bytes": out_bytes}


def fixed_overhead(work: Path, env: dict, runs: int) -> dict:
    """The engine's fixed memory: anonymous peak of a one-model ``linear`` merge of the smoke model, whose
    largest tensor (float32) is 1 MiB, so what it measures is interpreter, torch and mergebench loaded."""
    models = build(work / "models", "smoke", 1)
    config = work / "overhead.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(models["expert0"])}],
                                      **COMMON}, sort_keys=False))
    runs = [measure(mergebench_cmd(config, work / "out-overhead"), env) for _ in range(max(runs, 1))]
    shutil.rmtree(work / "out-overhead", ignore_errors=True)
    return {"bytes": int(statistics.median(r["peak_anon_bytes"] for r in runs)),
            "peak_bytes": int(statistics.median(r["peak_bytes"] for r in runs)),
            "runs_anon_bytes": [r["peak_anon_bytes"] for r in runs], "method": "linear, 1 model, smoke size",
            "smoke_largest_tensor_bytes": 4 * SIZES["smoke"].largest_numel}


def memory_bound(size: str, k: int, overhead: int) -> int:
    """The engine's stated bound: (N + 2) float32 copies of the largest tensor plus the fixed overhead."""
    return (k + 2) * 4 * SIZES[size].largest_numel + overhead


# ---- output agreement --------------------------------------------------------------------------------

def _index(d: Path) -> dict[str, Path]:
    """Which safetensors file of a model directory holds each tensor."""
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def _get(index: dict[str, Path], name: str) -> torch.Tensor:
    """One tensor, as flat float32."""
    from safetensors import safe_open

    with safe_open(index[name], framework="pt") as fh:
        return fh.get_tensor(name).float().reshape(-1)


def compare_outputs(a: Path, b: Path) -> dict:
    """Max abs difference and the share of entries further apart than one bf16 rounding step."""
    ta, tb = _index(a), _index(b)
    if set(ta) != set(tb):
        return {"same_names": False, "only_in_mergebench": sorted(set(ta) - set(tb))[:5],
                "only_in_mergekit": sorted(set(tb) - set(ta))[:5]}
    max_abs, beyond, total = 0.0, 0, 0
    for name in ta:
        x, y = _get(ta, name), _get(tb, name)
        if x.numel() != y.numel():
            return {"same_names": True, "same_shapes": False, "tensor": name}
        diff = (x - y).abs()
        max_abs = max(max_abs, float(diff.max()))
        ulp = torch.maximum(x.abs(), y.abs()) * 2.0**-7  # one bf16 step at that magnitude
        beyond += int((diff > ulp).sum())
        total += x.numel()
    return {"same_names": True, "max_abs_diff": max_abs, "frac_beyond_bf16_step": beyond / total}


def change_statistics(out: Path, base: Path) -> dict:
    """Share of entries that differ from the base and their mean |change|: what random drops keep."""
    to, tb = _index(out), _index(base)
    changed, mass, total = 0, 0.0, 0
    for name in to:
        if name not in tb:
            continue
        delta = (_get(to, name) - _get(tb, name)).abs()
        changed += int((delta > 0).sum())
        mass += float(delta.sum(dtype=torch.float64))
        total += delta.numel()
    return {"changed_frac": changed / total, "mean_abs_change": mass / total}


def _trim_cut_values(mag: torch.Tensor, density: float, gamma: float | None) -> torch.Tensor:
    """The |tau| values at the edges of what mergekit's magnitude trim keeps: ``magnitude`` keeps the
    max(1, floor(density n)) largest, ``magnitude_outliers`` (breadcrumbs) drops the floor(gamma n)
    largest and keeps the next floor(density n)."""
    n = mag.numel()
    if gamma is None:
        lo, hi = n - max(1, int(density * n)), n
    else:
        lo = max(0, n - int(density * n) - int(gamma * n))
        hi = lo + int(density * n)
    ordered = mag.sort().values
    return torch.stack([ordered[min(lo, n - 1)], ordered[max(hi - 1, 0)]])


def explain_trim_ties(bench: Bench, out_mb: Path, out_kit: Path, models: dict, k: int) -> dict:
    """How many entries where the two outputs differ are convention-dependent, not maths:

    - at a trim threshold: for some expert |tau| equals the edge of what the trim keeps, and the tools
      keep different entries of equal magnitude (mergebench the lowest index, mergekit whatever its
      unstable argsort returns);
    - (sign-electing methods) a zero weighted sum of the kept task-vector entries: the elected sign
      then depends on float32 rounding order (bf16 deltas make exact cancellations such as
      0.6 x a + 0.4 x (-1.5 a) common).
    """
    ia, ib, ibase = _index(out_mb), _index(out_kit), _index(models["base"])
    iexp = [_index(models[f"expert{i}"]) for i in range(k)]
    per_model = bench.per_model
    differing = at_cut_count = zero_sum_count = 0
    for name in ia:
        diff = _get(ia, name) != _get(ib, name)
        if not diff.any():
            continue
        base = _get(ibase, name)
        at_cut = torch.zeros_like(diff)
        weighted = torch.zeros_like(base, dtype=torch.float64)
        for i, idx in enumerate(iexp):
            tau = _get(idx, name) - base
            mag = tau.abs()
            density = per_model["density"][i % len(per_model["density"])]
            gamma = per_model["gamma"][i % len(per_model["gamma"])] if "gamma" in per_model else None
            lo, hi = _trim_cut_values(mag, density, gamma)
            at_cut |= (mag == lo) | (mag == hi)
            kept = (mag >= lo) & (mag <= hi)
            weighted += torch.where(kept, tau, 0.0).double() * per_model["weight"][i % len(per_model["weight"])]
        zero_sum = (weighted.abs() < 1e-12) & ~at_cut if bench.name.endswith("ties") else torch.zeros_like(diff)
        differing += int(diff.sum())
        at_cut_count += int((diff & at_cut).sum())
        zero_sum_count += int((diff & zero_sum).sum())
    return {"differing_entries": differing, "explained_by_trim_ties": at_cut_count,
            "explained_by_zero_sum_sign": zero_sum_count}


def agreement(bench: Bench, size: str, out_mb: Path, out_kit: Path, models: dict, k: int) -> dict:
    if deterministic(bench, size):
        result = {"kind": "entries", **compare_outputs(out_mb, out_kit)}
        if bench.name in TRIMMED and result.get("max_abs_diff") and SIZES[size].params < 2e8:  # sorts every tensor
            result.update(explain_trim_ties(bench, out_mb, out_kit, models, k))
        return result
    base = models["base"]
    return {"kind": "statistics", "mergebench": change_statistics(out_mb, base),
            "mergekit": change_statistics(out_kit, base)}


# ---- the two tools ---------------------------------------------------------------------------------

def mergebench_cmd(config: Path, out: Path, threads: int | None = None, seed: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "mergebench", "merge", str(config), "-o", str(out), "--force", "-q"]
    if threads:
        cmd += ["--threads", str(threads)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    return cmd


def mergekit_cmd(venv: Path, config: Path, out: Path) -> list[str]:
    return [str(venv / "bin" / "mergekit-yaml"), str(config), str(out), *MERGEKIT_OPTIONS]


def default_mergekit_venv() -> Path:
    """$MERGEKIT_VENV, else the repository's .mergekit-venv (the tests' one), else benchmarks/.venv-mergekit."""
    candidates = [Path(os.environ["MERGEKIT_VENV"])] if os.environ.get("MERGEKIT_VENV") else []
    candidates += [REPO / ".mergekit-venv", REPO / "benchmarks" / ".venv-mergekit"]
    return next((c for c in candidates if (c / "bin" / "mergekit-yaml").exists()), candidates[-1])


def ensure_mergekit(venv: Path) -> bool:
    if (venv / "bin" / "mergekit-yaml").exists():
        return True
    print(f"installing mergekit into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0", "mergekit==0.1.5"], check=True)
    return True


def mergekit_version(venv: Path) -> str:
    try:
        out = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m;"
                              "print(m.version('mergekit'))"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not installed"


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def check_config(config: dict, source: str) -> str | None:
    """mergebench's plan of a config (``mergebench convert``: every tensor's inputs and parameters
    resolved, no tensor read): None when it plans, else its error."""
    from mergebench.core.engine import describe
    from mergebench.core.errors import MergebenchError
    from mergebench.core.recipe import parse_recipe

    try:
        describe(parse_recipe(config, source))
    except MergebenchError as e:
        return str(e)
    return None


# ---- data-aware methods: the statistics pass against one forward pass ----------------------------------

def calibration_settings(work: Path, size: str, args) -> dict:
    """The recipe's ``calibration`` mapping for ``size``: the seeded data file and the pass's settings."""
    data = calibration_data(work / "models", size, args.calibration_samples, args.calibration_length)
    return {"data": str(data), "samples": args.calibration_samples, "max_length": args.calibration_length,
            "batch_size": args.calibration_batch, "seed": 0}


def calibration_entries(home: Path) -> set[str]:
    """The finished entries of the calibration cache under MERGEBENCH_HOME ``home``."""
    from mergebench.core.calibration import MANIFEST

    root = home / "artifacts" / "calibration"
    return {d.name for d in root.iterdir() if (d / MANIFEST).is_file()} if root.is_dir() else set()


class _PhasePeak:
    """This process's anonymous resident memory, polled every 5 ms; ``start()`` opens a phase and returns the
    memory at its start, ``stop()`` returns the phase's peak."""

    def __init__(self) -> None:
        self.peak = 0
        self._lock = threading.Lock()  # a sample taken before start() must not land in the new phase
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while True:
            with self._lock:
                self.peak = max(self.peak, _rss(os.getpid())[0])
            time.sleep(0.005)

    def start(self) -> int:
        with self._lock:
            self.peak = now = _rss(os.getpid())[0]
        return now

    def stop(self) -> int:
        with self._lock:
            return max(self.peak, _rss(os.getpid())[0])


def _release() -> None:
    """Return freed memory to the system between phases, so each phase's peak is its own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the next phase's start figure shows what stayed
        pass


def probe(spec: dict) -> dict:
    """For each model of ``spec``, back to back: one plain forward pass over the calibration data (the
    gram pass's batches, no hooks) and the statistics pass (``calibration.statistics``, cold cache), each
    timed and with its peak anonymous memory. Runs in its own process (``--probe SPEC.json``)."""
    from mergebench.core import calibration
    from mergebench.core.paths import mergebench_home
    from mergebench.core.tensor_io import open_local, read_safetensors_header

    data = calibration.CalibrationData.parse(spec["calibration"])
    request = calibration.CalibrationRequest(spec["kind"])
    cpu = torch.device("cpu")

    def load(root: Path):
        net = calibration.load_model(root, cpu)
        tokenizer = calibration.load_tokenizer(root)
        examples = [ids for ids, _ in (calibration.encode(tokenizer, prompt, completion, data.max_length)
                                       for prompt, completion in data.chosen()) if ids]
        pad = next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)
        return net, examples, pad

    def one_pass(net, examples, pad, batches: int | None = None) -> int:
        """The forward passes; returns the tokens they saw."""
        seen = 0
        with torch.no_grad():
            for first in list(range(0, len(examples), data.batch_size))[:batches]:
                batch = examples[first:first + data.batch_size]
                ids = torch.full((len(batch), max(map(len, batch))), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, seq in enumerate(batch):  # right-padded and masked, as the gram pass
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                net(input_ids=ids, attention_mask=mask, use_cache=False)
                seen += int(mask.sum())
        return seen

    # untimed: the first load and forward in a process pay one-off costs (imports, kernel set-up) that the
    # statistics pass, running second, would not
    net, examples, pad = load(Path(spec["models"][0]))
    one_pass(net, examples, pad, batches=1)
    if request.kind == "fisher":  # and the backward pass the Fisher takes
        net(input_ids=torch.tensor(examples[:1]), use_cache=False).logits.sum().backward()
    del net, examples
    _release()
    peak = _PhasePeak()
    experts = []
    for model in spec["models"]:
        root = Path(model)
        start = peak.start()
        t0 = time.perf_counter()
        net, examples, pad = load(root)
        t1 = time.perf_counter()
        tokens = one_pass(net, examples, pad)
        t2 = time.perf_counter()
        forward = {"load_seconds": t1 - t0, "forward_seconds": t2 - t1, "seconds": t2 - t0,
                   "start_anon_bytes": start, "peak_anon_bytes": peak.stop(), "examples": len(examples),
                   "tokens": tokens}
        del net, examples
        _release()

        source = open_local(str(root), root, allow_pickle=False)
        before = calibration_entries(mergebench_home())
        t0 = time.perf_counter()
        calibration.model_hash(source)  # the cache key's content hash, cached by file afterwards
        t1 = time.perf_counter()
        start = peak.start()
        stats = calibration.statistics(source, request, data, device=cpu)
        t2 = time.perf_counter()
        header = read_safetensors_header(stats.path)
        experts.append({"model": root.name, "forward": forward, "statistics": {
            "hash_seconds": t1 - t0, "seconds": t2 - t1, "start_anon_bytes": start, "peak_anon_bytes": peak.stop(),
            "computed": stats.path.parent.name in calibration_entries(mergebench_home()) - before,
            "entry": stats.path.parent.name, "artefact_bytes": stats.path.stat().st_size, "tensors": len(header),
            "largest_statistic_bytes": max(info.nbytes for info in header.values())}})
        source.close()
        del stats
        _release()
    return {"kind": spec["kind"], "calibration": data.parameters(), "experts": experts}


def probe_summary(result: dict, process: dict) -> dict:
    """The per-expert figures' medians and the statistics pass as a multiple of one forward pass."""
    med = statistics.median
    per = result["experts"]
    ratios = [e["statistics"]["seconds"] / e["forward"]["seconds"] for e in per]
    return {**result, "experts_probed": len(per), "process": {k: v for k, v in process.items() if k != "stdout"},
            "statistics_seconds": med([e["statistics"]["seconds"] for e in per]),
            "hash_seconds": med([e["statistics"]["hash_seconds"] for e in per]),
            "forward_seconds": med([e["forward"]["seconds"] for e in per]),
            "forward_load_seconds": med([e["forward"]["load_seconds"] for e in per]),
            "forward_pass_seconds": med([e["forward"]["forward_seconds"] for e in per]),
            "ratio": med(ratios), "ratios": ratios,
            "statistics_peak_anon_bytes": max(e["statistics"]["peak_anon_bytes"] for e in per),
            "forward_peak_anon_bytes": max(e["forward"]["peak_anon_bytes"] for e in per),
            "all_computed": all(e["statistics"]["computed"] for e in per)}


# ---- the run ---------------------------------------------------------------------------------------

def _inputs_label(bench: Bench, k: int) -> str:
    return f"{'base + ' if bench.base else ''}{k}{' (slices)' if bench.slices else ''}"


def _attempt(fn) -> dict:
    """One tool's measurement; a failure becomes {"error": ...} and the benchmark goes on."""
    try:
        return fn()
    except RuntimeError as e:
        return {"error": str(e)}


class Runner:
    """Times one (size, method, N) row after another; holds what rows share (paths, environments, floors)."""

    def __init__(self, args, results: dict):
        self.args, self.results = args, results
        self.work = Path(args.workdir)
        self.home = self.work / "mergebench-home"
        self.env = {**os.environ, "MERGEBENCH_LOAD_PLUGINS": "", "MERGEBENCH_HOME": str(self.home),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self.kit_env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
        self.out_mb, self.out_kit = self.work / "out-mergebench", self.work / "out-mergekit"
        self.config = self.work / "config.yml"

    def statistics(self, bench: Bench, size: str, models: dict, calibration: dict) -> dict:
        """The statistics pass and the forward baseline for ``bench``'s kind at ``size``, over as many experts
        as the largest N needs: probed once, in a subprocess, and cached in the results."""
        key = f"{size}/{bench.calibration}"
        if key not in self.results["statistics"]:
            k = max(n_models(bench, n) for n in self.args.experts)
            spec = {"models": [str(models[f"expert{i}"]) for i in range(k)], "kind": bench.calibration,
                    "calibration": calibration, "out": str(self.work / "probe.json")}
            (self.work / "probe-spec.json").write_text(json.dumps(spec))
            try:
                process = measure([sys.executable, str(Path(__file__).resolve()), "--probe",
                                   str(self.work / "probe-spec.json")], self.env)
                found = probe_summary(json.loads((self.work / "probe.json").read_text()), process)
            except RuntimeError as e:
                found = {"error": str(e)}
            self.results["statistics"][key] = {"size": size, "method": bench.name, **found}
            print(_statistics_line(key, self.results["statistics"][key]), flush=True)
        return self.results["statistics"][key]

    def row(self, bench: Bench, size: str, n: int, models: dict, use_kit: bool,
            calibration: dict | None = None) -> dict:
        args, k = self.args, n_models(bench, n)
        probed = self.statistics(bench, size, models, calibration) if bench.calibration else None
        config = config_for(bench, models, n, SIZES[size].layers, calibration)
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        named = {**models, "calibration.jsonl": Path(calibration["data"])} if calibration else models
        row = {"size": size, "params": SIZES[size].params, "experts": k, "method": bench.name,
               "inputs": _inputs_label(bench, k), "config": portable(config, named),
               "deterministic": deterministic(bench, size), "in_mergekit": bench.mergekit}
        cmd = mergebench_cmd(self.config, self.out_mb)
        entries = calibration_entries(self.home)
        # the first run also hashes every input (cached afterwards by path, size, mtime); --quick skips it
        row["mergebench_first_seconds"] = (_attempt(lambda: measure(cmd, self.env)).get("seconds")
                                           if args.first_run else None)
        mb = row["mergebench"] = _attempt(lambda: median_run(cmd, args.runs, self.env))
        if probed is not None:  # the merges read the probe's statistics: none may have been computed again
            added = calibration_entries(self.home) - entries
            row["statistics"] = {"probe": f"{size}/{bench.calibration}", "cache_entries_added": len(added),
                                 "cached": not added and "error" not in probed,
                                 "one_layer_bytes": (sum(e["statistics"]["largest_statistic_bytes"]
                                                         for e in probed["experts"][:k])
                                                     if "error" not in probed else None)}
        if "error" not in mb:
            row["output_bytes"] = dir_bytes(self.out_mb)
            bound = memory_bound(size, k, self.results["overhead"]["bytes"])
            row["memory_bound"] = {"bytes": bound, "largest_tensor_bytes": 4 * SIZES[size].largest_numel,
                                   "overhead_bytes": self.results["overhead"]["bytes"],
                                   "peak_anon_bytes": mb["peak_anon_bytes"], "within": mb["peak_anon_bytes"] <= bound}
            if probed is not None and row["statistics"]["one_layer_bytes"] is not None:
                extra = row["statistics"]["one_layer_bytes"]  # each expert's largest statistic, held at once
                row["memory_bound"].update({"engine_bytes": bound, "statistics_bytes": extra, "bytes": bound + extra,
                                            "within": mb["peak_anon_bytes"] <= bound + extra})
            floor = self.floor(bench, size, k, models, row)
            row["floor_multiple"] = mb["seconds"] / floor
            if mb["in_process_seconds"]:
                row["floor_multiple_in_process"] = mb["in_process_seconds"] / floor
        if use_kit and bench.mergekit:
            shutil.rmtree(self.out_kit, ignore_errors=True)  # no shards left from another method's layout
            kit_cmd = mergekit_cmd(Path(args.mergekit_venv), self.config, self.out_kit)
            kit = row["mergekit"] = _attempt(lambda: median_run(kit_cmd, args.runs, self.kit_env))
            if "error" not in kit and "error" not in mb:
                row["speedup"] = kit["seconds"] / mb["seconds"]
                row["memory_ratio"] = mb["peak_bytes"] / kit["peak_bytes"]
                row["agreement"] = agreement(bench, size, self.out_mb, self.out_kit, models, k)
        return row

    def floor(self, bench: Bench, size: str, k: int, models: dict, row: dict) -> float:
        """The I/O floor of this row's inputs and output, measured once per (size, inputs)."""
        key = row["floor"] = f"{size}/{row['inputs']}"
        if key not in self.results["floor"]:
            inputs = ([models["base"]] if bench.base else []) + [models[f"expert{i}"] for i in range(k)]
            self.results["floor"][key] = io_floor(inputs, row["output_bytes"], self.work / "floor.bin", self.args.runs)
        return self.results["floor"][key]["seconds"]


def run(args) -> dict:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    venv = Path(args.mergekit_venv)
    use_kit = not args.no_mergekit and (ensure_mergekit(venv) if args.install_mergekit else
                                        (venv / "bin" / "mergekit-yaml").exists())
    results = {"machine": machine(), "versions": {"mergebench": _version(), "torch": torch.__version__,
                                                  "mergekit": mergekit_version(venv) if use_kit else "not run"},
               "mergekit_options": MERGEKIT_OPTIONS if use_kit else None, "runs": args.runs, "rows": [],
               "skipped": [{"method": name, "reason": args.skip_reason} for name in BY_NAME if name not in args.methods],
               "floor": {}, "threads": [], "statistics": {}}
    runner = Runner(args, results)
    # pip compiles an installed package's bytecode (mergekit's, in its venv); an editable install run with
    # PYTHONDONTWRITEBYTECODE (as on these machines) would compile ours again in every timed run
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "mergebench")], check=True,
                   stdout=subprocess.DEVNULL)
    # the statistics passes are measured cold, and the merges then read what they cached
    shutil.rmtree(runner.home / "artifacts" / "calibration", ignore_errors=True)
    results["overhead"] = fixed_overhead(work, runner.env, args.runs)
    for size in args.sizes:
        models = build(work / "models", size, max(args.experts + [2]))
        calibration = calibration_settings(work, size, args)
        results.setdefault("calibration", {})[size] = {**calibration, "data": Path(calibration["data"]).name}
        done: set[tuple[str, int]] = set()
        for n in args.experts:
            for name in args.methods:
                bench = BY_NAME[name]
                if (name, n_models(bench, n)) in done:
                    continue  # a fixed-count method runs once per size
                done.add((name, n_models(bench, n)))
                reason = skip_reason(bench, n)
                if reason:
                    results["skipped"].append({"method": name, "size": size, "experts": n, "reason": reason})
                    continue
                row = runner.row(bench, size, n, models, use_kit, calibration if bench.calibration else None)
                results["rows"].append(row)
                print(_row_line(row), flush=True)
                compare_with_ties(results)
                if args.json:  # after every row, so an interrupted run keeps what it measured
                    Path(args.json).write_text(json.dumps(results, indent=2))
        if args.thread_check:
            results["threads"].append(thread_check(models, work, runner.env, size))
    if args.quick_checked:  # methods --quick does not time: mergebench still plans their configs
        models = build(work / "models", args.sizes[0], max(args.experts + [2]))
        calibration = calibration_settings(work, args.sizes[0], args)
        results["configs_checked"] = {
            name: check_config(config_for(BY_NAME[name], models, args.experts[0], SIZES[args.sizes[0]].layers,
                                          calibration), f"{name} config") or "accepted" for name in args.quick_checked}
    shutil.rmtree(runner.out_mb, ignore_errors=True)
    shutil.rmtree(runner.out_kit, ignore_errors=True)
    return results


def compare_with_ties(results: dict) -> None:
    """Each row of a method beyond mergekit gets its time as a multiple of our ties at the same (size, N)."""
    ties = {(r["size"], r["experts"]): r["mergebench"] for r in results["rows"]
            if r["method"] == TIES and "error" not in r["mergebench"]}
    for r in results["rows"]:
        if r.get("in_mergekit", True) or "error" in r["mergebench"]:
            continue
        t, mb = ties.get((r["size"], r["experts"])), r["mergebench"]
        if t is None:
            r["vs_ties"] = None
            continue
        inside = (mb["in_process_seconds"] / t["in_process_seconds"]
                  if mb.get("in_process_seconds") and t.get("in_process_seconds") else None)
        r["vs_ties"] = {"ties_seconds": t["seconds"], "ties_in_process_seconds": t.get("in_process_seconds"),
                        "ratio": mb["seconds"] / t["seconds"], "ratio_in_process": inside}


def thread_check(models: dict, work: Path, env: dict, size: str) -> dict:
    """Bit-identical outputs on 1 and 2 threads and across reruns with the same seed (dare_ties, N=2)."""
    config = work / "threads.yml"
    config.write_text(yaml.safe_dump(config_for(BY_NAME[THREAD_CHECK], models, 2, SIZES[size].layers)))
    digests = {}
    for label, threads in (("1 thread", 1), ("2 threads", 2), ("2 threads again", 2)):
        out = work / f"threads-{label.replace(' ', '_')}"
        done = subprocess.run(mergebench_cmd(config, out, threads, seed=7), env=env, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            return {"size": size, "method": THREAD_CHECK, "error": done.stderr.strip()[-300:]}
        digests[label] = _digest(out)
        shutil.rmtree(out)
    return {"size": size, "method": THREAD_CHECK, "identical": len(set(digests.values())) == 1, "digests": digests}


def _digest(d: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _version() -> str:
    from mergebench import __version__

    return __version__


def machine() -> dict:
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    disk = shutil.disk_usage("/")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "disk_gib": round(disk.total / 2**30), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _row_line(row: dict) -> str:
    head = f"{row['size']:>5} N={row['experts']} {row['method']:<16}"
    mb = row["mergebench"]
    if "error" in mb:
        line = f"{head} mergebench FAILED: {mb['error']}"
    else:
        line = f"{head} mergebench {mb['seconds']:6.2f} s {mb['peak_bytes'] / 2**30:5.2f} GiB " \
               f"({row['floor_multiple']:.1f}x floor)"
    kit = row.get("mergekit")
    if not row.get("in_mergekit", True):
        vs = row.get("vs_ties")
        line += f" | {NOT_IN_MERGEKIT}" + (f" | {vs['ratio']:.1f}x our ties" if vs else "")
    elif kit and "error" in kit:
        line += f" | mergekit FAILED: {kit['error']}"
    elif kit:
        line += f" | mergekit {kit['seconds']:6.2f} s {kit['peak_bytes'] / 2**30:5.2f} GiB"
        if "speedup" in row:
            line += f" | {row['speedup']:.1f}x faster"
    return line


def _statistics_line(key: str, s: dict) -> str:
    if "error" in s:
        return f"{key:>12} statistics FAILED: {s['error']}"
    return (f"{key:>12} statistics pass {s['statistics_seconds']:6.2f} s per expert, one forward pass "
            f"{s['forward_seconds']:6.2f} s ({s['ratio']:.2f}x), peak {s['statistics_peak_anon_bytes'] / 2**30:.2f} / "
            f"{s['forward_peak_anon_bytes'] / 2**30:.2f} GiB anon")


# ---- report ------------------------------------------------------------------------------------------

def _largest_n_rows(results: dict, size: str) -> list[dict]:
    """Each method's row at the largest N it ran with for this size (its fixed count for two-model methods)."""
    best: dict[str, dict] = {}
    for r in results["rows"]:
        if r["size"] == size and (r["method"] not in best or r["experts"] > best[r["method"]]["experts"]):
            best[r["method"]] = r
    return [best[b.name] for b in METHODS if b.name in best]


def plot(results: dict, path: Path) -> bool:
    """Per size, at the largest N: wall time of both tools (log scale) and peak anonymous memory with the
    engine's bound, one group of bars per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = sorted({r["size"] for r in results["rows"]}, key=lambda s: SIZES[s].params)
    fig, axes = plt.subplots(2, len(sizes), figsize=(max(8, 0.55 * len(METHODS)) * len(sizes), 9), squeeze=False)
    for col, size in enumerate(sizes):
        rows = [r for r in _largest_n_rows(results, size) if "error" not in r["mergebench"]]
        xs = range(len(rows))
        labels = [f"{r['method']}\nN={r['experts']}" for r in rows]
        kit = [r.get("mergekit", {}).get("seconds") for r in rows]
        axes[0][col].bar([x - 0.2 for x in xs], [r["mergebench"]["seconds"] for r in rows], 0.4, label="mergebench")
        axes[0][col].bar([x + 0.2 for x in xs], [s or 0 for s in kit], 0.4, label="mergekit 0.1.5")
        floors = [results["floor"][r["floor"]]["seconds"] for r in rows]
        axes[0][col].scatter(list(xs), floors, marker="_", s=300, color="k", label="I/O floor", zorder=3)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("wall seconds (log scale)")
        axes[0][col].set_title(f"{size} ({SIZES[size].params / 1e6:.0f}M params): wall time at the largest N")
        gib = 2**30
        axes[1][col].bar([x - 0.2 for x in xs], [r["mergebench"]["peak_anon_bytes"] / gib for r in rows], 0.4,
                         label="mergebench (anonymous)")
        axes[1][col].bar([x + 0.2 for x in xs], [r.get("mergekit", {}).get("peak_anon_bytes", 0) / gib for r in rows],
                         0.4, label="mergekit 0.1.5 (anonymous)")
        axes[1][col].scatter(list(xs), [r["memory_bound"]["bytes"] / gib for r in rows], marker="_", s=300,
                             color="r", label="(N + 2) x largest tensor + overhead", zorder=3)
        axes[1][col].set_ylabel("peak anonymous GiB (process tree)")
        axes[1][col].set_title(f"{size}: peak memory at the largest N")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(list(xs))
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _agreement_cell(agree: dict | None) -> str:
    if not agree:
        return "-"
    if agree["kind"] == "statistics":
        a, b = agree["mergebench"], agree["mergekit"]
        return (f"stochastic: {100 * a['changed_frac']:.1f}% / {100 * b['changed_frac']:.1f}% of entries changed, "
                f"mean abs change {a['mean_abs_change']:.3g} / {b['mean_abs_change']:.3g}")
    if not agree.get("same_names") or agree.get("same_shapes") is False:
        return "different tensors: " + json.dumps({k: v for k, v in agree.items() if k != "kind"})
    cell = (f"max abs diff {agree['max_abs_diff']:.2g}; {100 * agree['frac_beyond_bf16_step']:.3f}% of entries "
            f"> 1 bf16 step")
    if "differing_entries" in agree:
        cell += (f"; of {agree['differing_entries']} differing entries, {agree['explained_by_trim_ties']} at a trim "
                 f"threshold (tie order), {agree.get('explained_by_zero_sum_sign', 0)} with a zero weighted sum "
                 f"(sign election)")
    return cell


def _bound_cell(row: dict) -> str:
    b = row.get("memory_bound")
    if not b:
        return "-"
    cell = f"{'yes' if b['within'] else 'NO'}: {_gib(b['peak_anon_bytes'])} of {_gib(b['bytes'])}"
    if "statistics_bytes" in b:  # a data-aware method's bound also holds each expert's statistic of one layer
        cell += f" (engine {_gib(b['engine_bytes'])} + statistics {_gib(b['statistics_bytes'])})"
    return cell


def _ties_cell(vs: dict | None) -> str:
    if not vs:
        return "-"
    return f"{vs['ratio']:.2f}x ({_num(vs.get('ratio_in_process'))}x)"


def markdown_tables(results: dict) -> str:
    beyond = any(not r.get("in_mergekit", True) for r in results["rows"])  # the last column is theirs
    lines = [("| size | inputs (N) | method | mergebench s: wall (in-process; first run) | mergekit s | speed-up "
              "| mergebench peak GiB (anon) | mergekit peak GiB (anon) | within (N+2) x largest tensor + overhead "
              "(anon GiB) | x I/O floor: wall (in-process) | output MB | agreement with mergekit |"
              + (" x our TIES: wall (in-process) |" if beyond else "")),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if beyond else "")]
    for r in results["rows"]:
        mb, kit = r["mergebench"], r.get("mergekit")
        kit_ok = kit and "error" not in kit
        na = not r.get("in_mergekit", True)
        if "error" in mb:
            mb_cells = ["failed: " + mb["error"], "-", "-", "-"]
        else:
            mb_cells = [(f"{mb['seconds']:.2f} ({_num(mb.get('in_process_seconds'))}; "
                         f"{_num(r.get('mergebench_first_seconds'))})"),
                        f"{_gib(mb['peak_bytes'])} ({_gib(mb['peak_anon_bytes'])})", _bound_cell(r),
                        f"{r['floor_multiple']:.2f} ({_num(r.get('floor_multiple_in_process'))})"]
        cells = [r["size"], f"{r['inputs']}", r["method"], mb_cells[0],
                 NOT_IN_MERGEKIT if na else
                 f"{kit['seconds']:.2f}" if kit_ok else ("failed: " + kit["error"] if kit else "-"),
                 NOT_IN_MERGEKIT if na else f"{r['speedup']:.1f}x" if "speedup" in r else "-",
                 mb_cells[1],
                 NOT_IN_MERGEKIT if na else f"{_gib(kit['peak_bytes'])} ({_gib(kit['peak_anon_bytes'])})" if kit_ok else "-",
                 mb_cells[2], mb_cells[3], f"{r['output_bytes'] / 1e6:.0f}" if "output_bytes" in r else "-",
                 NOT_IN_MERGEKIT if na else _agreement_cell(r.get("agreement"))]
        if beyond:
            cells.append(_ties_cell(r.get("vs_ties")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| size/inputs | read inputs s | write output + fsync s | floor s | input GB | output MB |",
              "|---|---|---|---|---|---|"]
    for key, v in results["floor"].items():
        lines.append(f"| {key} | {v['read_seconds']:.2f} | {v['write_seconds']:.2f} | {v['seconds']:.2f} | "
                     f"{v['input_bytes'] / 1e9:.2f} | {v['output_bytes'] / 1e6:.0f} |")
    lines += ["", summary_table(results)]
    if any(not r.get("in_mergekit", True) for r in results["rows"]):
        lines += ["", beyond_table(results)]
    if results.get("statistics"):
        lines += ["", statistics_table(results)]
    o = results.get("overhead")
    if o:
        lines += ["", (f"Fixed overhead in the bound: {_gib(o['bytes'])} GiB anonymous ({o['method']}; "
                       f"{_gib(o['peak_bytes'])} GiB with file-backed pages).")]
    by_reason: dict[str, list[str]] = {}
    for s in results.get("skipped", []):
        by_reason.setdefault(s["reason"], []).append(s["method"] + (f" ({s['size']}, N = {s['experts']})"
                                                                     if "size" in s else ""))
    lines += [f"\nSkipped ({reason}): {', '.join(methods)}" for reason, methods in by_reason.items()]
    for t in results.get("threads", []):
        lines += ["", f"Thread check ({t['method']}, N = 2, seed 7), {t['size']}: " +
                  (f"failed: {t['error']}" if "error" in t else
                   f"{'identical' if t['identical'] else 'DIFFERENT'} ({', '.join(sorted(set(t['digests'].values())))})")]
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """Per size and method at its largest N: the speed-up and whether memory stayed within the bound."""
    lines = ["| size | method | inputs | speed-up over mergekit | >= 3x | anon peak / bound | within bound |",
             "|---|---|---|---|---|---|---|"]
    for size in sorted({r["size"] for r in results["rows"]}, key=lambda s: -SIZES[s].params):
        for r in _largest_n_rows(results, size):
            if not r.get("in_mergekit", True):
                continue  # beyond_table
            speedup, b = r.get("speedup"), r.get("memory_bound")
            cells = [size, r["method"], r["inputs"],
                     f"{speedup:.1f}x" if speedup else "-", ("yes" if speedup >= 3 else "no") if speedup else "-",
                     f"{b['peak_anon_bytes'] / b['bytes']:.2f}" if b else "-",
                     ("yes" if b["within"] else "NO") if b else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def beyond_table(results: dict) -> str:
    """The methods beyond mergekit, every (size, N): their time as a multiple of our ties (target: within 5x,
    judged on the in-process time, which leaves out the interpreter start both pay) and memory."""
    lines = [("| size | method | inputs | mergebench s: wall (in-process) | our TIES s: wall (in-process) "
              "| x our TIES: wall (in-process) | within 5x (in-process) | anon peak / bound | within bound |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r.get("in_mergekit", True):
            continue
        mb, vs, b = r["mergebench"], r.get("vs_ties"), r.get("memory_bound")
        if "error" in mb:
            lines.append(f"| {r['size']} | {r['method']} | {r['inputs']} | failed: {mb['error']} | - | - | - | - | - |")
            continue
        ratio = vs and (vs.get("ratio_in_process") or vs["ratio"])
        cells = [r["size"], r["method"], r["inputs"], f"{mb['seconds']:.2f} ({_num(mb.get('in_process_seconds'))})",
                 f"{vs['ties_seconds']:.2f} ({_num(vs.get('ties_in_process_seconds'))})" if vs else "no ties row",
                 _ties_cell(vs), ("yes" if ratio <= 5 else "NO") if vs else "-",
                 f"{b['peak_anon_bytes'] / b['bytes']:.2f}" if b else "-", ("yes" if b["within"] else "NO") if b else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def statistics_table(results: dict) -> str:
    """regmean's and fisher's statistics pass per expert against one plain forward pass over the same data."""
    lines = [("| size | method (statistic) | experts | tokens per expert | statistics pass s per expert: median "
              "(range) | one forward pass s per expert: load + forward | statistics / forward pass: median (range) "
              "| content hash s | statistics pass peak GiB anon (at start) | forward pass peak GiB anon (at start) "
              "| statistics MiB per expert (largest tensor) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, s in results.get("statistics", {}).items():
        size, kind = key.split("/")
        if "error" in s:
            lines.append(f"| {size} | {s['method']} ({kind}) | - | - | failed: {s['error']} | - | - | - | - | - | - |")
            continue
        per = s["experts"]
        seconds = [e["statistics"]["seconds"] for e in per]
        cells = [size, f"{s['method']} ({kind})", s["experts_probed"], per[0]["forward"]["tokens"],
                 f"{statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f})",
                 f"{s['forward_load_seconds']:.2f} + {s['forward_pass_seconds']:.2f} = {s['forward_seconds']:.2f}",
                 f"{s['ratio']:.2f}x ({min(s['ratios']):.2f}-{max(s['ratios']):.2f})", f"{s['hash_seconds']:.2f}",
                 f"{_gib(s['statistics_peak_anon_bytes'])} ({_gib(max(e['statistics']['start_anon_bytes'] for e in per))})",
                 f"{_gib(s['forward_peak_anon_bytes'])} ({_gib(max(e['forward']['start_anon_bytes'] for e in per))})",
                 f"{per[0]['statistics']['artefact_bytes'] / 2**20:.1f} "
                 f"({per[0]['statistics']['largest_statistic_bytes'] / 2**20:.2f})"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: smoke size, N=2, one run, methods {', '.join(QUICK)}")
    parser.add_argument("--sizes", default="0.1B,0.5B", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--experts", default="2,4,8")
    parser.add_argument("--methods", default=",".join(BY_NAME),
                        help=f"comma-separated, from mergekit's {', '.join(MERGEKIT)} and beyond it {', '.join(BEYOND)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=str(REPO / "benchmarks" / ".work"))
    parser.add_argument("--mergekit-venv", default=str(default_mergekit_venv()),
                        help="mergekit 0.1.5's virtualenv (default: $MERGEKIT_VENV, .mergekit-venv, "
                             "benchmarks/.venv-mergekit: the first that exists)")
    parser.add_argument("--install-mergekit", action="store_true", help="create the mergekit virtualenv if missing")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--no-thread-check", dest="thread_check", action="store_false")
    parser.add_argument("--json", default=None, help="write results as JSON here")
    parser.add_argument("--plot", default=None, help="write the PNG plot here")
    parser.add_argument("--from-json", default=None, help="only render tables (and --plot) from saved results")
    parser.add_argument("--calibration-samples", type=int, default=32, help="regmean/fisher: calibration texts")
    parser.add_argument("--calibration-length", type=int, default=128, help="regmean/fisher: tokens per text")
    parser.add_argument("--calibration-batch", type=int, default=8, help="regmean: texts per forward pass")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one statistics probe
    args = parser.parse_args(argv)
    if args.probe:
        spec = json.loads(Path(args.probe).read_text())
        Path(spec["out"]).write_text(json.dumps(probe(spec), indent=2))
        return 0
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        if args.plot and not plot(results, Path(args.plot)):
            print("no plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        print(markdown_tables(results))
        return 0
    args.first_run, args.quick_checked = True, []
    args.skip_reason = "not in --methods"
    if args.quick:
        args.sizes, args.experts, args.runs, args.methods = "smoke", "2", 1, ",".join(QUICK)
        args.calibration_samples, args.calibration_length = 16, 64
        args.first_run, args.skip_reason = False, QUICK_REASON
        args.quick_checked = [b.name for b in METHODS if b.name not in QUICK]
    args.sizes = args.sizes.split(",")
    args.experts = [int(n) for n in args.experts.split(",")]
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in BY_NAME]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    if TIES not in args.methods and any(m in BEYOND for m in args.methods):
        print(f"adding {TIES} to --methods: the methods beyond mergekit are timed against it", file=sys.stderr)
        args.methods.insert(0, TIES)
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot and not plot(results, Path(args.plot)):
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
    print(markdown_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
