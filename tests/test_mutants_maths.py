"""In-memory merging, the shared merge maths and the task-vector family, checked against values worked out by
hand (issue 16's mutation testing: docs/testing.md names the mutants these kill)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import reference_uniforms16
from hypothesis import given, settings
from hypothesis import strategies as st

from mergebench.core import in_memory, merge_ops
from mergebench.core.context import TensorContext
from mergebench.core.errors import InputError, MergebenchError, ParameterError
from mergebench.core.merge_ops import (
    ExactL1,
    exact_l1,
    gram,
    l1_rescale_factor,
    magnitude_mask,
    one_thread,
    ordered_dot,
    ordered_sum,
    random_keep_mask,
)
from mergebench.core.plugin_manager import make_plugin_manager
from mergebench.plugins import LAMBDA_GRID
from mergebench.plugins import task_vectors
from mergebench.plugins.task_vectors import (
    BREADCRUMBS_LINEAR,
    DARE_TIES,
    DELLA_TIES,
    TASK_ARITHMETIC,
    TIES,
    magprune_,
    magprune_probabilities,
    mergekit_magnitude_count,
)


@pytest.fixture(scope="module")
def methods():
    return make_plugin_manager(entry_points=False).merge_methods()


# ---- in-memory merging (core/in_memory.py) ------------------------------------------------------------------

def _sd(**tensors):
    return {n: torch.tensor(v) for n, v in tensors.items()}


def test_in_memory_refuses_incompatible_state_dicts_naming_each_input(methods):
    ta = methods.get("task_arithmetic")
    base = _sd(a=[1.0], b=[2.0])
    good = _sd(a=[3.0], b=[4.0])
    # with a base: the experts are "expert 1", "expert 2", each checked against "the base"
    with pytest.raises(InputError) as e:
        in_memory.merge(ta, {}, base, [_sd(a=[3.0]), good])
    assert str(e.value) == "expert 1 (expert 1) has no tensor 'b' that the base has (1 tensor(s) missing in all)"
    with pytest.raises(InputError) as e:
        in_memory.merge(ta, {}, base, [good, _sd(a=[3.0], b=[4.0], c=[5.0])])
    assert str(e.value) == "expert 2 (expert 2) has a tensor 'c' that the base does not have"
    # without a base: expert 1 is the template, the others are checked against it
    avg = methods.get("average")
    with pytest.raises(InputError) as e:
        in_memory.merge(avg, {}, None, [good, good, _sd(a=[3.0, 1.0], b=[4.0])])
    assert str(e.value) == "tensor 'a' has shape [2] in expert 3 (expert 3) but [1] in expert 1"
    with pytest.raises(InputError) as e:
        in_memory.merge_delta(ta, {}, base, [good, _sd(a=[3], b=[4.0])])
    assert str(e.value) == "tensor 'a' is torch.int64 in expert 2 (expert 2) but torch.float32 in the base"


def test_in_memory_nan_refusals_name_the_input(methods):
    ta = methods.get("task_arithmetic")
    base = _sd(w=[1.0, float("nan")])
    with pytest.raises(InputError) as e:
        in_memory.merge(ta, {}, base, [_sd(w=[1.0, 2.0])])
    assert str(e.value) == "base (base): tensor 'w' contains NaN or Inf values"
    with pytest.raises(InputError) as e:
        in_memory.merge(ta, {}, _sd(w=[1.0, 2.0]), [_sd(w=[1.0, 3.0]), _sd(w=[float("inf"), 2.0])])
    assert str(e.value) == "expert 2 (expert 2): tensor 'w' contains NaN or Inf values"


def test_in_memory_global_ties_trims_over_the_whole_model(methods):
    # one expert, task vectors a = (0.1, -0.2), b = (3, 4); density 0.5 over all four entries keeps 3 and 4
    # (trimming each tensor alone would keep -0.2 and 4); one expert agrees with itself
    base = _sd(a=[0.0, 0.0], b=[1.0, 1.0])
    expert = _sd(a=[0.1, -0.2], b=[4.0, 5.0])
    ties = methods.get("ties")
    out = in_memory.merge(ties, {"density": 0.5, "trim_scope": "global"}, base, [expert])
    assert torch.equal(out["a"], torch.zeros(2)) and torch.equal(out["b"], torch.tensor([4.0, 5.0]))
    delta = in_memory.merge_delta(ties, {"density": 0.5, "trim_scope": "global"}, base, [expert])
    assert torch.equal(delta["a"], torch.zeros(2)) and torch.equal(delta["b"], torch.tensor([3.0, 4.0]))
    per_tensor = in_memory.merge(ties, {"density": 0.5}, base, [expert])
    assert torch.allclose(per_tensor["a"], torch.tensor([0.0, -0.2])) and torch.equal(per_tensor["b"],
                                                                                      torch.tensor([1.0, 5.0]))


def test_in_memory_per_expert_parameters_reach_the_method(methods):
    # TIES with densities 0.25 and 1.0 per expert: tau0 = (4, 1, 1, 1) keeps only 4; tau1 = (1, 2, -3, 1) keeps
    # all; signs (+, +, -, +) elected; agreeing means (4 + 1) / 2, 2, -3, 1
    base = _sd(w=[0.0, 0.0, 0.0, 0.0])
    experts = [_sd(w=[4.0, 1.0, 1.0, 1.0]), _sd(w=[1.0, 2.0, -3.0, 1.0])]
    ties = methods.get("ties")
    own = [{"density": 0.25}, {"density": 1.0}]
    expected = torch.tensor([2.5, 2.0, -3.0, 1.0])
    assert torch.equal(in_memory.merge(ties, {"density": 0.5}, base, experts, expert_params=own)["w"], expected)
    assert torch.equal(in_memory.merge_delta(ties, {"density": 0.5}, base, experts, expert_params=own)["w"], expected)
    # without them, density 0.5 for both: tau0 keeps 4 and its first tied 1, tau1 keeps -3 and 2
    assert torch.equal(in_memory.merge(ties, {"density": 0.5}, base, experts)["w"], torch.tensor([4.0, 1.5, -3.0, 0.0]))


class _Stats(dict):
    """Calibration statistics as a data-aware method reads them: ``get(tensor name)``."""


def test_in_memory_hands_each_expert_its_calibration_statistics(methods):
    # Fisher merging, floor 1e-6: (F0 theta0 + F1 theta1) / (F0 + F1) per entry
    experts = [_sd(w=[1.0, 2.0]), _sd(w=[3.0, 6.0])]
    fishers = [_Stats(w=torch.tensor([1.0, 3.0])), _Stats(w=torch.tensor([3.0, 1.0]))]
    out = in_memory.merge(methods.get("fisher"), {}, None, experts, statistics=fishers)
    assert torch.allclose(out["w"], torch.tensor([(1 + 9) / 4, (6 + 6) / 4]), rtol=0, atol=1e-6)
    # the statistics are the caller's, reused by every point of a sweep: the merge leaves them as they were
    weighted = in_memory.merge(methods.get("fisher"), {"fisher_floor": 2.0}, None, experts, weights=[2.0, 1.0],
                               statistics=fishers)
    assert fishers[0]["w"].tolist() == [1.0, 3.0] and fishers[1]["w"].tolist() == [3.0, 1.0]
    assert torch.allclose(weighted["w"], torch.tensor([(4 * 1 + 3 * 3) / 7, (6 * 2 + 2 * 6) / 8]), rtol=0, atol=1e-6)
    # without statistics Fisher merging is the plain mean
    assert torch.equal(in_memory.merge(methods.get("fisher"), {}, None, experts)["w"], torch.tensor([2.0, 4.0]))
    # the scale-free path hands them over too (a probe method records what its context holds)
    from mergebench.core.registry import MergeMethod

    seen = []

    def delta(base, experts_, params, ctx):
        seen.append(ctx.statistics)
        return torch.zeros_like(base)

    probe = MergeMethod(name="probe", description="", delta=delta, scale_param="s", elementwise=False, params=())
    in_memory.merge_delta(probe, {}, _sd(w=[0.0, 0.0]), experts, statistics=fishers)
    assert len(seen) == 1 and [torch.equal(s, f["w"]) for s, f in zip(seen[0], fishers)] == [True, True]


def test_apply_delta_adds_in_float32_whatever_the_base_dtype():
    # a float64 base: the scaled merge is float32 maths, as the engine does it (float64 maths rounds otherwise)
    base = {"w": torch.tensor([1 / 3, 2 / 3, 1e-9], dtype=torch.float64), "i": torch.tensor([1, 2])}
    delta = {"w": torch.tensor([1.0, 1 / 3, 1.0]), "i": None}
    out = in_memory.apply_delta(base, delta, 0.1)
    expected = torch.add(base["w"].to(torch.float32), delta["w"], alpha=0.1)
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], expected)
    assert out["i"] is base["i"]


# ---- the shared maths (core/merge_ops.py) --------------------------------------------------------------------

def test_ordered_sum_sums_blocks_of_4096_then_the_partial_sums_in_order():
    g = torch.Generator().manual_seed(0)
    for n in (1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 5):
        x = torch.randn(2, n, generator=g) * 1000
        # the documented order, written as a loop over the blocks of each row
        expected = torch.stack([torch.stack([row[i:i + 4096].sum() for i in range(0, n, 4096)]).sum() for row in x])
        out = ordered_sum(x)
        assert out.shape == (2,) and torch.equal(out, expected), n
        assert torch.allclose(out.double(), x.double().sum(-1), rtol=1e-5, atol=1e-2)
    # integers in float32 sum exactly whatever the order: every entry counted once, at any depth of blocks
    x = torch.arange(1.0, 38.0).reshape(1, 37)
    for block in (2, 3, 4, 5, 36, 37, 64):
        assert ordered_sum(x, block=block).tolist() == [703.0], block
    assert ordered_sum(torch.ones(3, 4, 10), block=4).tolist() == [[10.0] * 4] * 3
    # a flat tensor (as sce.py sums one) and a 3-D one reduce their last dimension in the same order
    assert ordered_sum(torch.arange(1.0, 38.0), block=4).item() == 703.0
    x = torch.randn(2, 3, 3 * 4096 + 5, generator=g) * 1000
    expected = torch.stack([ordered_sum(x[i]) for i in range(2)])
    assert torch.equal(ordered_sum(x), expected)
    assert torch.equal(expected[1, 2], torch.stack([x[1, 2, i:i + 4096].sum() for i in range(0, x.shape[-1], 4096)]).sum())



def test_exact_l1_by_chunks_is_the_same_integer(monkeypatch):
    """exact_l1 sums mantissas per exponent in integers a chunk of merge_ops.BLOCK entries at a time: any
    chunking gives the same integer, which is sum |x| in units of 2**-149 (checked against Python's fractions)."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(37, generator=g) * 1e3, torch.tensor([1e-45, -2e-38, 0.0, 3.4e38])])
    want = sum(Fraction(abs(float(v))) for v in x) * 2**149
    assert want.denominator == 1
    assert exact_l1(x) == want.numerator
    for block in (1, 2, 7):
        monkeypatch.setattr(merge_ops, "BLOCK", block)
        assert exact_l1(x) == want.numerator, block

@settings(max_examples=60, deadline=None)
@given(lead=st.sampled_from([(), (1,), (3,), (2, 2)]), n=st.integers(1, 40), block=st.integers(2, 9),
       chunk=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_ordered_dot_is_ordered_sum_of_the_product_bit_for_bit(lead, n, block, chunk, seed):
    """Products formed a chunk at a time (whole rows, or whole blocks of one or more rows), the first level of
    block sums kept: the bits of ordered_sum over the whole product, for any chunk and block sizes."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(*lead, n, generator=g) * 100, torch.randn(*lead, n, generator=g)
    want = ordered_sum(a * b, block=block)
    got = ordered_dot(a, b, block=block, chunk=chunk)
    assert got.shape == want.shape and torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(lead=st.sampled_from([(), (1,), (3,), (2, 2)]), n=st.integers(1, 40), count=st.integers(1, 4),
       block=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_gram_holds_every_pairs_inner_product_over_the_last_dimension(lead, n, count, block, seed):
    """G[..., a, b] = <v_a, v_b> for blocks of whole rows or of pieces of a row, against the float64 products; the
    same bits whether its blocks are formed on one thread or dealt out to two or three."""
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(*lead, n, generator=g) * 10 ** i for i in range(count)]
    want = torch.stack([torch.stack([(a.double() * b.double()).sum(-1) for b in vs], -1) for a in vs], -2)
    got = gram(vs, block=block)
    assert got.dtype == torch.float64 and got.shape == (*lead, count, count)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with one_thread(torch.device("cpu")):
        for threads in (2, 3):
            assert torch.equal(gram(vs, threads, block=block), got)
    assert torch.equal(gram([torch.empty(*lead, 0)] * count), torch.zeros(*lead, count, count, dtype=torch.float64))


def test_gram_adds_its_blocks_in_order_on_any_thread_count():
    """Blocks of one entry whose products are 1e36, 1e-30 and -1e36: added in order the small one is lost (0), as
    on one thread; a sum thread by thread (1e36 - 1e36 first) would keep it."""
    a, b = torch.tensor([1e18, 1e-15, 1e18]), torch.tensor([1e18, 1e-15, -1e18])
    one = gram([a, b], block=1)
    assert float(one[0, 1]) == 0.0
    with one_thread(torch.device("cpu")):
        assert torch.equal(gram([a, b], 2, block=1), one)


def test_magnitude_mask_carries_the_tie_allowance_across_chunks(monkeypatch):
    """Chunks of 2 entries: the entries tied at the threshold are kept by flat index until the allowance left by
    the earlier chunks is spent, whether a chunk uses all of it, part of it or none."""
    monkeypatch.setattr(merge_ops, "BLOCK", 2)
    monkeypatch.setattr(merge_ops, "SELECT_CHUNK", 2)  # the selection by chunks of 2 too
    # all six tied, k = 3: the first chunk keeps 2 (1 left), the second 1 (0 left), the third none
    assert magnitude_mask(torch.ones(6), 3).tolist() == [True, True, True, False, False, False]
    # threshold 1 with one tie allowed: the first chunk has no tie, the second keeps its first entry only
    x = torch.tensor([4.0, -3.0, 1.0, -1.0, 1.0, 1.0])
    assert magnitude_mask(x, 3).tolist() == [True, True, True, False, False, False]
    # the allowance spent inside the first chunk: no later tie is kept; a 2-D tensor in flat order
    x = torch.tensor([[2.0, 0.5], [0.5, 0.5], [0.5, 3.0]])
    assert magnitude_mask(x, 3).tolist() == [[True, True], [False, False], [False, True]]
    # two ties allowed over three chunks: one from the first chunk, one from the third (the second has none)
    x = torch.tensor([0.5, 5.0, 4.0, 3.0, -0.5, 0.5, 0.5])
    assert magnitude_mask(x, 5).tolist() == [True, True, True, True, True, False, False]


@pytest.mark.parametrize("k", [0, 1, 4, 5, 7, 9])
def test_magnitude_mask_written_over_its_input_is_the_boolean_mask(monkeypatch, k):
    """``out=x``: the mask as 1.0 / 0.0 in x's own memory, each chunk read before it is written (chunks of 2, ties
    carried across them), and the whole-tensor cases (k <= 0, k >= n) too."""
    monkeypatch.setattr(merge_ops, "BLOCK", 2)
    monkeypatch.setattr(merge_ops, "SELECT_CHUNK", 2)
    x = torch.tensor([[0.5, -5.0, 4.0], [0.5, -0.5, 0.5], [1.0, 0.5, -2.0]])
    want = magnitude_mask(x, k).to(torch.float32)
    got = magnitude_mask(x, k, out=x)
    assert got.data_ptr() == x.data_ptr() and got.shape == (3, 3) and torch.equal(got, want)
    assert int(got.sum()) == min(max(k, 0), 9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_magnitude_mask_of_a_gpu_tensor_is_a_gpu_mask(monkeypatch):
    monkeypatch.setattr(merge_ops, "BLOCK", 3)  # by chunks, the tie allowance carried across them
    monkeypatch.setattr(merge_ops, "SELECT_CHUNK", 3)
    x = torch.tensor([[0.5, 5.0, 4.0], [3.0, -0.5, 0.5], [0.5, 1.0, -2.0]])
    got = magnitude_mask(x.cuda(), 6)
    assert got.is_cuda and got.tolist() == magnitude_mask(x, 6).tolist() == [[True, True, True], [True, False, False],
                                                                            [False, True, True]]


# ---- the task-vector family (plugins/task_vectors.py) ----------------------------------------------------------

def test_mergekit_magnitude_count_by_hand():
    # mergekit 0.1.5's magnitude sparsifier: all at density >= 1, none at <= 0, else max(1, int(density * n))
    for density, numel, expected in ((1.0, 10, 10), (1.5, 10, 10), (0.99, 10, 9), (0.35, 10, 3), (0.05, 10, 1),
                                     (0.0, 10, 0), (-0.5, 10, 0), (0.5, 1, 1), (0.5, 0, 0), (1.0, 0, 0), (0.0, 1, 0)):
        assert mergekit_magnitude_count(density, numel) == expected, (density, numel)


def test_ties_with_mergekit_rounding_at_density_0_keeps_nothing_and_a_single_entry_is_kept(methods):
    ties = methods.get("ties")
    base = _sd(w=[0.0, 0.0, 0.0], one=[1.0])
    expert = _sd(w=[1.0, -2.0, 3.0], one=[2.0])
    floor = {"rounding": "floor", "lambda": 1.0}
    out = in_memory.merge(ties, {**floor, "density": 0.0}, base, [expert])
    assert torch.equal(out["w"], torch.zeros(3)) and torch.equal(out["one"], torch.tensor([1.0]))
    # density 0.1: int(0.3) = 0 entries of w, raised to 1 (the largest); the one-entry tensor keeps its entry
    out = in_memory.merge(ties, {**floor, "density": 0.1}, base, [expert])
    assert torch.equal(out["w"], torch.tensor([0.0, 0.0, 3.0])) and torch.equal(out["one"], torch.tensor([2.0]))


# ---- DELLA's keep probabilities (plugins/task_vectors.py: magprune_probabilities) ------------------------------


def _della_reference(rows, density, epsilon):
    """density - epsilon + 2 epsilon rank / (n - 1), ranking |x| ascending within each row, ties by index."""
    out = []
    for row in rows:
        order = sorted(range(len(row)), key=lambda i: (abs(row[i]), i))
        rank = {i: r for r, i in enumerate(order)}
        out.append([(density - epsilon) + rank[i] / (len(row) - 1) * (2 * epsilon) for i in range(len(row))])
    return torch.tensor(out, dtype=torch.float32)


def test_magprune_ranks_ties_by_index_in_long_rows():
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 3, (3, 3000), generator=g) - 1).to(torch.float32) * 0.5  # |x| in {0, 0.5}: many ties
    p = magprune_probabilities(x, 0.4, 0.1)
    assert torch.allclose(p, _della_reference(x.tolist(), 0.4, 0.1), rtol=0, atol=1e-6)


def test_magprune_two_entry_rows_span_the_window_and_any_float_type_is_ranked():
    p = magprune_probabilities(torch.tensor([-3.0, 1.0]), 0.5, 0.1)
    assert torch.allclose(p, torch.tensor([0.6, 0.4]), rtol=0, atol=1e-7)
    assert torch.allclose(magprune_probabilities(torch.tensor([[2.0]]), 0.5, 0.1), torch.tensor([[0.5]]))
    x = torch.tensor([[0.25, -3.0, 1.0], [1.0, 0.5, -0.125]], dtype=torch.float64)
    expected = _della_reference(x.tolist(), 0.5, 0.2)
    assert torch.allclose(magprune_probabilities(x, 0.5, 0.2).to(torch.float32), expected, rtol=0, atol=1e-6)


def test_magprune_ranks_a_3d_tensor_along_dim_1_as_mergekit():
    x = torch.tensor([[[3.0, -1.0], [1.0, 2.0], [-2.0, 0.5]], [[0.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    # along dim 1 (length 3), per (i, k): ranks of |x[i, :, k]|, ties by index: r = rank / 2
    r = torch.tensor([[[1.0, 0.5], [0.0, 1.0], [0.5, 0.0]], [[0.0, 0.0], [1.0, 0.5], [0.5, 1.0]]])
    assert torch.allclose(magprune_probabilities(x, 0.5, 0.1), 0.4 + 0.2 * r, rtol=0, atol=1e-6)


def test_magprune_ranks_every_fibre_along_dim_1_of_a_4d_tensor():
    # a conv-shaped (out, in, kh, kw) tensor: each x[i, :, j, k] is ranked on its own, ties by index
    x = torch.randint(-3, 4, (2, 5, 3, 2), generator=torch.Generator().manual_seed(0)).float()  # many ties
    got = magprune_probabilities(x, 0.5, 0.2)
    assert got.is_contiguous() and got.shape == x.shape
    for i in range(2):
        for j in range(3):
            for k in range(2):
                fibre = x[i, :, j, k].abs().tolist()
                ranks = [sum(1 for m, b in enumerate(fibre) if b < a or (b == a and m < n)) for n, a in enumerate(fibre)]
                expected = torch.tensor([0.3 + 0.4 * r / 4 for r in ranks])
                assert torch.allclose(got[i, :, j, k], expected, rtol=0, atol=1e-6), (i, j, k)
    # an empty tensor has no ranks to take
    assert magprune_probabilities(torch.zeros(0), 0.5, 0.1).shape == (0,)


@pytest.mark.parametrize("shape", [(4, 5), (3, 9), (2, 3, 4), (9,)])
def test_magprune_by_blocks_of_rows_draws_as_one_whole_draw(monkeypatch, shape):
    """BLOCK = 8: rows of 5 go two a block (10 entries: an odd block would split a 32-bit draw), rows of 9 two
    a block; a 3-D or 1-D tensor of more than BLOCK entries goes whole. Every entry's uniform is the one a single
    draw for the whole tensor gives it, compared with its keep probability from ranks along dim 1."""
    monkeypatch.setattr(task_vectors, "BLOCK", 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    density, epsilon = 0.5, 0.3
    lined = x.reshape(1, -1) if x.dim() == 1 else x
    ranks = lined.abs().argsort(dim=1, stable=True).argsort(dim=1).double()  # ranks along dim 1, ties by index
    p = ((density - epsilon) + 2 * epsilon * ranks / (lined.shape[1] - 1)).reshape(shape)
    keep = (reference_uniforms16(x.numel(), 7) < torch.round(p.reshape(-1) * 65536)).view(shape)
    got = magprune_(x.clone(), density, epsilon, torch.Generator().manual_seed(7), divide=True)
    assert torch.equal(got != 0, keep)
    assert torch.allclose(got, x * keep / p.float(), rtol=1e-6, atol=0)
    assert 0 < int(keep.sum()) < x.numel()


# ---- keep masks, exact L1 norms and mergekit's rescale (core/merge_ops.py) -------------------------------------


def test_random_keep_mask_with_per_entry_probabilities_of_any_float_type():
    n = 1 << 16
    probabilities = torch.tensor([0.75, 0.5, 0.25, 0.0, 1.0, 0.125, 0.625, 0.875]).repeat(n // 8)
    u = reference_uniforms16(n, 3)
    expected = u < (probabilities.double() * 65536).round().long()  # keep where the uniform is below p * 2^16
    for dtype in (torch.float32, torch.float16, torch.float64):
        keep = random_keep_mask(n, probabilities.to(dtype), torch.Generator().manual_seed(3))
        assert keep.dtype == torch.bool and torch.equal(keep, expected), dtype
    # some uniforms sit exactly at a threshold: they are dropped (strictly below keeps)
    assert bool(((u == 49152) & (probabilities == 0.75)).any())


def test_exact_l1_counts_subnormal_and_smallest_normal_floats_exactly():
    # in steps of 2^-149: a subnormal m * 2^-149 is m steps; the smallest normal 2^-126 is 2^23 steps
    assert exact_l1(torch.tensor([2.0**-149])) == 1
    assert exact_l1(torch.tensor([-(2.0**-140)])) == 2**9
    assert exact_l1(torch.tensor([2.0**-126])) == 2**23
    assert exact_l1(torch.tensor([1.5 * 2.0**-126, 2.0**-125])) == 3 * 2**22 + 2**24
    assert exact_l1(torch.tensor([1.0, -0.5, 0.0])) == 3 * 2**148


def test_l1_rescale_factor_skips_norms_below_1e_7_not_at_it():
    eps = int(math.ldexp(1e-7, 149))  # exactly 1e-7 in steps of 2^-149
    assert math.ldexp(float(eps), -149) == 1e-7
    below = int(math.ldexp(math.nextafter(1e-7, 0.0), 149))  # the next double below 1e-7
    big = 3 * eps
    assert l1_rescale_factor(big, eps) == 3.0 and l1_rescale_factor(eps, big) == pytest.approx(1 / 3)
    assert l1_rescale_factor(big, below) == 1.0 and l1_rescale_factor(below, big) == 1.0
    # 1.5e-7 is above the limit (as is half of it below): rescaled
    assert l1_rescale_factor(int(1.5 * eps), big) == pytest.approx(0.5)
    assert l1_rescale_factor(big, int(1.5 * eps)) == pytest.approx(2.0)
    assert l1_rescale_factor(0, big) == 1.0 and l1_rescale_factor(big, 0) == 1.0


# ---- the task-vector family's checks ------------------------------------------------------------------------------


def test_della_refuses_a_window_that_touches_0_or_1():
    for density, epsilon in ((0.3, 0.3), (0.5, 0.5), (0.75, 0.25)):  # density - eps == 0, density + eps == 1
        with pytest.raises(ParameterError) as e:
            DELLA_TIES._check({"density": density, "epsilon": epsilon}, (1.0, 1.0))
        assert str(e.value) == ("merge method 'della' keeps entries with probabilities density +- epsilon, which must "
                                f"lie in (0, 1); got density {density}, epsilon {epsilon}")
    DELLA_TIES._check({"density": 0.3, "epsilon": 0.29}, (1.0, 1.0))
    DELLA_TIES._check({"density": 0.75, "epsilon": 0.24}, (1.0, 1.0))


# ---- registration and whether a member draws random numbers ------------------------------------------------------


def test_registered_members_carry_their_text_checks_defaults_and_grids(methods):
    ties, dare = methods.get("ties"), methods.get("dare_ties")
    assert (ties.description, ties.reference) == (TIES.description, TIES.reference) and "TIES" in ties.reference
    assert (dare.description, dare.reference) == (DARE_TIES.description, DARE_TIES.reference)
    # mergekit 0.1.5's ties: density 1, normalize, no rescale, int() counts, + where the signs cancel
    assert dict(ties.mergekit_defaults) == {"density": 1.0, "normalize": True, "rescale": "none", "rounding": "floor",
                                           "zero_sum_sign": "positive"}
    assert dict(ties.search_space) == {"lambda": LAMBDA_GRID, "density": (0.1, 0.2)}
    with pytest.raises(ParameterError):
        ties.check({"density": 0.5}, (1.0, -1.0))  # sign election needs positive weights
    assert dare.stochastic and not ties.stochastic


@pytest.mark.parametrize("params, expert_params, draws", [
    ({"density": 0.5}, (), True), ({"density": 1.0}, (), False), ({"density": 0.0}, (), False),
    ({"density": 0.999}, (), True), ({"density": 1e-6}, (), True),
    ({"density": 1.0}, ({"density": 0.5}, {}), True),   # one expert's own value draws
    ({"density": 0.5}, ({"density": 1.0}, {"density": 0.0}), False),  # every expert's own value: none draws
    ({"density": {"filter": "mlp", "value": 1.0}}, (), True),  # a value that varies by tensor is taken to draw
    ({"density": 1.0}, ({"density": [0.0, 1.0]},), True),
])
def test_dare_draws_random_numbers_only_at_a_density_strictly_between_0_and_1(methods, params, expert_params, draws):
    dare = methods.get("dare_ties")
    assert dare.draws_random({**dare.resolve_params({}), **params}, expert_params) is draws


def test_global_ties_trims_each_expert_to_its_own_density(methods):
    # whole-model trim with per-expert densities: expert 1 keeps 1 of its 4 entries (0.25), expert 2 all (1.0);
    # tau1 = (4, 1 | 1, 1) keeps only 4, tau2 = (1, 2 | -3, 1) keeps all; agreeing means as in the per-tensor case
    base = _sd(a=[0.0, 0.0], b=[0.0, 0.0])
    experts = [_sd(a=[4.0, 1.0], b=[1.0, 1.0]), _sd(a=[1.0, 2.0], b=[-3.0, 1.0])]
    out = in_memory.merge(methods.get("ties"), {"density": 0.5, "trim_scope": "global"}, base, experts,
                          expert_params=[{"density": 0.25}, {"density": 1.0}])
    assert torch.equal(out["a"], torch.tensor([2.5, 2.0])) and torch.equal(out["b"], torch.tensor([-3.0, 1.0]))


# ---- direct calls of a member's maths, and the checks at the edges of their ranges ---------------------------------


def test_a_reused_context_trims_each_new_tensor_by_its_own_threshold():
    # a direct call computes the pre-pass itself; called again with the same context on another tensor it
    # computes that tensor's threshold (density 0.5 of (10, 20, 30, 40): 10 and 20 are dropped)
    ctx = TensorContext("w", (1.0,))
    TIES.delta(torch.zeros(4), [torch.tensor([4.0, 3.0, 2.0, 1.0])], {"density": 0.5}, ctx)
    out = TIES.delta(torch.zeros(4), [torch.tensor([10.0, 20.0, 30.0, 40.0])], {"density": 0.5}, ctx)
    assert out[:2].tolist() == [0.0, 0.0] and out[3] == 40.0


def test_a_reused_context_gives_each_whole_tensor_its_own_top_k():
    ctx = TensorContext("w", (1.0,))
    first = TIES.delta(torch.zeros(4), [torch.tensor([4.0, 3.0, 2.0, 1.0])], {"density": 0.5}, ctx)
    again = TIES.delta(torch.zeros(4), [torch.tensor([4.0, 3.0, 2.0, 1.0])], {"density": 0.5}, ctx)
    assert first.tolist() == again.tolist() == [4.0, 3.0, 0.0, 0.0]
    # breadcrumbs carries two allowances (the outliers and the kept band): both start again too. Of six tied
    # entries at density 0.5 and gamma 1/6, one outlier goes and three stay
    ctx = TensorContext("w", (1.0,))
    params = {"density": 0.5, "gamma": 1 / 6}
    calls = [BREADCRUMBS_LINEAR.delta(torch.zeros(6), [torch.ones(6)], params, ctx) for _ in range(2)]
    assert calls[0].tolist() == calls[1].tolist() and calls[0].sum() == 3.0


def test_a_chunk_without_its_pre_pass_is_refused():
    ctx = TensorContext("layer.w", (1.0,))
    ctx.offset = 8
    with pytest.raises(MergebenchError) as e:
        TIES.delta(torch.zeros(4), [torch.ones(4)], {"density": 0.5}, ctx)
    assert str(e.value) == ("merge method 'ties' got a chunk of tensor 'layer.w' without its pre-pass (the engine must "
                            "give the pre-pass the tensor's context)")


def test_ties_with_l1_rescale_gives_a_halved_vector_its_norm_back(methods):
    # tau = (1, 1, 1, 1), density 0.5 keeps the first two: L1 4 -> 2, so the kept entries are doubled
    base, expert = _sd(w=[0.0] * 4), _sd(w=[1.0] * 4)
    out = in_memory.merge(methods.get("ties"), {"density": 0.5, "rescale": "l1"}, base, [expert])
    assert out["w"].tolist() == [2.0, 2.0, 0.0, 0.0]
    # a factor of exactly 1 (nothing dropped) leaves it as it is
    assert in_memory.merge(methods.get("ties"), {"density": 1.0, "rescale": "l1"}, base, [expert])["w"].tolist() == \
        [1.0] * 4


def test_della_per_expert_density_0_drops_all_and_1_keeps_all_whatever_epsilon(methods):
    # expert 1 at density 1 keeps its task vector whole, expert 2 at density 0 drops all of it: della's
    # disjoint mean is then expert 1's task vector; the method-level window (0.5 +- 0.15) is never needed
    base = _sd(w=[0.0, 0.0, 0.0])
    experts = [_sd(w=[1.0, -2.0, 3.0]), _sd(w=[5.0, 5.0, 5.0])]
    out = in_memory.merge(methods.get("della"), {"density": 0.5, "epsilon": 0.15}, base, experts,
                          expert_params=[{"density": 1.0}, {"density": 0.0}])
    assert out["w"].tolist() == [1.0, -2.0, 3.0]
    for density in (0.0, 1.0):  # the method-level check needs no window at 0 or 1
        DELLA_TIES._check({"density": density, "epsilon": 0.15}, (1.0, 1.0))


def test_normalize_without_election_refuses_only_weights_summing_to_about_0():
    TASK_ARITHMETIC._check({"normalize": True}, (0.5, 0.5))
    TASK_ARITHMETIC._check({"normalize": True}, (1e-8,))  # the limit itself is accepted
    TASK_ARITHMETIC._check({"normalize": False}, (1.0, -1.0))
    with pytest.raises(ParameterError) as e:
        TASK_ARITHMETIC._check({"normalize": True}, (1.0, -1.0))
    assert str(e.value) == ("merge method 'task_arithmetic': normalize: true divides by the sum of the expert weights, "
                            "which is 0; change the weights or set normalize: false")


def test_random_keep_mask_at_density_1_is_boolean_and_keeps_all():
    keep = random_keep_mask(11, 1.0, torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool and keep.all() and keep.shape == (11,)


def test_exact_l1_counts_an_overflowed_task_vector_by_its_bits():
    # Inf (exponent field 255, mantissa 0) counts as 2^23 << 254 steps, as the integer mantissa sum always did;
    # its float64 sum is no integer, so that exponent is summed from the bits, and finite entries stay exact
    inf = 2**23 << 254
    assert exact_l1(torch.tensor([float("inf"), 1.0, -float("inf")])) == 2 * inf + 2**149
    assert exact_l1(torch.tensor([3e38, -3e38]).mul(2.0)) == 2 * inf
    # a running sum adds the overflowed entries of every chunk, and nothing added sums to 0
    chunk = torch.tensor([float("inf"), 0.5])
    assert ExactL1().add(chunk).add(chunk).add(torch.ones(3)).steps() == 2 * (inf + 2**148) + 3 * 2**149
    assert ExactL1().steps() == 0
    # NaN (exponent field 255, mantissa bits 0x400000 in torch's quiet NaN) counts its mantissa bits too
    nan = torch.tensor([float("nan")])
    assert nan.view(torch.int32).item() & 0x7FFFFF == 0x400000
    assert exact_l1(nan) == (0x400000 | 2**23) << 254


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 1.0, -0.5, 3.0e38, -2.0**-149, 2.0**-126, 1.5e-7, float("inf")]),
                min_size=1, max_size=64), st.integers(0, 2**32 - 1))
def test_exact_l1_of_the_kept_entries_from_one_scatter(values, seed):
    """ExactL1.add(x, kept, subset): self gets sum |x| and subset sum |x| over the kept entries, the integers
    exact_l1 gives for x and for x with the dropped entries zeroed (infinite entries included), in any chunking."""
    x = torch.tensor(values, dtype=torch.float32)
    kept = torch.rand(x.numel(), generator=torch.Generator().manual_seed(seed)) < 0.5
    whole, subset = ExactL1(), ExactL1()
    cut = x.numel() // 3
    whole.add(x[:cut], kept=kept[:cut], subset=subset).add(x[cut:], kept=kept[cut:], subset=subset)
    assert whole.steps() == exact_l1(x)
    assert subset.steps() == exact_l1(torch.where(kept, x, torch.zeros_like(x)))


@pytest.mark.parametrize("contiguous", [True, False])
def test_mul_mask_is_mul_by_the_boolean_mask_bit_for_bit(contiguous):
    """By blocks of BLOCK entries (here 5, so blocks cut rows), the same bits as x.mul_(keep): signed zeros where
    a negative entry is dropped included; a non-contiguous x goes whole."""
    from mergebench.core import merge_ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 6, generator=g)
    keep = torch.rand(7, 6, generator=g) > 0.4
    want = x.clone().mul_(keep)
    old = merge_ops.BLOCK
    merge_ops.BLOCK = 5
    try:
        got = x.clone() if contiguous else x.clone().T.contiguous().T
        out = merge_ops.mul_mask_(got, keep)
    finally:
        merge_ops.BLOCK = old
    assert out is got and torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))


def test_ordered_map_yields_in_order_each_item_on_one_torch_thread_and_few_ahead():
    """Items finish out of order (the first sleeps longest) and come back in order; each runs with one torch thread
    (the bits of BLAS and LAPACK may depend on it); at most ``threads`` are started ahead of the caller."""
    import threading
    import time

    from mergebench.core import merge_ops

    started: list[int] = []
    lock = threading.Lock()

    def fn(i):
        with lock:
            started.append(i)
        time.sleep(0.02 * (6 - i))
        return i, torch.get_num_threads()

    seen = []
    for i, threads in merge_ops.ordered_map(fn, list(range(6)), 2):
        with lock:
            seen.append((i, threads, len(started)))
    assert [i for i, _, _ in seen] == list(range(6)) and {t for _, t, _ in seen} == {1}
    assert all(n <= i + 2 for i, _, n in seen)  # when item i is handed over, at most items 0 .. i + 1 have started
    assert list(merge_ops.ordered_map(lambda i: i * i, [3, 1, 2], 1)) == [9, 1, 4]  # one thread: a plain map
