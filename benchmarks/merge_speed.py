"""Merge speed and memory: mergebench against mergekit and against the I/O floor.

    python benchmarks/merge_speed.py --quick          # smoke test, under a minute
    python benchmarks/merge_speed.py                  # the full run reported in docs/benchmarks.md

Both tools merge the same locally built bf16 Llama-shaped models (base + N seeded perturbations) as
subprocesses, the way users run them (``mergekit-yaml`` and ``mergebench merge``), with the page cache
warm. For each (size, N, method) it records the median wall time of ``--runs`` runs, the peak resident
memory of the whole process tree (anonymous and file-backed pages separately, polled every 10 ms),
the output size, the ratio mergebench / mergekit, and for deterministic methods how far the two
outputs are apart. The floor is the time to read every input byte and write (and fsync) the output's
bytes. mergekit is installed into its own virtualenv (``--mergekit-venv``) with the same CPU torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SIZES, build  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = {  # mergebench method -> (mergekit method, mergebench params, mergekit params)
    "average": ("linear", {}, {"normalize": True}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 1.0}, {"normalize": False, "lambda": 1.0}),
    "ties": ("ties", {"density": 0.2, "lambda": 1.0}, {"normalize": True, "lambda": 1.0}),
    "dare_ties": ("dare_ties", {"density": 0.2, "lambda": 1.0}, {"normalize": True, "lambda": 1.0}),
}
DETERMINISTIC = ("average", "task_arithmetic", "ties")
MERGEKIT_OPTIONS = ["--lazy-unpickle", "--num-threads", "2", "--quiet", "--no-copy-tokenizer"]


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
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"seconds": seconds, "peak_bytes": peak["total"], "peak_anon_bytes": peak["anon"],
            "peak_file_bytes": peak["file"], "stdout": out.decode()[-500:]}


def _in_process_seconds(stdout: str) -> float | None:
    """mergebench prints its own merge time (without interpreter and import start-up): '... 2.31 s -> out'."""
    import re

    m = re.search(r"([\d.]+) s -> ", stdout)
    return float(m.group(1)) if m else None


def median_run(cmd_for_run, runs: int, env=None) -> dict:
    results = [measure(cmd_for_run(i), env) for i in range(runs)]
    best = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]
    inside = [x for x in (_in_process_seconds(r["stdout"]) for r in results) if x is not None]
    return {**best, "runs_seconds": [round(r["seconds"], 3) for r in results],
            "in_process_seconds": statistics.median(inside) if inside else None,
            "peak_bytes": max(r["peak_bytes"] for r in results),
            "peak_anon_bytes": max(r["peak_anon_bytes"] for r in results),
            "peak_file_bytes": max(r["peak_file_bytes"] for r in results)}


# ---- the floor ---------------------------------------------------------------------------------------

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
            "input_bytes": sum(f.stat().st_size for f in files)}


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
        return {"same_names": False}
    max_abs, beyond, total = 0.0, 0, 0
    for name in ta:
        x, y = _get(ta, name), _get(tb, name)
        diff = (x - y).abs()
        max_abs = max(max_abs, float(diff.max()))
        ulp = torch.maximum(x.abs(), y.abs()) * 2.0**-7  # one bf16 step at that magnitude
        beyond += int((diff > ulp).sum())
        total += x.numel()
    return {"same_names": True, "max_abs_diff": max_abs, "frac_beyond_bf16_step": beyond / total}


def explain_ties_differences(a: Path, b: Path, models: dict, n: int, density: float) -> dict:
    """Share of entries where the two TIES outputs differ that one of the two known conventions explains.

    (1) an expert's |tau| equals its trim threshold (with k by round-half-up or by floor): the two tools
    break such ties differently (index order vs argsort order); (2) the weighted sum of trimmed task
    vectors is exactly 0: mergebench elects no sign there, mergekit elects "+".
    """
    ia, ib = _index(a), _index(b)
    ibase, iexp = _index(models["base"]), [_index(models[f"expert{i}"]) for i in range(n)]
    differing = explained = 0
    for name in ia:
        diff = _get(ia, name) != _get(ib, name)
        if not diff.any():
            continue
        base = _get(ibase, name)
        at_threshold = torch.zeros_like(diff)
        trimmed_sum = torch.zeros_like(base)
        for idx in iexp:
            mag = (_get(idx, name) - base).abs()
            m = mag.numel()
            for k in {max(1, int(density * m)), min(m, int(density * m + 0.5))}:
                if k > 0:
                    kth = mag.kthvalue(m - k + 1).values
                    at_threshold |= mag == kth
            k = min(m, int(density * m + 0.5))
            kth = mag.kthvalue(m - k + 1).values if k else float("inf")
            trimmed_sum += torch.where(mag > kth, _get(idx, name) - base, 0.0)
        explained += int((diff & (at_threshold | (trimmed_sum == 0))).sum())
        differing += int(diff.sum())
    return {"differing_entries": differing, "explained_by_conventions": explained}


# ---- the two tools ---------------------------------------------------------------------------------

def mergebench_cmd(method: str, models: dict, n: int, out: Path, threads: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "mergebench", "merge", method, "--base", str(models["base"])]
    for i in range(n):
        cmd += ["-e", str(models[f"expert{i}"])]
    for k, v in METHODS[method][1].items():
        cmd += ["-p", f"{k}={v}"]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd + ["-o", str(out), "--force", "-q"]


def mergekit_cmd(venv: Path, method: str, models: dict, n: int, out: Path, config: Path) -> list[str]:
    kit_method, _, global_params = METHODS[method]
    per_model = {"weight": 1.0}
    if method in ("ties", "dare_ties"):
        per_model["density"] = METHODS[method][1]["density"]
    # float32 maths, bf16 output: the same convention as mergebench, so outputs can be compared
    cfg = {"merge_method": kit_method, "dtype": "float32", "out_dtype": "bfloat16", "parameters": global_params,
           "models": [{"model": str(models[f"expert{i}"]), "parameters": per_model} for i in range(n)]}
    if kit_method != "linear":
        cfg["base_model"] = str(models["base"])
    config.write_text(yaml.safe_dump(cfg))
    return [str(venv / "bin" / "mergekit-yaml"), str(config), str(out), *MERGEKIT_OPTIONS]


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


# ---- the run ---------------------------------------------------------------------------------------

def run(args) -> dict:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MERGEBENCH_LOAD_PLUGINS": "", "MERGEBENCH_HOME": str(work / "mergebench-home")}
    venv = Path(args.mergekit_venv)
    use_kit = not args.no_mergekit and (ensure_mergekit(venv) if args.install_mergekit else
                                        (venv / "bin" / "mergekit-yaml").exists())
    results = {"machine": machine(), "versions": {"mergebench": _version(), "torch": torch.__version__,
                                                  "mergekit": mergekit_version(venv) if use_kit else "not run"},
               "mergekit_options": MERGEKIT_OPTIONS if use_kit else None, "runs": args.runs, "rows": [],
               "floor": {}, "threads": []}
    for size in args.sizes:
        n_max = max(args.experts)
        models = build(work / "models", size, n_max)
        for n in args.experts:
            inputs = [models["base"]] + [models[f"expert{i}"] for i in range(n)]
            floor = io_floor(inputs, dir_bytes(models["base"]), work / "floor.bin", args.runs)
            results["floor"][f"{size}/{n}"] = floor
            for method in args.methods:
                out_mb, out_kit = work / "out-mergebench", work / "out-mergekit"
                row = {"size": size, "params": SIZES[size].params, "experts": n, "method": method}
                # The first mergebench run also hashes every input (cached afterwards by path, size, mtime).
                first = measure(mergebench_cmd(method, models, n, out_mb), env)
                row["mergebench_first_seconds"] = first["seconds"]
                mb = median_run(lambda i: mergebench_cmd(method, models, n, out_mb), args.runs, env)
                row["mergebench"] = {k: v for k, v in mb.items() if k != "stdout"}
                row["output_bytes"] = dir_bytes(out_mb)
                row["floor_multiple"] = mb["seconds"] / floor["seconds"]
                if mb["in_process_seconds"]:
                    row["floor_multiple_in_process"] = mb["in_process_seconds"] / floor["seconds"]
                if use_kit:
                    kit = median_run(lambda i: mergekit_cmd(venv, method, models, n, out_kit, work / "kit.yaml"),
                                     args.runs)
                    row["mergekit"] = {k: v for k, v in kit.items() if k != "stdout"}
                    row["speedup"] = kit["seconds"] / mb["seconds"]
                    row["memory_ratio"] = mb["peak_bytes"] / kit["peak_bytes"]
                    if method in DETERMINISTIC:
                        row["agreement"] = compare_outputs(out_mb, out_kit)
                    if method == "ties" and SIZES[size].params < 2e8:
                        row["agreement"].update(explain_ties_differences(out_mb, out_kit, models, n,
                                                                         METHODS["ties"][1]["density"]))
                results["rows"].append(row)
                print(_row_line(row), flush=True)
                if args.json:  # after every row, so an interrupted run keeps what it measured
                    Path(args.json).write_text(json.dumps(results, indent=2))
        if args.thread_check:
            results["threads"].append(thread_check(models, work, env, size))
    shutil.rmtree(work / "out-mergebench", ignore_errors=True)
    shutil.rmtree(work / "out-mergekit", ignore_errors=True)
    return results


def thread_check(models: dict, work: Path, env: dict, size: str) -> dict:
    """Bit-identical outputs on 1 and 2 threads and across reruns with the same seed (dare_ties, N=2)."""
    digests = {}
    for label, threads in (("1 thread", 1), ("2 threads", 2), ("2 threads again", 2)):
        out = work / f"threads-{threads}-{label.replace(' ', '_')}"
        subprocess.run(mergebench_cmd("dare_ties", models, 2, out, threads) + ["--seed", "7"], check=True, env=env,
                       capture_output=True)
        digests[label] = _digest(out)
        shutil.rmtree(out)
    return {"size": size, "identical": len(set(digests.values())) == 1, "digests": digests}


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
    mb = row["mergebench"]
    line = f"{row['size']:>5} N={row['experts']} {row['method']:<16} mergebench {mb['seconds']:6.2f} s " \
           f"{mb['peak_bytes'] / 2**30:5.2f} GiB ({row['floor_multiple']:.1f}x floor)"
    if "mergekit" in row:
        kit = row["mergekit"]
        line += f" | mergekit {kit['seconds']:6.2f} s {kit['peak_bytes'] / 2**30:5.2f} GiB | {row['speedup']:.1f}x faster"
    return line


# ---- report ------------------------------------------------------------------------------------------

def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = results["rows"]
    sizes = sorted({r["size"] for r in rows}, key=lambda s: SIZES[s].params)
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
    for col, size in enumerate(sizes):
        for method in METHODS:
            pts = sorted((r["experts"], r) for r in rows if r["size"] == size and r["method"] == method)
            if not pts:
                continue
            ns = [n for n, _ in pts]
            line, = axes[0][col].plot(ns, [r["mergebench"]["seconds"] for _, r in pts], "o-", label=f"mergebench {method}")
            axes[1][col].plot(ns, [r["mergebench"]["peak_bytes"] / 2**30 for _, r in pts], "o-", color=line.get_color(),
                              label=f"mergebench {method}")
            if all("mergekit" in r for _, r in pts):
                axes[0][col].plot(ns, [r["mergekit"]["seconds"] for _, r in pts], "x--", color=line.get_color(),
                                  label=f"mergekit {METHODS[method][0]}")
                axes[1][col].plot(ns, [r["mergekit"]["peak_bytes"] / 2**30 for _, r in pts], "x--",
                                  color=line.get_color(), label=f"mergekit {METHODS[method][0]}")
        floors = sorted((int(k.split("/")[1]), v["seconds"]) for k, v in results["floor"].items() if k.startswith(size + "/"))
        axes[0][col].plot([n for n, _ in floors], [s for _, s in floors], "k:", label="I/O floor")
        axes[0][col].set_title(f"{size} ({SIZES[size].params / 1e6:.0f}M params): wall time")
        axes[1][col].set_title(f"{size}: peak resident memory (process tree)")
        axes[0][col].set_ylabel("seconds (log scale)")
        axes[0][col].set_yscale("log")
        axes[1][col].set_ylabel("GiB")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("experts merged (N)")
            ax.set_xticks(sorted({r["experts"] for r in rows}))
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def markdown_tables(results: dict) -> str:
    lines = ["| size | N | method | mergebench s: wall (in-process; first run) | mergekit s | speed-up "
             "| mergebench peak GiB (anon) | mergekit peak GiB (anon) | x I/O floor: wall (in-process) | output MB "
             "| agreement with mergekit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        mb, kit, agree = r["mergebench"], r.get("mergekit"), r.get("agreement")
        cells = [r["size"], str(r["experts"]), r["method"],
                 f"{mb['seconds']:.2f} ({_num(mb.get('in_process_seconds'))}; {r['mergebench_first_seconds']:.2f})",
                 f"{kit['seconds']:.2f}" if kit else "-",
                 f"{r['speedup']:.1f}x" if kit else "-",
                 f"{_gib(mb['peak_bytes'])} ({_gib(mb['peak_anon_bytes'])})",
                 f"{_gib(kit['peak_bytes'])} ({_gib(kit['peak_anon_bytes'])})" if kit else "-",
                 f"{r['floor_multiple']:.2f} ({_num(r.get('floor_multiple_in_process'))})",
                 f"{r['output_bytes'] / 1e6:.0f}",
                 (f"max abs diff {agree['max_abs_diff']:.2g}; {100 * agree['frac_beyond_bf16_step']:.3f}% of "
                  f"entries > 1 bf16 step" + (f"; {agree['explained_by_conventions']}/{agree['differing_entries']} "
                                               "differing entries explained by tie conventions"
                                               if "differing_entries" in agree else "")) if agree else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| size/N | read inputs s | write output + fsync s | floor s | input GB |", "|---|---|---|---|---|"]
    for key, v in results["floor"].items():
        lines.append(f"| {key} | {v['read_seconds']:.2f} | {v['write_seconds']:.2f} | {v['seconds']:.2f} | "
                     f"{v['input_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, N=2, one run")
    parser.add_argument("--sizes", default="0.1B,0.5B", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--experts", default="2,4,8")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=str(REPO / "benchmarks" / ".work"))
    parser.add_argument("--mergekit-venv", default=str(REPO / "benchmarks" / ".venv-mergekit"))
    parser.add_argument("--install-mergekit", action="store_true", help="create the mergekit virtualenv if missing")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--no-thread-check", dest="thread_check", action="store_false")
    parser.add_argument("--json", default=None, help="write results as JSON here")
    parser.add_argument("--plot", default=None, help="write the PNG plot here")
    parser.add_argument("--from-json", default=None, help="only render tables (and --plot) from saved results")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        if args.plot:
            plot(results, Path(args.plot))
        print(markdown_tables(results))
        return 0
    if args.quick:
        args.sizes, args.experts, args.runs = "smoke", "2", 1
    args.sizes = args.sizes.split(",")
    args.experts = [int(n) for n in args.experts.split(",")]
    args.methods = args.methods.split(",")
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        results["plot"] = plot(results, Path(args.plot))
    print(markdown_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
