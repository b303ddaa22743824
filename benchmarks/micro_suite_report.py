"""Check the micro suite's requirements on one seed and print them as a Markdown table.

    mergebench eval BASE IT E1..E8 --base BASE --expert CATEGORY=E1 ... --seed S --json > eval.json
    python benchmarks/micro_suite_report.py eval.json --it IT_PATH

Requirements (issue 4): each expert beats the base on its own category by a wide margin; no held-in
task is at 1.0 for every model; every held-out task is above chance for the base by more than 3
standard errors and below ceiling; the instruction-tuned base beats the base zero-shot on held-out.
"""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("eval_json")
    ap.add_argument("--it", required=True, help="path of the instruction-tuned base in the eval")
    args = ap.parse_args()
    report = json.loads(Path(args.eval_json).read_text())
    scores = report["scores"]
    suite_dir = subprocess.run([sys.executable, "-m", "mergebench", "suite", "build", report["suite"], "--seed",
                                str(report["seed"])], capture_output=True, text=True, check=True).stdout.strip()
    manifest = json.loads((Path(suite_dir) / "suite.json").read_text())
    normalised = report["normalised"]
    base = report["base"]
    expert_of = report["experts"]  # category -> path
    print(f"seed {report['seed']}, split {report['split']}")
    print("| task | chance | base | IT base | own expert | best other model | check |")
    print("|---|---|---|---|---|---|---|")
    ok_all = True
    for group in ("held_in", "held_out"):
        for category, datasets in manifest[group].items():
            for name, info in datasets.items():
                rows = [json.loads(line) for line in open(Path(suite_dir) / f"{name}.test.jsonl")]
                chance = sum(1 / len(r["choices"]) for r in rows) / len(rows) if "choices" in rows[0] else 0.0
                b, it = scores[base][name], scores[args.it][name]
                if group == "held_in":
                    expert = expert_of[category]
                    e = scores[expert][name]
                    others = max(scores[m][name] for m in scores if m != expert)
                    saturated = all(scores[m][name] >= 1.0 for m in scores)
                    ok = e >= b + 0.1 and not saturated
                    check = f"expert - base = {e - b:+.3f}" + ("; saturated" if saturated else "")
                    print(f"| {name} | {chance:.2f} | {b:.3f} | {it:.3f} | {e:.3f} | {others:.3f} | {'ok' if ok else 'FAIL'}: {check} |")
                else:
                    se = math.sqrt(max(b * (1 - b), 1e-9) / len(rows))
                    z = (b - chance) / se
                    ok = z > 3 and b < 0.98
                    print(f"| {name} | {chance:.2f} | {b:.3f} | {it:.3f} | - | - | {'ok' if ok else 'FAIL'}: "
                          f"{z:.1f} SE above chance (n={len(rows)}) |")
                ok_all &= ok
    it_norm = normalised[args.it]["held_out"]
    print(f"\nIT base normalised held-out (IT / base, zero-shot): {it_norm:.3f} "
          f"({'beats' if it_norm > 1 else 'does not beat'} the base)")
    print("all task checks:", "ok" if ok_all else "FAIL")


if __name__ == "__main__":
    main()
