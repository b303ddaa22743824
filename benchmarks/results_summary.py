"""Summarise a study's leaderboard the way docs/results.md compares it with the paper's findings.

    mergebench leaderboard RUN_DIR --format json > lb.json
    python benchmarks/results_summary.py lb.json

Per (size, base kind): the mean over merge methods of normalised held-in and held-out test scores at
each N, the best held-out merge at each N, averaging's held-out at each N, the multitask baseline
(held-in range over N, held-out) and the experts' held-out mean; then which method is best per cell.
Every number is a mean over the seeds the leaderboard row holds.
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path


def fmt(values) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("leaderboard_json")
    rows = json.loads(Path(ap.parse_args().leaderboard_json).read_text())
    cells: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[(r["size"], r["base_kind"])][r["n"]].append(r)

    print("| size | base | seeds | N | merges: held-in | merges: held-out | best held-out merge | averaging held-out"
          " | multitask in / out | experts out |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    best_in, best_out = defaultdict(int), defaultdict(int)
    for (size, base_kind), by_n in sorted(cells.items()):
        ns = sorted(by_n)
        merges = {n: [r for r in by_n[n] if r["kind"] == "merge"] for n in ns}
        mean_in = [sum(r["held_in"]["mean"] for r in merges[n]) / len(merges[n]) for n in ns]
        mean_out = [sum(r["held_out"]["mean"] for r in merges[n]) / len(merges[n]) for n in ns]
        top_out = [max(r["held_out"]["mean"] for r in merges[n]) for n in ns]
        avg_out = [next((r["held_out"]["mean"] for r in merges[n] if r["method"] == "average"), float("nan"))
                   for n in ns]
        multitask = [r for n in ns for r in by_n[n] if r["method"] == "multitask"]
        experts = [r["held_out"]["mean"] for n in ns for r in by_n[n] if r["method"] == "experts"]
        seeds = max(len(r["seeds"]) for n in ns for r in by_n[n])
        mt_in = [r["held_in"]["mean"] for r in multitask]
        print(f"| {size} | {base_kind} | {seeds} | {' / '.join(map(str, ns))} | {fmt(mean_in)} | {fmt(mean_out)} "
              f"| {fmt(top_out)} | {fmt(avg_out)} | {min(mt_in):.2f}-{max(mt_in):.2f} / "
              f"{multitask[0]['held_out']['mean']:.2f} | {sum(experts) / len(experts):.2f} |")
        for n in ns:
            best_in[max(merges[n], key=lambda r: r["held_in"]["mean"])["method"]] += 1
            best_out[max(merges[n], key=lambda r: r["held_out"]["mean"])["method"]] += 1
    print()
    print("best held-in merge per cell:", dict(sorted(best_in.items(), key=lambda kv: -kv[1])))
    print("best held-out merge per cell:", dict(sorted(best_out.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
