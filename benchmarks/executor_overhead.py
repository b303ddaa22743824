"""The Ray executor's overhead over the local one: the same study run with each, from empty caches.

    python benchmarks/executor_overhead.py [CONFIG] [--repeats 1] [--json out.json]

With no CONFIG: the default study (`mergebench run`). Each run gets its own empty MERGEBENCH_HOME and run
directory, so neither reuses the other's artefacts; both use the config's `workers` (the local pool's
processes; the Ray cluster's CPUs). Prints wall time per executor, the overhead in percent, and whether
the two leaderboards are identical.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(config: str | None, executor: str, root: Path) -> tuple[float, list]:
    home, run_dir = root / f"home-{executor}", root / f"run-{executor}"
    env = {**os.environ, "MERGEBENCH_HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "mergebench", "run", *([config] if config else []), "--run-dir", str(run_dir),
           "--executor", executor, "--no-leaderboard"]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{executor} run failed:\n{done.stderr[-3000:]}")
    board = subprocess.run([sys.executable, "-m", "mergebench", "leaderboard", str(run_dir), "--format", "json"],
                           env=env, capture_output=True, text=True, check=True)
    rows = [{k: r[k] for k in ("key", "held_in", "held_out", "params")} for r in json.loads(board.stdout)]
    return seconds, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"local": [], "ray": []}
    same = True
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="mb-executors-") as tmp:
            local, local_rows = run(args.config, "local", Path(tmp))
            ray, ray_rows = run(args.config, "ray", Path(tmp))
            times["local"].append(local)
            times["ray"].append(ray)
            same &= local_rows == ray_rows
    best = {k: min(v) for k, v in times.items()}
    overhead = 100 * (best["ray"] - best["local"]) / best["local"]
    print("| executor | wall time (best of %d) |" % args.repeats)
    print("|---|---|")
    for k in ("local", "ray"):
        print(f"| {k} | {best[k]:.1f} s |")
    print(f"\nRay overhead: {overhead:+.1f}%; leaderboards identical: {same}")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "overhead_percent": overhead, "identical": same}, indent=2))


if __name__ == "__main__":
    main()
