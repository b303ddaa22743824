"""model_stock, sce, ram, ramplus_tl and arcee_fusion: against mergekit 0.1.5 on tiny float32 Llamas (in memory and
through the streaming engine), and against cases computed by hand.

mergekit runs once for the whole module (``mergekit-multi``, one process for every recipe) on three families:
``dense`` (every entry moved by ~0.1), ``tiny`` (moves of ~1e-4, where mergekit's absolute floors in
model_stock's cosine and sce's coefficients take effect) and ``sparse`` (each expert moves 40% of the entries,
the rest by less than RAM's epsilon, so entries are unique, shared or unchanged).
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit_ref import llama_family, llama_tensors, needs_mergekit, read_model, run_mergekit_many, venv, write_llama
from safetensors.torch import save_file

from mergebench.core import in_memory
from mergebench.core.analysis import run_analysis
from mergebench.core.api import merge as engine_merge
from mergebench.core.context import TensorContext
from mergebench.core.errors import ParameterError
from mergebench.core.plugin_manager import make_plugin_manager
from mergebench.plugins import arcee_fusion as arcee_module
from mergebench.plugins.arcee_fusion import importance, outlier_threshold
from mergebench.core.merge_ops import ordered_sum
from mergebench.plugins import sce as sce_module
from mergebench.plugins.ram import OverlapCounts

N_EXPERTS = 3
# name: (family, method, parameters as in the mergekit config, number of experts)
RECIPES = {
    "model_stock": ("dense", "model_stock", {}, N_EXPERTS),
    "model_stock_filter_wise": ("dense", "model_stock", {"filter_wise": True}, N_EXPERTS),
    "model_stock_filter_wise_tiny": ("tiny", "model_stock", {"filter_wise": True}, N_EXPERTS),
    "sce_top_half": ("dense", "sce", {"select_topk": 0.5}, N_EXPERTS),
    "sce_tiny": ("tiny", "sce", {}, N_EXPERTS),
    "sce_sparse": ("sparse", "sce", {"select_topk": 0.3}, N_EXPERTS),
    "ram_sparse": ("sparse", "ram", {}, N_EXPERTS),
    "ram_tiny": ("tiny", "ram", {}, N_EXPERTS),
    "ramplus_tl_sparse": ("sparse", "ramplus_tl", {}, N_EXPERTS),
    "ramplus_tl_strong": ("sparse", "ramplus_tl", {"r": 0.5, "alpha": 1.0}, N_EXPERTS),
    "arcee_fusion": ("dense", "arcee_fusion", {}, 1),
}
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def methods():
    return make_plugin_manager(entry_points=False).merge_methods()


def sparse_family(root: Path) -> dict[str, Path]:
    """Each expert moves a random 40% of the entries by ~0.1 and the others by ~3e-6 (below epsilon = 1e-5)."""
    base = llama_tensors(0)
    paths = {"base": write_llama(root / "base", base)}
    for k in range(N_EXPERTS):
        big, small = llama_tensors(200 + k, scale=0.1), llama_tensors(300 + k, scale=3e-6)
        g = torch.Generator().manual_seed(400 + k)
        moved = {n: torch.where(torch.rand(t.shape, generator=g) < 0.4, big[n], small[n]) for n, t in base.items()}
        paths[f"e{k}"] = write_llama(root / f"e{k}", {n: t + moved[n] for n, t in base.items()})
    return paths


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"dense": llama_family(root / "dense", N_EXPERTS, scale=0.1),
            "tiny": llama_family(root / "tiny", N_EXPERTS, scale=1e-4),
            "sparse": sparse_family(root / "sparse")}


@pytest.fixture(scope="module")
def state_dicts(families):
    return {f: {k: read_model(p) for k, p in paths.items()} for f, paths in families.items()}


@pytest.fixture(scope="module")
def mergekit_out(families, tmp_path_factory):
    configs = {}
    for name, (family, method, params, n) in RECIPES.items():
        paths = families[family]
        configs[name] = {"merge_method": method, "base_model": str(paths["base"]),
                         "models": [{"model": str(paths[f"e{k}"])} for k in range(n)],
                         "parameters": params, "dtype": "float32"}
    return run_mergekit_many(configs, tmp_path_factory.mktemp("mergekit"), strict=True)


def assert_state_dicts_close(ours, ref, what):
    assert set(ours) == set(ref), what
    for n in ref:
        torch.testing.assert_close(ours[n].float(), ref[n].float(), rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{what}, {n}: {m}")


def mergekit_params(method, params):
    return {**method.mergekit_defaults, **params}


# ---- against mergekit 0.1.5 -------------------------------------------------------------------------------------

@needs_mergekit
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_in_memory_and_engine_match_mergekit(recipe, methods, families, state_dicts, mergekit_out, tmp_path):
    family, name, params, n = RECIPES[recipe]
    method = methods.get(name)
    sds = state_dicts[family]
    ours = in_memory.merge(method, mergekit_params(method, params), sds["base"], [sds[f"e{k}"] for k in range(n)])
    assert_state_dicts_close(ours, mergekit_out[recipe], f"{recipe} in memory")
    paths = families[family]
    engine_merge(name, base=paths["base"], experts=[paths[f"e{k}"] for k in range(n)], output=tmp_path / "out",
                 **mergekit_params(method, params))
    assert_state_dicts_close(read_model(tmp_path / "out"), mergekit_out[recipe], f"{recipe} engine")


@needs_mergekit
@pytest.mark.parametrize("recipe, convention", [("model_stock_filter_wise_tiny", "norm_floor"),
                                                ("sce_tiny", "uniform_below")])
def test_mergekit_floors_change_tiny_updates(recipe, convention, methods, state_dicts, mergekit_out):
    """On updates of ~1e-4 mergekit's absolute floors change the numbers: the paper's default must differ from
    mergekit (and the mergekit default above must restore agreement), else the parameter would be pointless."""
    family, name, params, n = RECIPES[recipe]
    method = methods.get(name)
    sds = state_dicts[family]
    paper = in_memory.merge(method, {**params, convention: method.param(convention).default}, sds["base"],
                            [sds[f"e{k}"] for k in range(n)])
    ref = mergekit_out[recipe]
    differing = [t for t in ref if not torch.allclose(paper[t].float(), ref[t], rtol=RTOL, atol=ATOL)]
    assert len(differing) > len(ref) // 2


@needs_mergekit
def test_sparse_family_has_unique_shared_and_unchanged_entries(state_dicts):
    """The RAM comparisons above are only meaningful if every kind of entry occurs."""
    sds = state_dicts["sparse"]
    name = "model.layers.0.mlp.up_proj.weight"
    active = torch.stack([(sds[f"e{k}"][name] - sds["base"][name]).abs() > 1e-5 for k in range(N_EXPERTS)])
    counts = active.sum(0)
    for c in range(N_EXPERTS + 1):
        assert (counts == c).float().mean() > 0.05


@needs_mergekit
def test_arcee_fusion_large_tensors_sample_like_mergekit(tmp_path):
    """Over 1,000,000 entries mergekit estimates the quartiles from a random sample: its kept set must stay close to
    ours (exact by default, or sampled with mergekit's sample size), and vary with its seed as ours does."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1250, 1000, generator=g)
    expert = base + 0.1 * torch.randn(1250, 1000, generator=g)
    save_file({"base": base, "expert": expert}, tmp_path / "big.safetensors")
    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from mergekit.merge_methods.arcee_fusion import arcee_fusion_merge_method\n"
        "from mergekit.merge_methods.base import TensorGroup\n"
        "t = load_file(sys.argv[1])\n"
        "for seed in range(3):\n"
        "    torch.manual_seed(seed)\n"
        "    (out,) = arcee_fusion_merge_method([TensorGroup.from_tensors([t['base'], t['expert']], base_index=0)])\n"
        "    print(int((out != t['base']).sum()))\n"
    )
    proc = subprocess.run([str(venv() / "bin" / "python"), "-c", script, str(tmp_path / "big.safetensors")],
                          check=False, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = [int(x) for x in proc.stdout.split()]
    methods = make_plugin_manager(entry_points=False).merge_methods()
    method = methods.get("arcee_fusion")
    ours = {}
    for label, params, seed in [("exact", {}, 0), ("sampled0", {"quantile_sample": 1_000_000}, 0),
                                ("sampled1", {"quantile_sample": 1_000_000}, 1)]:
        out = in_memory.merge(method, params, {"w": base}, [{"w": expert}], seed=seed)["w"]
        ours[label] = int((out != base).sum())
    n = base.numel()
    assert len(set(theirs)) > 1 and ours["sampled0"] != ours["sampled1"]  # both samplers are random
    for kept in theirs + [ours["sampled0"], ours["sampled1"]]:
        assert abs(kept - ours["exact"]) < 0.002 * n  # seeds spread the kept count by about 0.0004 n
    assert 0.01 * n < ours["exact"] < 0.3 * n


# ---- by hand ----------------------------------------------------------------------------------------------------

def merge(methods, name, base, experts, weights=None, seed=0, **params):
    """One tensor through the method's ``merge``, as the engine calls it (whole tensors, or flat if elementwise)."""
    method = methods.get(name)
    shape = base.shape
    flat = (lambda x: x.reshape(-1)) if method.elementwise else (lambda x: x)
    weights = tuple(weights or [1.0] * len(experts))
    ctx = TensorContext("w", weights, seed)
    out = method.merge(flat(base.clone()), [flat(e.clone()) for e in experts], method.resolve_params(params), ctx)
    return out.reshape(shape)


S3 = math.sqrt(3)


def test_model_stock_two_experts_at_known_angles(methods):
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    tau1 = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    tau2 = torch.tensor([[0.5, S3 / 2], [0.0, 2.0]])  # row 0 at 60 degrees from tau1's, row 1 at 90 degrees
    e1, e2 = base + tau1, base + tau2
    # per tensor: <tau1, tau2> = 0.5, |tau1| = |tau2| = sqrt(5): cos = 0.1, t = 2 * 0.1 / 1.1
    t = 0.2 / 1.1
    expected = base + t * (tau1 + tau2) / 2
    torch.testing.assert_close(merge(methods, "model_stock", base, [e1, e2]), expected)
    # per row: cos = 0.5 gives t = 1 / 1.5; cos = 0 gives t = 0, the base row
    row0 = base[0] + (2 / 3) * (tau1[0] + tau2[0]) / 2
    torch.testing.assert_close(merge(methods, "model_stock", base, [e1, e2], filter_wise=True),
                               torch.stack([row0, base[1]]))


def test_model_stock_three_experts_at_equal_angles(methods):
    base = torch.tensor([0.5, -1.0, 2.0])
    taus = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, S3 / 2, 0.0]),
            torch.tensor([0.5, 1 / (2 * S3), math.sqrt(2 / 3)])]  # unit vectors, every pairwise cosine 0.5
    t = 3 * 0.5 / (1 + 2 * 0.5)
    expected = base + t * sum(taus) / 3
    torch.testing.assert_close(merge(methods, "model_stock", base, [base + x for x in taus]), expected)


def test_model_stock_opposite_updates_keep_the_base_and_floor_shrinks_tiny_cosines(methods):
    base = torch.tensor([1.0, 2.0, 3.0])
    tau = torch.tensor([1.0, -1.0, 0.5])
    # cos = -1 makes 1 + (N - 1) cos = 0: no finite t, the base is kept
    torch.testing.assert_close(merge(methods, "model_stock", base, [base + tau, base - tau]), base)
    # parallel tiny updates: the exact cosine is 1 (t = 1, the mean); mergekit's floor 1e-6 on |a||b| = 2.25e-8
    # makes cos = 2.25e-8 / 1e-6 = 0.0225, t = 2 cos / (1 + cos)
    small = torch.tensor([1e-4, 0.0, 0.0])
    e1, e2 = base + small, base + 2 * small
    d1, d2 = e1 - base, e2 - base  # the updates as float32 stores them
    mean = (e1 + e2) / 2
    torch.testing.assert_close(merge(methods, "model_stock", base, [e1, e2]), mean)
    cos = float(d1 @ d2) / 1e-6
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(merge(methods, "model_stock", base, [e1, e2], norm_floor=1e-6),
                               t * mean + (1 - t) * base)


def test_sce_by_hand(methods):
    base = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    tau1 = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, -1.0])
    tau2 = torch.tensor([2.0, 1.0, -0.5, 1.0, 1.0, -1.0])  # the last two entries: the same update, variance 0
    experts = [base + tau1, base + tau2]
    # select everything: eta from the mean squares 16.25 / 6 and 8.25 / 6
    e1, e2 = 16.25 / 24.5, 8.25 / 24.5
    # sums 3, -1, 0, 4, 2, -2 elect +, -, + (a zero sum elects +), +, +, -
    expected = base + torch.tensor([(e1 * 1 + e2 * 2) / (e1 + e2), -2.0, 0.5, (e1 * 3 + e2 * 1) / (e1 + e2), 1.0, -1.0])
    torch.testing.assert_close(merge(methods, "sce", base, experts), expected)
    # select_topk 0.5: variances (d / 2)^2 = 0.25, 2.25, 0.25, 1, 0, 0; k = int(4 non-zero * 0.5) = 2 (not 6 * 0.5)
    # keeps entries 1 and 3
    e1, e2 = 13 / 15, 2 / 15  # mean squares (4 + 9) / 6 and (1 + 1) / 6
    expected = base + torch.tensor([0.0, -2.0, 0.0, (e1 * 3 + e2 * 1) / (e1 + e2), 0.0, 0.0])
    torch.testing.assert_close(merge(methods, "sce", base, experts, select_topk=0.5), expected)
    # eta is what weighs the experts: equal-energy experts give the plain mean where both agree
    swapped = tau1[[3, 1, 2, 0, 4, 5]]  # the same energy, entry 0 moved by 3 instead of 1
    torch.testing.assert_close(merge(methods, "sce", base, [base + tau1, base + swapped])[0], base[0] + 2.0)



@pytest.mark.parametrize("select_topk", [1.0, 0.5])
def test_sce_by_blocks_gives_the_bits_of_one_block(methods, monkeypatch, select_topk):
    """sce's elementwise work goes by blocks of sce._COLUMNS entries; uneven blocks give one block's bits."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(37, 13, generator=g)
    experts = [base + torch.randn(37, 13, generator=g) for _ in range(3)]
    whole = merge(methods, "sce", base, experts, select_topk=select_topk)
    monkeypatch.setattr(sce_module, "_COLUMNS", 10)
    assert torch.equal(merge(methods, "sce", base, experts, select_topk=select_topk), whole)

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), exponent=st.integers(-40, 30), seed=st.integers(0, 2**16), block=st.integers(1, 64))
def test_sce_variance_is_torch_var_bit_for_bit(n, exponent, seed, block):
    """variance_across replays torch.var's float64 Welford steps as tensor ops: the same bits (mergekit's
    torch.var), by blocks of any size, at any scale, with repeated and zero entries."""
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(97, generator=g).mul_(2.0**exponent) for _ in range(n)]
    taus[0][:9] = 0.0
    taus[-1][5:20] = taus[0][5:20]
    want = torch.var(torch.stack(taus), dim=0, unbiased=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sce_module, "_COLUMNS", block)
        assert torch.equal(sce_module.variance_across([t.clone() for t in taus]), want)


def test_sce_uniform_below_switches_to_equal_coefficients(methods):
    base = torch.zeros(2)
    experts = [torch.tensor([1e-4, 1e-4]), torch.tensor([3e-4, 3e-4])]  # mean squares 1e-8 and 9e-8
    weighted = (1 * 1e-4 + 9 * 3e-4) / 10
    torch.testing.assert_close(merge(methods, "sce", base, experts), torch.full((2,), weighted))
    torch.testing.assert_close(merge(methods, "sce", base, experts, uniform_below=1e-6), torch.full((2,), 2e-4))


def test_ram_and_ramplus_by_hand(methods):
    base = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0])
    tau1 = torch.tensor([1.0, 2.0, 0.0, 1e-6, 3.0])
    tau2 = torch.tensor([0.0, 4.0, 0.0, 0.0, -1.0])
    e1, e2 = base + tau1, base + tau2
    # active (> 1e-5): e1 at 0, 1, 4; e2 at 1, 4. Entry 0 unique, 1 and 4 shared, 2 and 3 unchanged
    torch.testing.assert_close(merge(methods, "ram", base, [e1, e2]), base + torch.tensor([1.0, 3.0, 0.0, 0.0, 1.0]))
    # e1: O = 2, U = 1, rho = 2: lambda = 1 + 0.5 * 2 with alpha = 10; alpha = 1 caps rho to 1
    torch.testing.assert_close(merge(methods, "ramplus_tl", base, [e1, e2], r=0.5, alpha=10.0),
                               base + torch.tensor([2.0, 3.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(merge(methods, "ramplus_tl", base, [e1, e2], r=0.5, alpha=1.0),
                               base + torch.tensor([1.5, 3.0, 0.0, 0.0, 1.0]))
    # defaults r = 0.1, alpha = 0.2: lambda = 1.02
    torch.testing.assert_close(merge(methods, "ramplus_tl", base, [e1, e2]),
                               base + torch.tensor([1.02, 3.0, 0.0, 0.0, 1.0]))
    # epsilon 2, strictly above: e1's update of exactly 2 does not count; entry 1 is e2's alone, entry 4 e1's alone
    only = base + torch.tensor([0.0, 4.0, 0.0, 0.0, 3.0])
    torch.testing.assert_close(merge(methods, "ram", base, [e1, e2], epsilon=2.0), only)
    # ramplus with no shared entry: rho = 0, lambda = 1 (plain RAM)
    torch.testing.assert_close(merge(methods, "ramplus_tl", base, [e1, e2], epsilon=2.0, r=0.5, alpha=1.0), only)


def test_ramplus_chunked_equals_whole_tensor(methods):
    """Elementwise with a per-tensor pre-pass: the engine's chunks must give the whole-tensor result exactly."""
    method = methods.get("ramplus_tl")
    params = method.resolve_params({"r": 0.5, "alpha": 10.0})  # rho ~ 3 stays below the cap
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1000, generator=g)
    experts = [base + torch.randn(1000, generator=g) * (torch.rand(1000, generator=g) < 0.5) for _ in range(3)]
    whole = method.merge(base.clone(), [e.clone() for e in experts], params, TensorContext("w", (1.0,) * 3))
    counts = OverlapCounts(params["epsilon"], 3)
    for lo, hi in [(0, 300), (300, 1000)]:
        counts.observe(0, "w", base[lo:hi], [e[lo:hi] for e in experts])
    counts.end_pass(0)
    ctx = TensorContext("w", (1.0,) * 3, analysis=counts.result_for("w"))
    chunked = torch.cat([method.merge(base[lo:hi].clone(), [e[lo:hi].clone() for e in experts], params, ctx)
                         for lo, hi in [(0, 300), (300, 1000)]])
    assert torch.equal(chunked, whole)
    assert run_analysis(OverlapCounts(params["epsilon"], 3), "w", base, experts) == counts.result_for("w")


def numpy_arcee_fusion(base: torch.Tensor, expert: torch.Tensor):
    """An independent float64 reference: row softmaxes, KL, lower-rank quartiles by sorting."""
    import numpy as np

    b, e = base.double().numpy(), expert.double().numpy()

    def softmax(x):
        z = np.exp(x - x.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True) + 1e-8

    p, q = softmax(e), softmax(b)
    scores = np.abs(e - b) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    s = np.sort(scores.reshape(-1))
    last = s.size - 1
    threshold = s[last // 2] + 1.5 * (s[3 * last // 4] - s[last // 4])
    return torch.from_numpy(np.where(scores >= threshold, e, b)).float(), threshold


def test_arcee_fusion_threshold_uses_lower_nearest_rank_quartiles():
    scores = torch.tensor([45.0, 0.0, 21.0, 1.0, 3.0, 36.0, 6.0, 10.0, 15.0, 28.0])
    # n = 10: ranks floor(9 / 4) = 2, floor(9 / 2) = 4, floor(27 / 4) = 6 of the sorted scores: 3, 10, 21
    # (interpolated quartiles would give 3.75, 12.5, 26.25 and a threshold of 46.25)
    assert float(outlier_threshold(scores, 0, None)) == 10.0 + 1.5 * (21.0 - 3.0)



@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-1, 6), min_size=1, max_size=50), block=st.integers(1, 9))
def test_arcee_fusion_quartiles_by_chunked_selection_are_kthvalues(values, block):
    """kth_smallest: the exact radix select over chunks for non-negative scores (ties included), kthvalue where
    a score is negative: always kthvalue's value, so the threshold is the sorted scores' lower nearest ranks."""
    old = arcee_module.SELECT_CHUNK  # the selection's chunk length
    arcee_module.SELECT_CHUNK = block
    try:
        flat = torch.tensor(values, dtype=torch.float32) / 4
        for k in range(1, flat.numel() + 1):
            assert torch.equal(arcee_module.kth_smallest(flat, k), torch.kthvalue(flat, k).values), k
        s = sorted(float(v) for v in flat)
        last = len(s) - 1
        want = s[last // 2] + 1.5 * (s[3 * last // 4] - s[last // 4])
        assert float(outlier_threshold(flat, 0, None)) == pytest.approx(want, abs=1e-6)
    finally:
        arcee_module.SELECT_CHUNK = old


def test_arcee_fusion_importance_by_blocks_of_rows_gives_the_whole_tensors_bits(monkeypatch):
    g = torch.Generator().manual_seed(12)
    for shape in [(37, 13), (300,), (2, 3, 4)]:
        base = torch.randn(shape, generator=g)
        expert = base + 0.3 * torch.randn(shape, generator=g)
        whole = importance(expert.clone(), base.clone())
        monkeypatch.setattr(arcee_module, "BLOCK", 20)  # one row a block (13 entries), or 20 entries of one row
        assert torch.equal(importance(expert.clone(), base.clone()), whole)
        monkeypatch.undo()

def test_arcee_fusion_matches_an_independent_reference(methods):
    g = torch.Generator().manual_seed(11)
    for shape in [(40, 30), (257,)]:
        base = torch.randn(shape, generator=g)
        expert = base + 0.3 * torch.randn(shape, generator=g)
        expected, _ = numpy_arcee_fusion(base, expert)
        out = merge(methods, "arcee_fusion", base, [expert])
        torch.testing.assert_close(out, expected)
        kept = (out != base).float().mean()
        assert 0.0 < kept < 0.5  # an outlier rule keeps a minority


def test_arcee_fusion_sampled_quantiles_are_seeded_and_close_to_exact(methods):
    method = methods.get("arcee_fusion")
    g = torch.Generator().manual_seed(5)
    base = torch.randn(200, 100, generator=g)
    expert = base + 0.2 * torch.randn(200, 100, generator=g)
    exact_threshold = float(outlier_threshold(importance(expert.clone(), base.clone()), 0, None))
    _, reference = numpy_arcee_fusion(base, expert)
    assert exact_threshold == pytest.approx(reference, rel=1e-4)  # float32 KL against float64

    def sampled(seed, sample=4000):
        return in_memory.merge(method, {"quantile_sample": sample}, {"w": base}, [{"w": expert}], seed=seed)["w"]

    assert torch.equal(sampled(0), sampled(0))
    assert not torch.equal(sampled(0), sampled(1))
    exact = in_memory.merge(method, {}, {"w": base}, [{"w": expert}], seed=0)["w"]
    assert torch.equal(exact, in_memory.merge(method, {}, {"w": base}, [{"w": expert}], seed=1)["w"])
    assert torch.equal(exact, sampled(0, sample=base.numel()))  # no more entries than the sample: exact
    for seed in range(3):
        assert ((sampled(seed) != base) ^ (exact != base)).float().mean() < 0.02


@pytest.mark.parametrize("chunk", [3, arcee_module.SELECT_CHUNK])
def test_arcee_fusion_sample_drawn_by_pieces_is_one_draw_of_its_size(chunk, monkeypatch):
    """The sample's indices are drawn a chunk at a time (no int64 index of the whole sample held): the quartiles are
    those of the entries one torch.randint call of the same generator picks (a sample of 11 in pieces of 3: each
    entry decides a quartile; one of 2 CHUNK + 5, as the merge draws)."""
    monkeypatch.setattr(arcee_module, "SELECT_CHUNK", chunk)
    scores = torch.rand(3 * chunk + 17, generator=torch.Generator().manual_seed(8))
    sample = 11 if chunk == 3 else 2 * chunk + 5
    for seed in range(5):
        got = outlier_threshold(scores, sample, torch.Generator().manual_seed(seed))
        picked = scores[torch.randint(scores.numel(), (sample,), generator=torch.Generator().manual_seed(seed))]
        last = sample - 1
        q1, median, q3 = (torch.kthvalue(picked, r + 1).values for r in (last // 4, last // 2, 3 * last // 4))
        assert float(got) == float(median + 1.5 * (q3 - q1))


def test_ordered_sum_is_a_sum_that_ignores_the_thread_count():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 100_003, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ordered_sum(x), ordered_sum(x[0])
        torch.set_num_threads(2)
        two = ordered_sum(x), ordered_sum(x[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and torch.equal(one[0][0], one[1])
    torch.testing.assert_close(one[0], x.double().sum(-1).float(), rtol=1e-5, atol=1e-3)


def test_checks_refuse_what_mergekit_would_ignore_or_reject(methods):
    base = {"w": torch.zeros(3)}
    e = [{"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}]
    with pytest.raises(ParameterError, match="at least 2"):
        in_memory.merge(methods.get("model_stock"), {}, base, e[:1])
    with pytest.raises(ParameterError, match="exactly 1"):
        in_memory.merge(methods.get("arcee_fusion"), {}, base, e)
    for name in ("model_stock", "sce", "ram", "ramplus_tl"):
        with pytest.raises(ParameterError, match="no expert weights"):
            in_memory.merge(methods.get(name), {}, base, e, weights=(1.0, 2.0))
        in_memory.merge(methods.get(name), {}, base, e, weights=(0.5, 0.5))  # equal weights are accepted
