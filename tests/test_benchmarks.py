"""The benchmarks run (smoke sizes), so they cannot rot, and what they report is checked against the inputs:
the merged outputs they time are the right merges, and sizes, memory and floor figures add up."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_dir


def _benchmark_module(name: str, monkeypatch):
    """A benchmarks/ script imported as a module (it puts benchmarks/ on sys.path for ``models``)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _safetensors_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def _reference_ties(base: torch.Tensor, experts: list[torch.Tensor], density: float, lam: float) -> torch.Tensor:
    """TIES from the definition: per-tensor top-k of |tau| (k rounded half up, ties to the lower index),
    sign elected by the sum of trimmed task vectors, mean over the agreeing non-zero entries."""
    b = base.float().reshape(-1)
    n = b.numel()
    k = int(density * n + 0.5)
    trimmed = []
    for e in experts:
        tau = e.float().reshape(-1) - b
        order = torch.sort(-tau.abs(), stable=True).indices
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[:k]] = True
        trimmed.append(torch.where(keep, tau, torch.zeros_like(tau)))
    t = torch.stack(trimmed)
    sign = torch.sign(t.sum(0))
    agree = (t != 0) & (torch.sign(t) == sign)
    count = agree.sum(0)
    mean = torch.where(count > 0, (t * agree).sum(0) / count.clamp(min=1), torch.zeros_like(b))
    return (b + lam * mean).reshape(base.shape)


def test_merge_speed_quick_times_the_right_merges_and_reports_consistent_figures(tmp_path, monkeypatch, capsys):
    import mergebench

    bench = _benchmark_module("merge_speed", monkeypatch)
    outputs: list[tuple[dict[str, torch.Tensor], int]] = []  # each method's output (tensors, bytes), when sized
    thread_outputs: list[dict[str, torch.Tensor]] = []
    dir_bytes, digest = bench.dir_bytes, bench._digest

    def sizing(d):
        if Path(d).name == "out-mergebench":
            outputs.append((load_dir(Path(d)), _safetensors_bytes(d)))
        return dir_bytes(d)

    def hashing(d):
        thread_outputs.append(load_dir(Path(d)))
        return digest(d)

    monkeypatch.setattr(bench, "dir_bytes", sizing)
    monkeypatch.setattr(bench, "_digest", hashing)
    out = tmp_path / "quick.json"
    work = tmp_path / "work"
    assert bench.main(["--quick", "--no-mergekit", "--workdir", str(work), "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    results = json.loads(out.read_text())

    # what was merged: base + 2 experts of the smoke shape, all bf16
    shape = bench.SIZES["smoke"]
    models = {name: work / "models" / "smoke" / name for name in ("base", "expert0", "expert1")}
    base, e0, e1 = (load_dir(models[n]) for n in ("base", "expert0", "expert1"))
    assert sorted(base) == sorted(name for name, _ in shape.tensors())
    assert sum(t.numel() for t in base.values()) == shape.params

    methods = [r["method"] for r in results["rows"]]
    assert methods == ["average", "task_arithmetic", "ties", "dare_ties"] and len(outputs) == 4
    merged = {method: tensors for method, (tensors, _) in zip(methods, outputs)}
    output_bytes = {method: size for method, (_, size) in zip(methods, outputs)}
    dare = mergebench.merge("dare_ties", base=models["base"], experts=[models["expert0"], models["expert1"]],
                            density=0.2, lambda_=1.0, seed=0, output=tmp_path / "dare-ref")
    want_dare = load_dir(dare.output)
    for name, b in base.items():
        ref = {"average": ((e0[name].float() + e1[name].float()) / 2).bfloat16(),
               "task_arithmetic": (b.float() + ((e0[name].float() - b.float()) + (e1[name].float() - b.float()))
                                   ).bfloat16(),
               "ties": _reference_ties(b, [e0[name], e1[name]], 0.2, 1.0).bfloat16(),
               "dare_ties": want_dare[name]}
        for method, want in ref.items():
            got = merged[method][name]
            assert got.dtype == torch.bfloat16 and got.shape == b.shape, (method, name)
            assert torch.equal(got, want), (method, name, (got.float() - want.float()).abs().max())
    assert not torch.equal(merged["ties"]["lm_head.weight"], merged["average"]["lm_head.weight"])

    input_bytes = [_safetensors_bytes(models[n]) for n in ("base", "expert0", "expert1")]
    tensor_bytes = 2 * shape.params
    assert all(tensor_bytes < b < tensor_bytes + 64 * 1024 for b in input_bytes)  # bf16 data + headers
    floor = results["floor"]["smoke/2"]
    assert floor["input_bytes"] == sum(input_bytes)
    assert floor["seconds"] == pytest.approx(floor["read_seconds"] + floor["write_seconds"])
    rows = {r["method"]: r for r in results["rows"]}
    for method, row in rows.items():
        mb = row["mergebench"]
        assert (row["size"], row["experts"], row["params"]) == ("smoke", 2, shape.params)
        assert row["output_bytes"] == output_bytes[method]  # the weights it wrote, not the card or config
        assert tensor_bytes < row["output_bytes"] < tensor_bytes + 64 * 1024  # the same tensors as one base
        assert mb["runs_seconds"] == [round(mb["seconds"], 3)]  # --quick: one timed run, and it is the median
        assert 0 < mb["in_process_seconds"] <= mb["seconds"] and row["mergebench_first_seconds"] > 0
        assert row["floor_multiple"] == pytest.approx(mb["seconds"] / floor["seconds"])
        # peaks of one series of samples: the total's peak is above either part's (both are never 0 while
        # the process runs) and at most their sum
        assert max(mb["peak_anon_bytes"], mb["peak_file_bytes"]) < mb["peak_bytes"]
        assert mb["peak_bytes"] <= mb["peak_anon_bytes"] + mb["peak_file_bytes"]
        assert mb["peak_bytes"] < 4 * 2**30  # an interpreter with torch, not a copy of anything large
        assert f"| smoke | 2 | {method} | {mb['seconds']:.2f} (" in stdout
    assert not (work / "out-mergebench").exists()

    # the thread check compares three real dare_ties merges (seed 7), equal to the engine's own
    threads = results["threads"][0]
    assert threads["identical"] is True and len(set(threads["digests"].values())) == 1 and len(thread_outputs) == 3
    seven = mergebench.merge("dare_ties", base=models["base"], experts=[models["expert0"], models["expert1"]],
                             density=0.2, lambda_=1.0, seed=7, output=tmp_path / "seven")
    want = load_dir(seven.output)
    assert all(sorted(t) == sorted(want) and all(torch.equal(t[n], want[n]) for n in want) for t in thread_outputs)
    assert any(not torch.equal(want[n], want_dare[n]) for n in want)  # another seed, another merge


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
    row = re.search(r"^\| 1 \| ([\d.]+) s \| ([\d.]+) s \| ([\d.]+) s \|$", done.stdout, re.M)
    assert row and all(float(x) > 0 for x in row.groups()), done.stdout
    # 8 held-in x 6 + 3 held-out x 12 + coreference 24
    assert "12 datasets, 108 test examples, batch size 64" in done.stdout
    # the suite it evaluated is the one it built, with those sizes
    built = list((tmp_path / "home").rglob("suite.json"))
    assert len(built) == 1
    files = json.loads(built[0].read_text())["files"]
    counted = {name: sum(1 for _ in open(built[0].parent / Path(splits["test"]).name))
               for name, splits in files.items() if "test" in splits}
    assert len(counted) == 12 and sum(counted.values()) == 108
    assert sorted(set(counted.values())) == [6, 12, 24]
