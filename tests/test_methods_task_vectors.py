"""The task-vector family (mergebench/plugins/task_vectors.py): all eight methods.

- Against mergekit 0.1.5 (run from its own virtualenv, one process for every config): N = 3 experts with
  weights != 1 and per-expert densities (and gammas, epsilons) that differ, under each method's
  ``mergekit_defaults``: the deterministic methods agree to float32 rounding, the random ones in kept
  fraction and L1 mass.
- The papers' conventions (our defaults) on small tensors computed by hand, the random masks rebuilt
  from the documented stream derivation.
- The random methods statistically (kept fraction, rank-dependent keep rate, L1 mass), reproducible by
  seed, and every chunked method equal to its whole-tensor merge through the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
import torch
import yaml

import mergebench
from mergebench.core import engine
from mergebench.core.analysis import run_analysis
from mergebench.core.context import TensorContext, content_key
from mergebench.core.errors import ParameterError
from mergebench.core import merge_ops
from mergebench.core.merge_ops import exact_l1
from mergebench.core.plugin_manager import make_plugin_manager
from mergebench.plugins import task_vectors
from mergebench.plugins.task_vectors import magprune_probabilities

from mergekit_ref import llama_family, needs_mergekit, read_model, venv

T = torch.tensor
METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
           "della_linear")
DETERMINISTIC = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
WEIGHTS = (0.5, 1.0, 1.5)
DENSITIES = (0.3, 0.6, 0.45)
GAMMAS = (0.05, 0.1, 0.02)
EPSILONS = (0.1, 0.2, 0.15)
LAMBDA = 0.8


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager(entry_points=False)


def own_values(method: str) -> list[dict]:
    """Each expert's own density (and gamma or epsilon) for ``method``."""
    out = []
    for t in range(3):
        p = {} if method == "task_arithmetic" else {"density": DENSITIES[t]}
        if method.startswith("breadcrumbs"):
            p["gamma"] = GAMMAS[t]
        if method.startswith("della"):
            p["epsilon"] = EPSILONS[t]
        out.append(p)
    return out


def merge_with_contexts(method, params, base, experts, expert_params=(), weights=WEIGHTS, seed=0):
    """Our merge of state dicts, tensor by tensor, calling the method as the engine does but handing its
    per-tensor pre-pass the tensor's context (per-expert values, streams): the contract of
    ``MergeMethod.tensor_analysis(params, ctx)``."""
    out = {}
    for name, b in base.items():
        xs = [e[name].to(torch.float32, copy=True) for e in experts]
        streams = tuple(content_key(e[name]) for e in experts) if method.stochastic else None
        ctx = TensorContext(name, tuple(weights), seed, streams=streams, expert_params=tuple(expert_params))
        b32 = b.to(torch.float32, copy=True)
        if method.elementwise:
            b32, xs = b32.reshape(-1), [x.reshape(-1) for x in xs]
        prepass = method.tensor_analysis(params, ctx) if method.tensor_analysis else None
        if prepass is not None:
            ctx.analysis = run_analysis(prepass, name, b32, xs)
        out[name] = method.merge(b32, xs, params, ctx).view(b.shape)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    paths = llama_family(root, 3)
    return paths, {k: read_model(p) for k, p in paths.items()}


MERGEKIT_BATCH = """
import json, sys
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

for config, out, seed in json.loads(sys.argv[1]):
    with open(config) as f:
        parsed = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(parsed, out, options=MergeOptions(allow_crimes=True, quiet=True, random_seed=seed,
                                                copy_tokenizer=False, write_model_card=False))
"""


@pytest.fixture(scope="module")
def mergekit_out(family, tmp_path_factory):
    """mergekit 0.1.5's merge of the family by every method, in one process (its import costs seconds)."""
    paths, _ = family
    root = tmp_path_factory.mktemp("mergekit")
    jobs = []
    for method in METHODS:
        models = [{"model": str(paths[f"e{t}"]), "parameters": {"weight": WEIGHTS[t], **own_values(method)[t]}}
                  for t in range(3)]
        config = {"merge_method": method, "base_model": str(paths["base"]), "dtype": "float32",
                  "parameters": {"lambda": LAMBDA}, "models": models}
        (root / f"{method}.yml").write_text(yaml.safe_dump(config))
        jobs.append([str(root / f"{method}.yml"), str(root / method), 7])
    (root / "batch.py").write_text(MERGEKIT_BATCH)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(venv() / "bin" / "python"), str(root / "batch.py"), json.dumps(jobs)],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {method: read_model(root / method) for method in METHODS}


def ours_as_mergekit(pm, method, models, seed=0, **overrides):
    m = pm.merge_methods().get(method)
    params = m.resolve_params({**m.mergekit_defaults, "lambda": LAMBDA, **overrides})
    return merge_with_contexts(m, params, models["base"], [models[f"e{t}"] for t in range(3)], own_values(method),
                               seed=seed)


# ---- against mergekit 0.1.5 ----------------------------------------------------------------------

@needs_mergekit
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_deterministic_members_equal_mergekit_under_its_defaults(pm, family, mergekit_out, method):
    _, models = family
    ours = ours_as_mergekit(pm, method, models)
    assert ours.keys() == mergekit_out[method].keys()
    for name, want in mergekit_out[method].items():
        torch.testing.assert_close(ours[name], want, rtol=1e-5, atol=1e-6, msg=f"{method} {name}")
    assert any(not torch.equal(ours[n], models["base"][n]) for n in ours)


@needs_mergekit
@pytest.mark.parametrize("method,paper", [("ties", {"rounding": "nearest"}), ("breadcrumbs_ties", {"normalize": True})])
def test_each_mergekit_convention_changes_the_numbers(pm, family, mergekit_out, method, paper):
    """The comparison above can fail: one paper convention in place of mergekit's moves some entries."""
    _, models = family
    ours = ours_as_mergekit(pm, method, models, **paper)
    assert any(not torch.allclose(ours[n], w, rtol=1e-5, atol=1e-6) for n, w in mergekit_out[method].items())


def kept_and_mass(merged, base):
    """The fraction of entries the merge changed and the L1 norm of the change, over the whole model."""
    changed = sum(int((merged[n] != base[n]).sum()) for n in base)
    total = sum(base[n].numel() for n in base)
    return changed / total, sum(float((merged[n] - base[n]).abs().sum()) for n in base)


@needs_mergekit
@pytest.mark.parametrize("method", RANDOM)
def test_random_members_match_mergekit_in_kept_fraction_and_l1_mass(pm, family, mergekit_out, method):
    _, models = family
    want_kept, want_mass = kept_and_mass(mergekit_out[method], models["base"])
    # an entry is left alone only when every expert drops it: 1 - prod(1 - density_t) of them change
    assert abs(want_kept - (1 - (1 - 0.3) * (1 - 0.6) * (1 - 0.45))) < 0.02
    for seed in (0, 1):
        kept, mass = kept_and_mass(ours_as_mergekit(pm, method, models, seed=seed), models["base"])
        assert abs(kept - want_kept) < 0.02, (seed, kept, want_kept)
        assert abs(mass / want_mass - 1) < 0.03, (seed, mass, want_mass)
    # with the paper's rescale (1/keep probability) the mass is only matched in expectation
    paper, _ = kept_and_mass(ours_as_mergekit(pm, method, models, rescale="keep_prob"), models["base"])
    assert abs(paper - want_kept) < 0.02


# ---- the papers' conventions, by hand ------------------------------------------------------------

def run(pm, method, base, experts, weights=None, seed=0, expert_params=(), **params):
    """One whole tensor through the method, as a direct call (the method runs its own pre-pass)."""
    m = pm.merge_methods().get(method)
    ctx = TensorContext("w", tuple(weights or [1.0] * len(experts)), seed, expert_params=tuple(expert_params))
    return m.merge(base.clone(), [e.clone() for e in experts], m.resolve_params(params), ctx)


def uniforms(seed: int, name: str, stream, numel: int) -> torch.Tensor:
    """The documented stream: sha256("seed\\0name\\0stream") seeds a CPU generator; each 32-bit draw gives two
    16-bit halves, low half first, each read as a signed int16 shifted to [0, 65536) (its top bit flipped)."""
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}\x00{name}\x00{stream}".encode())
                                                     .digest()[:8], "little") % (1 << 63))
    words = torch.randint(-(2**31), 2**31, ((numel + 1) // 2,), generator=g, dtype=torch.int32).to(torch.int64)
    u32 = words & 0xFFFFFFFF
    return torch.stack([u32 & 0xFFFF, u32 >> 16], dim=1).reshape(-1)[:numel] ^ 0x8000


def test_breadcrumbs_drops_outliers_and_keeps_the_band_below(pm):
    zero = torch.zeros(10)
    tau = T([1.0, -9.0, 3.0, 7.0, -6.0, 5.0, 4.0, 10.0, 2.0, 8.0])
    # gamma 0.2: n_top = 2 (10, -9 dropped); density 0.3: the next 3 by magnitude (8, 7, -6) kept
    want = T([0.0, 0.0, 0.0, 7.0, -6.0, 0.0, 0.0, 0.0, 0.0, 8.0])
    assert torch.equal(run(pm, "breadcrumbs", zero, [tau], density=0.3, gamma=0.2), want)
    # density 0.25: round(2.5) = 3 entries (halves up); mergekit's int(2.5) = 2
    assert torch.equal(run(pm, "breadcrumbs", zero, [tau], density=0.25, gamma=0.2), want)
    assert torch.equal(run(pm, "breadcrumbs", zero, [tau], density=0.25, gamma=0.2, rounding="floor"),
                       T([0.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0]))
    # density 0.9 keeps 9 entries: only 1 of the 2 outliers can go, so the largest alone is dropped
    assert torch.equal(run(pm, "breadcrumbs", zero, [tau], density=0.9, gamma=0.2), torch.where(tau == 10, 0, tau))
    # gamma 0.01 of 10 entries drops no outlier: the band is the top 3 (mergekit's [n_bot:-0] bug would keep none)
    assert torch.equal(run(pm, "breadcrumbs", zero, [tau], density=0.3, gamma=0.01, rounding="floor"),
                       T([0.0, -9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 8.0]))


def test_breadcrumbs_ties_at_a_band_edge_go_by_index_and_members_mix_as_documented(pm):
    base = torch.ones(6)
    a = base + T([3.0, -1.0, 1.0, 1.0, -3.0, 2.0])  # |tau| 3 3 2 1 1 1: outlier is index 0, band 3 wide
    b = base + T([-2.0, 1.0, 0.5, -4.0, 1.0, 1.0])
    params = {"density": 0.5, "gamma": 1 / 6, "lambda": 0.5}
    # a: drop index 0 (first of the tied 3s); keep -3 (index 4), 2 (index 5), then the first tied 1 (index 1)
    # b: drop -4 (index 3); keep -2, 1 (index 1), 1 (index 4) -- the first two tied 1s by index
    ta, tb = T([0.0, -1.0, 0.0, 0.0, -3.0, 2.0]), T([-2.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    weights = [1.0, 3.0]
    linear = run(pm, "breadcrumbs", base, [a, b], weights=weights, **params)
    assert torch.equal(linear, base + 0.5 * (ta + 3 * tb))
    # with election: sums (-6, 2, 0, 0, 0, 2) -> signs (-, +, 0, 0, 0, +); agreeing means -2, 1, 0, 0, 0, 2
    ties = run(pm, "breadcrumbs_ties", base, [a, b], weights=weights, **params)
    assert torch.equal(ties, base + 0.5 * T([-2.0, 1.0, 0.0, 0.0, 0.0, 2.0]))
    # mergekit's mix: no division, and a zero sum elects + (index 4: -3 + 3 * 1 = 0, so b's +1 counts)
    mk = run(pm, "breadcrumbs_ties", base, [a, b], weights=weights, normalize=False, zero_sum_sign="positive",
             **params)
    assert torch.equal(mk, base + 0.5 * T([-6.0, 3.0, 0.0, 0.0, 3.0, 2.0]))


def test_ties_conventions_by_hand(pm):
    zero = torch.zeros(4)
    a, b = T([4.0, -2.0, 1.0, 1.0]), T([-4.0, 2.0, -1.0, 3.0])
    # the weighted sums of index 0 and 1 are 0: the paper elects no sign there (0), mergekit elects +
    assert torch.equal(run(pm, "ties", zero, [a, b], density=1.0), T([0.0, 0.0, 0.0, 2.0]))
    assert torch.equal(run(pm, "ties", zero, [a, b], density=1.0, zero_sum_sign="positive"), T([4.0, 2.0, 1.0, 2.0]))
    # normalize false (mergekit's dare_ties default) sums the agreeing entries: index 3 gives 1 + 3
    assert torch.equal(run(pm, "ties", zero, [a, b], density=1.0, normalize=False), T([0.0, 0.0, 0.0, 4.0]))
    # per-expert densities: a keeps 1 entry (4), b keeps 3 (-4, 3 and 2)
    got = run(pm, "ties", zero, [a, b], expert_params=[{"density": 0.25}, {"density": 0.75}])
    assert torch.equal(got, T([0.0, 2.0, 0.0, 3.0]))  # index 0: 4 - 4 = 0 elects nothing
    # density 0.1 of 4 entries: round(0.4) = 0 kept; mergekit keeps at least one (max(1, int(0.4)))
    assert torch.equal(run(pm, "ties", zero, [a], density=0.1), zero)
    assert torch.equal(run(pm, "ties", zero, [a], density=0.1, rounding="floor"), T([4.0, 0.0, 0.0, 0.0]))
    # rescale l1: a trimmed to (4, -2) has L1 6 of 8, so it is scaled by 8/6
    assert torch.allclose(run(pm, "ties", zero, [a], density=0.5, rescale="l1"), T([16 / 3, -8 / 3, 0.0, 0.0]))


def test_dare_linear_by_hand_with_per_expert_densities_and_known_masks(pm):
    base = torch.zeros(7)
    a, b = torch.arange(1.0, 8.0), -torch.arange(2.0, 9.0)
    densities = (0.5, 0.25)
    keeps = [uniforms(3, "w", t, 7) < round(d * 65536) for t, d in enumerate(densities)]
    want = 1.0 * a * keeps[0] / 0.5 + 2.0 * b * keeps[1] / 0.25
    got = run(pm, "dare_linear", base, [a, b], weights=[1.0, 2.0], seed=3,
              expert_params=[{"density": 0.5}, {"density": 0.25}])
    assert torch.allclose(got, want, rtol=1e-6)
    assert 0 < int(keeps[0].sum()) < 7  # the masks are not trivial on this stream
    # normalize: divided by the sum of the weights; rescale none: no 1/density
    normalized = run(pm, "dare_linear", base, [a, b], weights=[1.0, 2.0], seed=3, normalize=True, rescale="none",
                     expert_params=[{"density": 0.5}, {"density": 0.25}])
    assert torch.allclose(normalized, (a * keeps[0] + 2.0 * b * keeps[1]) / 3.0, rtol=1e-6)


def test_magprune_probabilities_by_hand():
    tau = T([[0.1, -0.4, 0.3, 0.2], [2.0, 2.0, -1.0, 5.0]])
    p = magprune_probabilities(tau, 0.5, 0.2)  # 0.3 + 0.4 * rank / 3, ranks ascending by |tau|
    want = T([[0.3, 0.7, 0.3 + 0.8 / 3, 0.3 + 0.4 / 3], [0.3 + 0.4 / 3, 0.3 + 0.8 / 3, 0.3, 0.7]])  # tied 2s by index
    assert torch.allclose(p, want)
    assert torch.allclose(magprune_probabilities(T([3.0, -1.0, 2.0]), 0.5, 0.1), T([0.6, 0.4, 0.5]))  # 1-D: one row
    assert torch.allclose(magprune_probabilities(T([[3.0], [1.0]]), 0.5, 0.1), T([[0.5], [0.5]]))  # one-entry rows


def test_della_by_hand_rescales_each_kept_entry_by_its_probability(pm):
    base = torch.zeros(2, 4)
    a = T([[0.1, -0.4, 0.3, 0.2], [2.0, 1.5, -1.0, 5.0]])
    b = T([[-0.3, 0.25, 0.1, -0.2], [1.0, -3.0, 2.0, -0.5]])

    def rows(x):  # ranks within each row (no ties within a row here)
        return x.abs().argsort(dim=1).argsort(dim=1).float()

    taus = []
    for t, (x, d, e) in enumerate([(a, 0.5, 0.2), (b, 0.4, 0.3)]):
        p = (d - e) + 2 * e * rows(x) / 3
        keep = (uniforms(9, "w", t, 8) < torch.round(p.reshape(-1) * 65536)).view(2, 4)
        taus.append(x * keep / p)
    params = {"seed": 9, "weights": [1.0, 2.0],
              "expert_params": [{"density": 0.5, "epsilon": 0.2}, {"density": 0.4, "epsilon": 0.3}]}
    assert torch.allclose(run(pm, "della_linear", base, [a, b], **params), taus[0] + 2 * taus[1], rtol=1e-6)
    total = taus[0] + 2 * taus[1]
    sign = torch.sign(total)
    agree = [(torch.sign(t) == sign) & (t != 0) for t in taus]
    den = agree[0] * 1.0 + agree[1] * 2.0
    mean = torch.where(den > 0, (taus[0] * agree[0] + 2 * taus[1] * agree[1]) / den.clamp(min=1e-30), 0.0)
    assert torch.allclose(run(pm, "della", base, [a, b], **params), mean, rtol=1e-6)



@pytest.mark.parametrize("shape", [(5, 7), (6, 4), (9,)])
def test_della_by_blocks_of_rows_equals_the_whole_tensor_reference(pm, monkeypatch, shape):
    """MagPrune goes by blocks of whole rows (an odd row length: two rows a block, so no 32-bit draw is split)
    and gives the bits of the whole tensor at once, which equal the reference's draws and per-row ranks."""
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(shape)
    xs = [torch.randn(shape, generator=g) for _ in range(2)]
    want = []
    for t, (x, d, e) in enumerate([(xs[0], 0.5, 0.2), (xs[1], 0.4, 0.3)]):
        lined = x.reshape(1, -1) if x.dim() == 1 else x  # a 1-D tensor is one row
        ranks = lined.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
        p = ((d - e) + 2 * e * ranks / (lined.shape[1] - 1)).reshape(shape)
        keep = (uniforms(9, "w", t, x.numel()) < torch.round(p.reshape(-1) * 65536)).view(shape)
        want.append(x * keep / p)
    params = {"seed": 9, "weights": [1.0, 2.0],
              "expert_params": [{"density": 0.5, "epsilon": 0.2}, {"density": 0.4, "epsilon": 0.3}]}
    whole = run(pm, "della_linear", base, xs, **params)
    whole_ties = run(pm, "della", base, xs, rescale="l1", **params)
    monkeypatch.setattr(task_vectors, "BLOCK", 8)
    blocked = run(pm, "della_linear", base, xs, **params)
    assert torch.equal(blocked, whole)
    # the sign election and disjoint mean go by blocks too (written over the first task vector), and the
    # L1 norms by chunks: the same bits
    monkeypatch.setattr(merge_ops, "BLOCK", 8)
    assert torch.equal(run(pm, "della", base, xs, rescale="l1", **params), whole_ties)
    if len(shape) == 2:  # a direct call's non-contiguous tensors (a transposed view) mix whole: the same bits
        t_base, t_xs = base.T, [x.T for x in xs]
        assert not t_xs[0].is_contiguous()
        assert torch.equal(run(pm, "della", t_base, t_xs, rescale="l1", **params),
                           run(pm, "della", t_base.contiguous(), [x.contiguous() for x in t_xs], rescale="l1",
                               **params))
    assert torch.allclose(blocked, want[0] + 2 * want[1], rtol=1e-6, atol=1e-7)
    assert 0 < int((blocked != 0).sum()) < blocked.numel()  # the masks are not trivial on these streams

# ---- the random members, statistically -------------------------------------------------------------

def big_tau(seed=0, shape=(64, 4096)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_kept_fraction_and_l1_mass(pm, method):
    tau = big_tau()
    zero = torch.zeros_like(tau)
    eps = {"epsilon": 0.2} if method == "della_linear" else {}
    for density in (0.3, 0.6):
        out = run(pm, method, zero, [tau], seed=1, density=density, **eps)
        kept = out != 0
        assert abs(kept.float().mean().item() - density) < 0.005
        # 1/keep probability: unbiased, so the L1 mass is kept in expectation (std ~0.4% here)
        assert abs(out.abs().sum().item() / tau.abs().sum().item() - 1) < 0.02
        l1 = run(pm, method, zero, [tau], seed=1, density=density, rescale="l1", **eps)
        assert torch.equal(l1 != 0, kept)  # the same draws, another rescale
        assert abs(l1.abs().double().sum().item() / tau.abs().double().sum().item() - 1) < 1e-6  # matched exactly
        none = run(pm, method, zero, [tau], seed=1, density=density, rescale="none", **eps)
        assert torch.equal(none, tau * kept)


def test_della_keeps_large_entries_more_often(pm):
    tau = big_tau(1)
    out = run(pm, "della_linear", torch.zeros_like(tau), [tau], seed=2, density=0.4, epsilon=0.2)
    rank = tau.abs().argsort(dim=1).argsort(dim=1).float() / (tau.shape[1] - 1)
    kept = (out != 0).float()
    # p = 0.2 + 0.4 r: the bottom quarter of each row averages r = 1/8, the top quarter 7/8
    assert abs(kept[rank < 0.25].mean().item() - 0.25) < 0.01
    assert abs(kept[rank >= 0.75].mean().item() - 0.55) < 0.01


@pytest.mark.parametrize("method", RANDOM)
def test_random_members_reproduce_by_seed(pm, method):
    tau = [big_tau(s, (32, 64)) for s in (3, 4)]
    zero = torch.zeros(32, 64)
    params = {"density": 0.5, "epsilon": 0.2} if method.startswith("della") else {"density": 0.5}
    one = run(pm, method, zero, tau, seed=5, **params)
    assert torch.equal(one, run(pm, method, zero, tau, seed=5, **params))
    assert not torch.equal(one, run(pm, method, zero, tau, seed=6, **params))


# ---- through the engine: chunked = whole, per-expert values ----------------------------------------

def engine_merge(pm, method, family_paths, out, chunk, monkeypatch, expert_params=None, **params):
    monkeypatch.setattr(engine, "CHUNK", chunk)
    mergebench.merge(method, base=family_paths["base"], experts=[family_paths[f"e{t}"] for t in range(3)],
                     output=out, weights=list(WEIGHTS), expert_params=expert_params, plugin_manager=pm, threads=1,
                     **params)
    return read_model(out)


@pytest.mark.parametrize("method,params", [
    ("dare_linear", {"seed": 4}), ("dare_ties", {"seed": 4, "normalize": False}),
    ("breadcrumbs_ties", {"gamma": 0.05, "rescale": "l1", "rounding": "floor"}),
    ("ties", {"rescale": "l1", "zero_sum_sign": "positive"}), ("della", {"density": 0.5, "seed": 4}),
])
def test_engine_chunked_equals_whole_tensor_merge(pm, family, tmp_path, monkeypatch, method, params):
    paths, models = family
    m = pm.merge_methods().get(method)
    want = merge_with_contexts(m, m.resolve_params({k: v for k, v in params.items() if k != "seed"}), models["base"],
                               [models[f"e{t}"] for t in range(3)], seed=params.get("seed", 0))
    for chunk in (1 << 18, 126):  # one chunk per tensor, then 2 to 9 chunks
        got = engine_merge(pm, method, paths, tmp_path / f"out-{chunk}", chunk, monkeypatch, **params)
        for name in want:
            assert torch.equal(got[name], want[name]), (method, chunk, name)


def test_engine_per_expert_densities_of_a_random_member_need_no_pre_pass(pm, family, tmp_path, monkeypatch):
    paths, models = family
    m = pm.merge_methods().get("dare_linear")
    want = merge_with_contexts(m, m.resolve_params({}), models["base"], [models[f"e{t}"] for t in range(3)],
                               own_values("dare_linear"), seed=2)
    got = engine_merge(pm, "dare_linear", paths, tmp_path / "out", 126, monkeypatch,
                       expert_params=own_values("dare_linear"), seed=2)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_engine_l1_rescale_of_dare_chunked_equals_whole(pm, family, tmp_path, monkeypatch):
    paths, models = family
    m = pm.merge_methods().get("dare_ties")
    params = m.resolve_params({**m.mergekit_defaults, "density": 0.4})
    got = engine_merge(pm, "dare_ties", paths, tmp_path / "out", 126, monkeypatch, seed=1, **params)
    want = merge_with_contexts(m, params, models["base"], [models[f"e{t}"] for t in range(3)], seed=1)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_engine_l1_rescale_of_dare_draws_each_mask_once(pm, family, tmp_path, monkeypatch):
    """The L1 pre-pass keeps the masks it draws for the merge: one draw of each expert's stream per tensor, in
    chunks, as a merge without the pre-pass (drawing is most of DARE's time)."""
    paths, models = family
    drawn = []
    real = task_vectors.random_keep_mask
    monkeypatch.setattr(task_vectors, "random_keep_mask", lambda n, d, g: drawn.append(n) or real(n, d, g))
    monkeypatch.setattr(task_vectors, "random_drop_", lambda *a: pytest.fail("a second draw"))
    m = pm.merge_methods().get("dare_linear")
    params = m.resolve_params({**m.mergekit_defaults, "density": 0.4})
    engine_merge(pm, "dare_linear", paths, tmp_path / "out", 126, monkeypatch, seed=1, **params)
    merged = [n for n in models["base"] if models["base"][n].is_floating_point()
              and not all(torch.equal(models["base"][n], models[f"e{t}"][n]) for t in range(3))]
    assert sum(drawn) == 3 * sum(models["base"][n].numel() for n in merged)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_engine_per_expert_densities_of_a_trimming_member(pm, family, tmp_path, monkeypatch, method):
    paths, models = family
    m = pm.merge_methods().get(method)
    got = engine_merge(pm, method, paths, tmp_path / "out", 126, monkeypatch, expert_params=own_values(method))
    want = merge_with_contexts(m, m.resolve_params({}), models["base"], [models[f"e{t}"] for t in range(3)],
                               own_values(method))
    assert all(torch.equal(got[n], want[n]) for n in want)


# ---- shared pieces and refusals --------------------------------------------------------------------

def test_exact_l1_equals_the_float64_sum_and_ignores_the_chunking():
    x = torch.cat([big_tau(5, (10_001,)) * 1e-3, T([0.0, 1e-40, -3e38, 7.5])])  # a subnormal and a huge entry
    total = exact_l1(x)
    assert total * 2.0**-149 == pytest.approx(x.abs().double().sum().item(), rel=1e-12)
    assert sum(exact_l1(part) for part in x.split(126)) == total == exact_l1(x.flip(0))


def test_refusals_name_the_problem(pm):
    zero = torch.zeros(8)
    with pytest.raises(ParameterError, match=r"density \+- epsilon.*got density 0.1, epsilon 0.15"):
        pm.merge_methods().get("della").check({**pm.merge_methods().get("della").defaults(), "density": 0.1}, (1.0,))
    with pytest.raises(ParameterError, match=r"density 0.9, epsilon 0.2 \(expert 2\)"):
        run(pm, "della_linear", zero, [zero + 1, zero + 2], density=0.5, epsilon=0.2,
            expert_params=[{}, {"density": 0.9}])
    with pytest.raises(ParameterError, match=r"'dare_linear' must be > 0 \(it rescales by 1/density\) for expert 1"):
        run(pm, "dare_linear", zero, [zero + 1], expert_params=[{"density": 0.0}])
    run(pm, "dare_linear", zero, [zero + 1], rescale="l1", density=0.0)  # nothing to divide by 0 there
    ties = pm.merge_methods().get("ties")
    with pytest.raises(ParameterError, match="needs trim_scope: tensor"):
        ties.check(ties.resolve_params({"rescale": "l1", "trim_scope": "global"}), (1.0, 1.0))
    linear = pm.merge_methods().get("dare_linear")
    with pytest.raises(ParameterError, match="sum of the expert weights, which is 0"):
        linear.check(linear.resolve_params({"normalize": True}), (1.0, -1.0))
    linear.check(linear.resolve_params({}), (1.0, -1.0))  # without normalize, weights may cancel


def test_the_family_is_registered_as_one_plugin_with_mergekits_names(pm):
    methods = pm.merge_methods()
    for name in METHODS:
        m = methods.get(name)
        assert m.plugin == "mergebench.plugins.task_vectors" and m.scale_param == "lambda"
        assert m.elementwise == (not name.startswith("della")) and m.stochastic == (name in RANDOM)
        assert set(m.mergekit_defaults) <= {p.name for p in m.params}
        per_expert = {p.name for p in m.params if p.per_expert}
        assert per_expert == {"density", "gamma", "epsilon"} & {p.name for p in m.params}
