"""The benchmarks run (smoke sizes), so they cannot rot, and what they report is checked against the inputs:
the merged outputs they time are the right merges, and sizes, memory and floor figures add up."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, load_dir
from mergekit_ref import needs_mergekit
from mergekit_ref import venv as mergekit_venv


def _benchmark_module(name: str, monkeypatch):
    """A benchmarks/ script imported as a module (it puts benchmarks/ on sys.path for ``models``)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _safetensors_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


# mergekit 0.1.5's merge methods (mergekit.merge_methods.registry), each of which the benchmark must time
MERGEKIT_METHODS = {"linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "arcee_fusion",
                    "passthrough", "ram", "ramplus_tl", "sce", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
# the methods beyond mergekit it times against our ties
BEYOND_METHODS = {"tsv_m", "iso_c", "iso_cts", "regmean", "fisher"}


def _reference_ties(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
                    densities: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES as mergekit 0.1.5 defines it: each task vector keeps its max(1, floor(density x n)) largest
    |entries|, is scaled by its weight; the sign is that of the sum (0 counts as +); the weighted mean
    over agreeing non-zero entries is added to the base. Also returned: the entries whose result the
    maths leaves to conventions: some |tau| equals its expert's threshold (which of equal magnitudes a
    tool keeps), or the weighted sum is 0 in exact arithmetic (the sign then follows float rounding)."""
    b = base.float().reshape(-1)
    n = b.numel()
    trimmed, tied = [], torch.zeros(n, dtype=torch.bool)
    for e, d in zip(experts, densities):
        tau = e.float().reshape(-1) - b
        order = torch.sort(-tau.abs(), stable=True).indices
        k = max(1, int(d * n))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[:k]] = True
        threshold = tau.abs()[order[k - 1]]
        tied |= (tau.abs() == threshold) & (threshold > 0)  # keeping a 0 changes nothing
        trimmed.append(torch.where(keep, tau, torch.zeros_like(tau)))
    w = torch.tensor(weights)[:, None]
    t = torch.stack(trimmed) * w  # float32, as mergekit computes
    sign = torch.where(t.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(t) == sign
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    cancels = ((torch.stack(trimmed).double() * torch.tensor(weights, dtype=torch.float64)[:, None]).sum(0).abs()
               < 1e-12) & (t != 0).any(0)
    return (b + (t * agree).sum(0) / divisor).reshape(base.shape), (tied | cancels).reshape(base.shape)


def _reference_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors (their angle from the normalised copies)."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    theta = torch.arccos((a / a.norm()) @ (b / b.norm()))
    return ((torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)).reshape(v0.shape)


def _polar(a: torch.Tensor) -> torch.Tensor:
    """P Q^T for A = P S Q^T: the orthonormal matrix nearest to A, over A's numerical rank (singular values
    above max(rows, cols) x float32 eps x the largest, mergebench's documented rule; the authors' code keeps
    every column, whose direction is arbitrary where A's columns are dependent)."""
    p, sigma, qh = torch.linalg.svd(a, full_matrices=False)
    keep = sigma > max(a.shape) * torch.finfo(torch.float32).eps * sigma[0]
    return p[:, keep] @ qh[keep]


def _reference_tsv_m(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M (Gargiulo et al., arXiv:2412.00081) in float64, alpha 1, weights 1: each task vector's top
    floor(r / N) singular triplets, U and V concatenated and replaced by their polar factors; 1-D tensors get
    the mean task vector. (These task vectors are full rank: none of their own triplets is dropped.)"""
    b = base.double()
    taus = [e.double() - b for e in experts]
    if b.dim() != 2:
        return b + sum(taus) / len(taus)
    k = min(b.shape) // len(taus)
    us, ss, vs = [], [], []
    for tau in taus:
        u, sigma, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(sigma[:k])
        vs.append(vh[:k].T)
    return b + _polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _polar(torch.cat(vs, 1)).T


def _reference_grams(model_dir: Path, token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """X^T X (float64) of every nn.Linear's inputs over one unpadded batch of the token ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(f"{name}.weight"))
    with torch.no_grad():
        model(input_ids=torch.tensor(token_ids))
    return grams


def _reference_regmean(experts: list[torch.Tensor], grams: list[torch.Tensor] | None, alpha: float) -> torch.Tensor:
    """RegMean (Jin et al., arXiv:2212.09849), weights 1: W* = (sum_i W_i G~_i)(sum_i G~_i)^-1 with
    G~ = alpha G + (1 - alpha) diag(G), solved in float64; tensors without a Gram are the mean."""
    if grams is None:
        return sum(e.double() for e in experts) / len(experts)
    tilde = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    a = sum(tilde)
    b = sum(g @ w.double().T for g, w in zip(tilde, experts))  # in x out
    return torch.linalg.solve(a, b).T


def _assert_bf16_close(got: torch.Tensor, want: torch.Tensor, what, rtol32: float = 0.0, share: float = 1e-3) -> None:
    """``got`` (bf16) is ``want`` rounded to bf16, give or take one step where float32 rounding decides it.
    ``rtol32``: the float32 error of the computation relative to the tensor's largest entry (SVDs and solves
    make some; it matters only where the result nearly cancels), and ``share`` of entries may round the other way."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape, what
    g, w = got.float(), want.float()
    atol = max(1e-8, rtol32 * float(w.abs().max()))  # 1e-8: float32 residue of cancellation
    assert ((g - w).abs() <= w.abs() * 2.0**-7 + atol).all(), (what, (g - w).abs().max())
    assert (g != w.bfloat16().float()).float().mean() < share, what


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

    # every mergekit method, and every one beyond it, is timed or listed as skipped with a reason, and --quick's
    # skipped configs are planned by mergebench (every tensor's parameters resolved)
    timed = [r["method"] for r in results["rows"]]
    skipped = {s["method"]: s["reason"] for s in results["skipped"]}
    assert set(bench.MERGEKIT) == MERGEKIT_METHODS and set(bench.BEYOND) == BEYOND_METHODS
    assert set(timed) | set(skipped) == MERGEKIT_METHODS | BEYOND_METHODS and not set(timed) & set(skipped)
    assert all(reason.strip() for reason in skipped.values())
    assert results["configs_checked"] == {m: "accepted" for m in skipped}
    errors = {r["method"]: r["mergebench"]["error"] for r in results["rows"] if "error" in r["mergebench"]}
    assert not errors
    assert timed == ["linear", "slerp", "passthrough", "ties", "dare_ties", "tsv_m", "regmean"] and len(outputs) == 7

    # what was merged: base + 2 experts of the smoke shape, all bf16
    shape = bench.SIZES["smoke"]
    models = {name: work / "models" / "smoke" / name for name in ("base", "expert0", "expert1")}
    base, e0, e1 = (load_dir(models[n]) for n in ("base", "expert0", "expert1"))
    assert sorted(base) == sorted(name for name, _ in shape.tensors())
    assert sum(t.numel() for t in base.values()) == shape.params
    merged = {method: tensors for method, (tensors, _) in zip(timed, outputs)}
    output_bytes = {method: size for method, (_, size) in zip(timed, outputs)}

    # each config means what the benchmark says: weights 0.6 / 0.4, densities 0.5 / 0.3, mergekit's slerp t
    for name, b in base.items():
        _assert_bf16_close(merged["linear"][name], 0.6 * e0[name].float() + 0.4 * e1[name].float(), ("linear", name))
        want, open_ = _reference_ties(b, [e0[name], e1[name]], [0.6, 0.4], [0.5, 0.3])
        assert open_.float().mean() < 0.05  # bf16 inputs make ties and cancellations; most entries have neither
        _assert_bf16_close(merged["ties"][name][~open_], want[~open_], ("ties", name))
    layers = shape.layers
    for layer, (attn, mlp) in {0: (base, e0), layers - 1: (e0, base)}.items():  # t = 0 / 1 at the ends
        for name in base:
            if name.startswith(f"model.layers.{layer}."):
                want = attn if "self_attn" in name else mlp if "mlp" in name else None
                if want is not None:
                    assert torch.equal(merged["slerp"][name], want[name]), ("slerp", name)
    head = merged["slerp"]["lm_head.weight"].float()  # t = 0.5 outside the layers: slerp, not lerp
    arc = _reference_slerp(base["lm_head.weight"].float(), e0["lm_head.weight"].float(), 0.5)
    lerp = (base["lm_head.weight"].float() + e0["lm_head.weight"].float()) / 2
    _assert_bf16_close(head.bfloat16(), arc.float(), "slerp lm_head")
    # the two differ by ~0.25% in norm (cos of half the angle); the output's norm is good to ~1e-5
    assert abs(head.norm() / arc.norm() - 1) < 3e-4 and abs(head.norm() / lerp.norm() - 1) > 1e-3
    # passthrough: expert0's layers 0..1, then expert1's 0..1; embedding from the first, head from the last
    stacked = merged["passthrough"]
    assert len([n for n in stacked if n.endswith("mlp.up_proj.weight")]) == 4
    for name, t in stacked.items():
        layer = re.search(r"layers\.(\d+)\.", name)
        if layer is None:
            src, src_name = (e0 if "embed" in name else e1), name
        else:
            i = int(layer.group(1))
            src, src_name = (e0, name) if i < 2 else (e1, name.replace(f"layers.{i}.", f"layers.{i - 2}."))
        assert torch.equal(t, src[src_name]), ("passthrough", name)
    dare = mergebench.merge("dare_ties", base=models["base"], experts=[models["expert0"], models["expert1"]],
                            weights=[0.6, 0.4], expert_params=[{"density": 0.5}, {"density": 0.3}], normalize=False,
                            rescale="l1", zero_sum_sign="positive", seed=0, output=tmp_path / "dare-ref")
    want_dare = load_dir(dare.output)
    assert sorted(merged["dare_ties"]) == sorted(want_dare)
    assert all(torch.equal(merged["dare_ties"][n], want_dare[n]) for n in want_dare)

    # the figures
    input_bytes = [_safetensors_bytes(models[n]) for n in ("base", "expert0", "expert1")]
    tensor_bytes = 2 * shape.params
    assert all(tensor_bytes < b < tensor_bytes + 64 * 1024 for b in input_bytes)  # bf16 data + headers
    floor = results["floor"]["smoke/base + 2"]
    assert floor["input_bytes"] == sum(input_bytes)
    assert floor["seconds"] == pytest.approx(floor["read_seconds"] + floor["write_seconds"])
    assert results["floor"]["smoke/2"]["input_bytes"] == sum(input_bytes[1:])  # linear reads no base
    overhead = results["overhead"]["bytes"]
    assert 50 * 2**20 < overhead < 2**30  # an interpreter with torch and mergebench, nothing large
    for row in results["rows"]:
        method, mb = row["method"], row["mergebench"]
        k = {"slerp": 1}.get(method, 2)
        assert (row["size"], row["experts"], row["params"]) == ("smoke", k, shape.params)
        if "merge_method" in row["config"]:  # a mergekit config; regmean's is our recipe (calibration data)
            assert row["config"]["dtype"] == "float32" and row["config"]["out_dtype"] == "bfloat16"
        else:
            assert row["config"]["dtype"] == "bfloat16" and row["config"]["calibration"]["data"] == "calibration.jsonl"
        assert row["output_bytes"] == output_bytes[method]  # the weights it wrote, not the card or config
        layers_out = 2 if method == "passthrough" else 1  # the frankenmerge stacks twice the layers
        layer_bytes = 2 * sum(math.prod(s) for n, s in shape.tensors() if ".layers." in n)
        want_bytes = tensor_bytes + (layers_out - 1) * layer_bytes
        assert want_bytes < row["output_bytes"] < want_bytes + 64 * 1024
        assert mb["runs_seconds"] == [round(mb["seconds"], 3)]  # --quick: one timed run, and it is the median
        assert 0 < mb["in_process_seconds"] <= mb["seconds"] and row["mergebench_first_seconds"] is None
        assert row["floor_multiple"] == pytest.approx(mb["seconds"] / results["floor"][row["floor"]]["seconds"])
        # peaks of one series of samples: the total's peak is above either part's (both are never 0 while
        # the process runs) and at most their sum
        assert max(mb["peak_anon_bytes"], mb["peak_file_bytes"]) < mb["peak_bytes"]
        assert mb["peak_bytes"] <= mb["peak_anon_bytes"] + mb["peak_file_bytes"]
        bound = row["memory_bound"]
        # the largest tensor: 2048 x 128 float32; regmean also holds each expert's largest Gram (down_proj's
        # inputs: 512 x 512 float32)
        grams = 2 * 4 * 512 * 512 if method == "regmean" else 0
        assert bound["bytes"] == (k + 2) * 4 * 2048 * 128 + overhead + grams
        assert bound["within"] == (mb["peak_anon_bytes"] <= bound["bytes"])
        assert mb["peak_anon_bytes"] < 2 * bound["bytes"]
        assert f"| smoke | {row['inputs']} | {method} | {mb['seconds']:.2f} (" in stdout
    assert not (work / "out-mergebench").exists()

    # beyond mergekit: not run there, and timed as a multiple of our ties at the same (size, N)
    rows = {r["method"]: r for r in results["rows"]}
    ties_seconds = rows["ties"]["mergebench"]["seconds"]
    for method in ("tsv_m", "regmean"):
        row = rows[method]
        assert row["in_mergekit"] is False and "mergekit" not in row and "speedup" not in row
        assert row["vs_ties"]["ratio"] == pytest.approx(row["mergebench"]["seconds"] / ties_seconds)
        assert row["vs_ties"]["ratio_in_process"] == pytest.approx(
            row["mergebench"]["in_process_seconds"] / rows["ties"]["mergebench"]["in_process_seconds"])
        line = next(x for x in stdout.splitlines() if x.startswith(f"| smoke | {row['inputs']} | {method} | "))
        assert line.count("n/a: not in mergekit") == 4 and f"| {row['vs_ties']['ratio']:.2f}x (" in line
        assert f"| smoke | {method} | {row['inputs']} | " in stdout  # the beyond-mergekit table
    assert all("vs_ties" not in r for r in results["rows"] if r["in_mergekit"])

    # tsv_m is TSV-M of these inputs (float64 reference, weights and alpha 1)
    for name, b in base.items():
        _assert_bf16_close(merged["tsv_m"][name], _reference_tsv_m(b, [e0[name], e1[name]]), ("tsv_m", name),
                           rtol32=1e-5, share=1e-2)
    head_sum = base["lm_head.weight"].float() + sum(e["lm_head.weight"].float() - base["lm_head.weight"].float()
                                                    for e in (e0, e1))
    assert ((merged["tsv_m"]["lm_head.weight"].float() - head_sum).abs() > 1e-4).float().mean() > 0.5  # not the sum

    # regmean: the statistics pass was probed cold, once per expert, over the calibration data the recipe names
    # (16 texts of 64 words; word w<i> is token i); the probe's Grams are X^T X of each linear layer's inputs
    # on that data, and the merges read them from the cache (none computed again)
    data = work / "models" / "smoke" / results["calibration"]["smoke"]["data"]
    token_ids = [[int(w[1:]) for w in json.loads(line)["text"].split()] for line in data.read_text().splitlines()]
    assert len(token_ids) == 16 and {len(t) for t in token_ids} == {64}
    probe = results["statistics"]["smoke/gram"]
    assert probe["experts_probed"] == 2 and probe["all_computed"] is True
    for e in probe["experts"]:
        assert (e["forward"]["examples"], e["forward"]["tokens"]) == (16, 16 * 64)
        assert e["statistics"]["seconds"] > 0 and e["forward"]["forward_seconds"] > 0
        assert e["forward"]["start_anon_bytes"] <= e["forward"]["peak_anon_bytes"] <= probe["process"]["peak_anon_bytes"]
    ratios = [e["statistics"]["seconds"] / e["forward"]["seconds"] for e in probe["experts"]]
    assert probe["ratio"] == pytest.approx(sum(ratios) / 2)  # the median of two
    cache = work / "mergebench-home" / "artifacts" / "calibration"
    entries = sorted(d.name for d in cache.iterdir() if (d / "mergebench-artifact.json").is_file())
    assert entries == sorted(e["statistics"]["entry"] for e in probe["experts"])  # 2: the merges added none
    assert rows["regmean"]["statistics"] == {"probe": "smoke/gram", "cache_entries_added": 0, "cached": True,
                                             "one_layer_bytes": 2 * 4 * 512 * 512}
    from mergebench.core.calibration import Statistics

    linear = [n for n, s in shape.tensors() if len(s) == 2 and "embed" not in n]
    reference_grams = []
    for i, e in enumerate(probe["experts"]):
        stored = Statistics(cache / e["statistics"]["entry"] / "statistics.safetensors")
        ours = _reference_grams(models[f"expert{i}"], token_ids)
        assert sorted(stored.names()) == sorted(ours) == sorted(linear)
        for name, g in ours.items():
            got = stored.get(name).matrix.double()
            torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
        reference_grams.append(ours)
    for name, b in base.items():
        grams = [g[name] for g in reference_grams] if name in linear else None
        want = _reference_regmean([e0[name], e1[name]], grams, alpha=0.9)
        _assert_bf16_close(merged["regmean"][name], want, ("regmean", name), rtol32=1e-5, share=1e-2)
        if grams is not None:  # the regression moves the weights away from the plain mean
            mean = (e0[name].double() + e1[name].double()) / 2
            assert ((want - mean).abs() > mean.abs() * 2.0**-7).float().mean() > 0.1, name
    line = next(x for x in stdout.splitlines() if x.startswith("| smoke | regmean (gram) | 2 | 1024 | "))
    assert f"| {probe['ratio']:.2f}x (" in line

    # the thread check compares three real dare_ties merges (seed 7), equal to the engine's own
    threads = results["threads"][0]
    assert threads["identical"] is True and len(set(threads["digests"].values())) == 1 and len(thread_outputs) == 3
    seven = mergebench.merge("dare_ties", base=models["base"], experts=[models["expert0"], models["expert1"]],
                             weights=[0.6, 0.4], expert_params=[{"density": 0.5}, {"density": 0.3}], normalize=False,
                             rescale="l1", zero_sum_sign="positive", seed=7, output=tmp_path / "seven")
    want = load_dir(seven.output)
    assert all(sorted(t) == sorted(want) and all(torch.equal(t[n], want[n]) for n in want) for t in thread_outputs)
    assert any(not torch.equal(want[n], want_dare[n]) for n in want)  # another seed, another merge


_PLAN = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import _model_out_config, get_architecture_info
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

for path in sys.argv[1:]:
    try:  # validate, then plan every tensor: the method's input contract and parameters are checked here
        config = MergeConfiguration.model_validate(yaml.safe_load(open(path)))
        arch = get_architecture_info(config, MergeOptions())
        tasks = MergePlanner(config, arch, options=MergeOptions(),
                             out_model_config=_model_out_config(config, arch)).plan_to_disk(out_path=path + ".out")
        print(path, "ok", len(tasks))
    except Exception as e:
        print(path, "ERROR", type(e).__name__, str(e).splitlines()[0][:300])
"""


@needs_mergekit
def test_merge_speed_configs_are_planned_by_mergekit(tmp_path, monkeypatch):
    """Every config the benchmark times (N = 2 and 8) is one mergekit 0.1.5 plans, as the full run will ask."""
    bench = _benchmark_module("merge_speed", monkeypatch)
    models = bench.build(tmp_path / "models", "smoke", 8)
    paths = []
    for n in (2, 8):
        for b in (b for b in bench.METHODS if b.mergekit):
            path = tmp_path / f"{b.name}-{n}.yml"
            path.write_text(yaml.safe_dump(bench.config_for(b, models, n, bench.SIZES["smoke"].layers)))
            paths.append(path)
    script = tmp_path / "plan.py"
    script.write_text(_PLAN)
    done = subprocess.run([str(mergekit_venv() / "bin" / "python"), str(script), *map(str, paths)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    verdicts = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(str(tmp_path)))
    assert len(verdicts) == len(paths), done.stderr[-2000:]
    assert all(v.startswith("ok") for v in verdicts.values()), {k: v for k, v in verdicts.items() if not v.startswith("ok")}


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


@pytest.mark.parametrize("n", [1, 255, 256, 257, 768, 2048])
def test_gram_floor_counts_the_entries_the_gram_pass_computes(monkeypatch, n):
    """benchmarks/gram_floor.py's count of a blocked Gram's entries is what ``_add_lower_gram_`` writes, and its
    floor is (forward without the head + Gram products) / forward, counted by hand for a small shape."""
    from mergebench.core import calibration

    floor = _benchmark_module("gram_floor", monkeypatch)
    acc = torch.zeros(n, n)
    calibration._add_lower_gram_(acc, torch.ones(1, n))
    assert floor.blocked(n) == int((acc != 0).sum())
    # d = 4, f = 8, 2 layers, V = 10, kv 2, untied; blocks of 256: each Gram whole (n^2)
    got = floor.floor(floor.Shape(4, 8, 2, 10, 2))
    body = 2 * (2 * 16 + 2 * 8 + 3 * 32)
    grams = 2 * (3 * 16 + 64) + 16
    assert got["forward"] == body + 40 and got["gram_blocks"] == grams
    assert got["gram_half"] == 2 * (3 * 10 + 36) + 10
    assert got["floor_blocks"] == pytest.approx((body + grams) / (body + 40))
    assert floor.floor(floor.Shape(4, 8, 2, 10, 2, tied=True))["gram_blocks"] == grams - 16
