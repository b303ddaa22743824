"""The benchmarks run (smoke sizes), so they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_merge_speed_quick_runs_and_reports(tmp_path):
    out = tmp_path / "quick.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "merge_speed.py"), "--quick", "--no-mergekit",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"average", "task_arithmetic", "ties", "dare_ties"}
    for row in rows.values():
        assert row["mergebench"]["seconds"] > 0 and row["mergebench"]["peak_bytes"] > 0
        assert row["output_bytes"] > 0.9 * 2 * 1.0e6  # ~1M bf16 parameters
    assert results["floor"]["smoke/2"]["input_bytes"] > 3 * 2.0e6
    assert results["threads"][0]["identical"] is True
    assert "| smoke | 2 | ties |" in done.stdout


def test_results_summary_averages_methods_and_counts_best_cells(tmp_path):
    def row(n, method, kind, held_in, held_out):
        stat = lambda v: {"mean": v, "std": 0.0, "n": 2}  # noqa: E731
        return {"size": "tiny", "base_kind": "pretrained", "n": n, "method": method, "kind": kind,
                "held_in": stat(held_in), "held_out": stat(held_out), "seeds": [0, 1], "params": [{}]}

    rows = [row(2, "average", "merge", 0.9, 0.8), row(2, "ties", "merge", 0.7, 0.6),
            row(2, "multitask", "baseline", 1.1, 0.5), row(2, "experts", "baseline", 1.0, 0.4),
            row(4, "average", "merge", 0.5, 0.7), row(4, "ties", "merge", 0.6, 0.9),
            row(4, "multitask", "baseline", 0.95, 0.5), row(4, "experts", "baseline", 1.0, 0.6)]
    path = tmp_path / "lb.json"
    path.write_text(json.dumps(rows))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "results_summary.py"), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # held-in means (0.9+0.7)/2, (0.5+0.6)/2; held-out (0.8+0.6)/2, (0.7+0.9)/2; best 0.8, 0.9; averaging 0.8, 0.7
    assert ("| tiny | pretrained | 2 | 2 / 4 | 0.80 / 0.55 | 0.70 / 0.80 | 0.80 / 0.90 | 0.80 / 0.70 "
            "| 0.95-1.10 / 0.50 | 0.50 |") in done.stdout
    assert "best held-in merge per cell: {'average': 1, 'ties': 1}" in done.stdout
    assert "best held-out merge per cell: {'average': 1, 'ties': 1}" in done.stdout


def test_eval_speed_benchmark_times_a_model_on_a_small_suite(tmp_path):
    from mergebench.training import llama_config, train_tokenizer
    from transformers import LlamaForCausalLM

    tok = train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 50, tmp_path / "tok", vocab_size=300)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(llama_config("tiny", len(tok))).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_speed.py"), str(model_dir), "--threads", "1",
                           "--repeats", "2", "--suite-param", "train=20", "--suite-param", "validation=4",
                           "--suite-param", "test=6"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MERGEBENCH_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 1 | " in done.stdout
    # 8 held-in x 6 + 3 held-out x 12 + coreference 24
    assert "12 datasets, 108 test examples" in done.stdout
