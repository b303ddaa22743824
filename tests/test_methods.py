"""The four paper methods and the shared helpers, on hand-computed tensors and against a naive reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergebench.core.analysis import MagnitudeThreshold, run_analysis
from mergebench.core.context import TensorContext
from mergebench.core.plugin_manager import make_plugin_manager
from mergebench.core.merge_ops import (disjoint_mean, drop_and_rescale_, elect_sign, keep_count, magnitude_mask,
                                       threshold_mask)

T = torch.tensor


@pytest.fixture(scope="module")
def pm():
    """Module-scoped (hypothesis re-runs a test body many times with one fixture value)."""
    return make_plugin_manager(entry_points=False)


def run(pm, method, base, experts, weights=None, seed=0, analysis=None, **params):
    m = pm.merge_methods().get(method)
    ctx = TensorContext("w", tuple(weights or [1.0] * len(experts)), seed, analysis)
    return m.merge(None if base is None else base.clone(), [e.clone() for e in experts], m.resolve_params(params), ctx)


# ---- shared helpers, by hand -------------------------------------------------------------------

def test_keep_count_rounds_half_up():
    assert keep_count(0.2, 10) == 2
    assert keep_count(0.25, 10) == 3  # 2.5 rounds up (Python's round() would give 2)
    assert keep_count(0.2, 2) == 0
    assert keep_count(1.0, 7) == 7 and keep_count(0.0, 7) == 0


def test_magnitude_mask_keeps_top_k_and_breaks_ties_by_index():
    x = T([0.5, -3.0, 1.0, -1.0, 1.0, 0.0])
    assert magnitude_mask(x, 1).tolist() == [False, True, False, False, False, False]
    # |1.0| appears three times at the threshold; the first two by index win
    assert magnitude_mask(x, 3).tolist() == [False, True, True, True, False, False]
    assert magnitude_mask(x, 0).sum() == 0 and magnitude_mask(x, 6).all()



@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.integers(-4, 4), min_size=1, max_size=60), k=st.integers(0, 60), chunk=st.integers(1, 9),
       shape2d=st.booleans())
def test_magnitude_mask_by_chunks_is_the_top_k_with_ties_by_index(values, k, chunk, shape2d):
    """Chunked passes (magnitude_mask streams as the engine does): the k largest |x|, ties by flat index, which
    a stable sort by descending |x| gives directly."""
    import mergebench.core.merge_ops as merge_ops

    x = torch.tensor(values, dtype=torch.float32) / 2
    if shape2d and len(values) % 2 == 0:
        x = x.view(2, -1)
    order = sorted(range(x.numel()), key=lambda i: -abs(float(x.reshape(-1)[i])))  # stable: ties by index
    want = torch.zeros(x.numel(), dtype=torch.bool)
    want[order[:k]] = True
    old = merge_ops.BLOCK
    merge_ops.BLOCK = chunk
    try:
        got = magnitude_mask(x, k)
    finally:
        merge_ops.BLOCK = old
    assert got.shape == x.shape and torch.equal(got.reshape(-1), want)

def test_threshold_mask_keeps_above_and_first_ties():
    x = T([[2.0, 1.0], [-1.0, 0.5]])
    mask, used = threshold_mask(x, 1.0, 1)
    assert mask.tolist() == [[True, True], [False, False]] and used == 1
    mask, used = threshold_mask(x, 1.0, 5)
    assert mask.tolist() == [[True, True], [True, False]] and used == 2
    assert threshold_mask(x, 1.0, 0)[0].tolist() == [[True, False], [False, False]]


def test_elect_sign_and_disjoint_mean_by_hand():
    a, b, c = T([1.0, -2.0, 0.0, 3.0]), T([2.0, 1.0, 0.0, -3.0]), T([-4.0, -1.0, 0.0, 0.0])
    sign = elect_sign([a, b, c], [1.0, 1.0, 1.0])
    # sums: -1, -2, 0, 0
    assert sign.tolist() == [-1.0, -1.0, 0.0, 0.0]
    merged = disjoint_mean([a, b, c], [1.0, 1.0, 1.0], sign)
    # elem 0: only c agrees (-4); elem 1: a and c agree (-2, -1) -> -1.5; elems 2, 3: nobody agrees with 0
    assert merged.tolist() == [-4.0, -1.5, 0.0, 0.0]


def test_weighted_disjoint_mean_divides_by_agreeing_weights():
    a, b = T([1.0, 2.0]), T([3.0, -1.0])
    sign = elect_sign([a, b], [1.0, 3.0])  # 1+9=10 -> +; 2-3=-1 -> -
    assert sign.tolist() == [1.0, -1.0]
    assert disjoint_mean([a, b], [1.0, 3.0], sign).tolist() == [(1 * 1 + 3 * 3) / 4, -1.0]


def test_magnitude_threshold_radix_select_equals_sorting():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(10_000, generator=g) * 8).round() / 8  # many exact ties
    for k in (1, 37, 2_000, 9_999):
        analysis = MagnitudeThreshold(k / 10_000, 1)
        (threshold, ties), = run_analysis(analysis, "x", None, [x])
        kth = x.abs().sort(descending=True).values[k - 1]
        assert threshold == float(kth)
        assert int((x.abs() > kth).sum()) + ties == k


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of the tensors reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return _tensor_bytes(vars(obj), seen)
    return 0


def test_magnitude_threshold_holds_histograms_when_a_bucket_holds_many_entries():
    """A bf16 task vector takes few distinct values, so the bucket that holds the k-th magnitude can hold a
    large part of a tensor: its entries' low bits become one histogram per tensor and expert, not a copy of
    them (0.1B breadcrumbs at N = 8 held 0.4 GiB of them), and the counts of ties stay exact across chunks and
    tensors."""
    g = torch.Generator().manual_seed(1)
    n, chunk = 1 << 21, 1 << 18
    tensors = {name: (torch.randint(-3, 4, (n,), generator=g).float() * 2 ** -9) for name in ("a", "b")}
    for k in (n // 3, n + n // 5):  # the threshold's bucket: 2/7 of the entries of both tensors (|x| takes 4 values)
        analysis = MagnitudeThreshold(None, 1, k=k)
        held = 0
        for p in range(analysis.passes):
            for name, x in tensors.items():
                for start in range(0, n, chunk):
                    analysis.observe(p, name, None, [x[start:start + chunk]])
            held = max(held, _tensor_bytes(analysis))
            analysis.end_pass(p)
        assert held < 4 * (1 << 16) * 8, held  # histograms only: raw low bits would be 2**21 x 2/7 x 4 B per tensor
        whole = torch.cat(list(tensors.values())).abs()
        kth = whole.sort(descending=True).values[k - 1]
        (threshold, ties_a), = analysis.result_for("a")
        (_, ties_b), = analysis.result_for("b")
        assert threshold == float(kth)
        assert int((whole > kth).sum()) + ties_a + ties_b == k
        equal_a = int((tensors["a"].abs() == kth).sum())
        assert ties_a == min(equal_a, k - int((whole > kth).sum()))  # the earliest tensor by name first


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6), data=st.data())
def test_a_drawn_mask_gives_any_span_of_its_chunks(sizes, data):
    """The pre-pass's per-chunk masks read back by span: a drawn chunk itself where the span is one, else the
    flags of the joined chunks."""
    from mergebench.core.analysis import DrawnMask

    g = torch.Generator().manual_seed(len(sizes))
    chunks = [torch.rand(n, generator=g) < 0.5 for n in sizes]
    whole = torch.cat(chunks)
    mask = DrawnMask(chunks)
    offset = data.draw(st.integers(0, whole.numel() - 1))
    n = data.draw(st.integers(0, whole.numel() - offset))
    assert torch.equal(mask.span(offset, n), whole[offset:offset + n])
    start = sum(sizes[:2]) if len(sizes) > 2 else 0
    one = sizes[2] if len(sizes) > 2 else sizes[0]
    assert mask.span(start, one) is chunks[2 if len(sizes) > 2 else 0]  # no copy
    empty = DrawnMask([torch.zeros(0, dtype=torch.bool)])  # an empty tensor's one chunk, as its pre-pass records it
    assert empty.span(0, 0).numel() == 0


def test_random_keep_mask_is_chunk_invariant():
    from mergebench.core.merge_ops import random_keep_mask

    whole = random_keep_mask(1001, 0.3, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    parts = torch.cat([random_keep_mask(n, 0.3, g) for n in (100, 500, 401)])
    assert torch.equal(whole, parts)


def test_drop_and_rescale_keeps_expected_fraction_and_rescales():
    x = torch.ones(100_000)
    g = torch.Generator().manual_seed(0)
    out = drop_and_rescale_(x, 0.3, g)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))
    assert abs(out.mean().item() - 1.0) < 0.03  # unbiased in expectation


# ---- the methods, by hand ------------------------------------------------------------------------

def test_average_by_hand(pm):
    out = run(pm, "average", None, [T([1.0, 2.0]), T([3.0, 6.0])], weights=[1.0, 3.0])
    assert out.tolist() == [2.5, 5.0]


def test_task_arithmetic_by_hand(pm):
    base = T([1.0, 1.0])
    out = run(pm, "task_arithmetic", base, [T([2.0, 0.0]), T([3.0, 1.0])], weights=[1.0, 2.0], **{"lambda": 0.5})
    # tau = [1,-1], [2,0]; weighted sum = [5,-1]; base + 0.5*that
    assert out.tolist() == [3.5, 0.5]


def test_ties_by_hand(pm):
    base = T([0.0, 0.0, 0.0, 0.0, 0.0])
    e1 = T([4.0, -1.0, 0.5, 2.0, -3.0])
    e2 = T([-5.0, 2.0, 0.2, 1.0, 3.0])
    out = run(pm, "ties", base, [e1, e2], density=0.6, **{"lambda": 1.0})
    # k = 3: e1 keeps 4, 2, -3; e2 keeps -5, 2, 3 -> trimmed e1=[4,0,0,2,-3], e2=[-5,2,0,0,3]
    # signs: sum=[-1,2,0,2,0] -> [-,+,0,+,0]; agreeing means: [-5, 2, 0, 2, 0]
    assert out.tolist() == [-5.0, 2.0, 0.0, 2.0, 0.0]
    half = run(pm, "ties", base + 1, [e1 + 1, e2 + 1], density=0.6, **{"lambda": 0.5})
    assert half.tolist() == [-1.5, 2.0, 1.0, 2.0, 1.0]


def test_dare_ties_by_hand_with_known_mask(pm):
    base = torch.zeros(6)
    e1, e2 = T([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), T([-1.0, 2.0, -1.0, 2.0, -1.0, 2.0])
    ctx = TensorContext("w", (1.0, 1.0), seed=7)
    # two 16-bit uniforms per 32-bit draw; keep when u < density * 65536
    words = [torch.randint(-(2**31), 2**31, (3,), generator=ctx.generator_for(t), dtype=torch.int32) for t in (0, 1)]
    uniforms = [(w.view(torch.int16).to(torch.int64) + 32768) for w in words]
    keep1, keep2 = (uniforms[0] < 32768).float(), (uniforms[1] < 32768).float()
    t1, t2 = e1 * keep1 / 0.5, e2 * keep2 / 0.5
    expected = disjoint_mean([t1, t2], [1.0, 1.0], torch.sign(t1 + t2))
    out = run(pm, "dare_ties", base, [e1, e2], seed=7, density=0.5)
    assert torch.allclose(out, expected, rtol=1e-6)
    assert not torch.equal(out, run(pm, "dare_ties", base, [e1, e2], seed=8, density=0.5))


# ---- invariants ----------------------------------------------------------------------------------

vectors = st.lists(st.integers(-8, 8), min_size=1, max_size=12).map(lambda v: torch.tensor(v, dtype=torch.float32) / 4)


@settings(max_examples=60, deadline=None)
@given(e=vectors, n=st.integers(1, 4))
def test_average_of_identical_experts_is_that_expert(pm, e, n):
    assert torch.equal(run(pm, "average", None, [e] * n), e)


@settings(max_examples=60, deadline=None)
@given(b=vectors, data=st.data())
def test_task_arithmetic_lambda_zero_is_base(pm, b, data):
    e = data.draw(st.lists(st.integers(-8, 8), min_size=len(b), max_size=len(b)))
    assert torch.equal(run(pm, "task_arithmetic", b, [T(e, dtype=torch.float32)], **{"lambda": 0.0}), b)


@settings(max_examples=60, deadline=None)
@given(b=vectors, data=st.data())
def test_ties_density_one_single_expert_is_that_expert(pm, b, data):
    e = T(data.draw(st.lists(st.integers(-8, 8), min_size=len(b), max_size=len(b))), dtype=torch.float32) / 4
    assert torch.equal(run(pm, "ties", b, [e], density=1.0), e)


@settings(max_examples=60, deadline=None)
@given(b=vectors, data=st.data(), seed=st.integers(0, 2**31))
def test_dare_ties_density_one_equals_ties_density_one(pm, b, data, seed):
    n = data.draw(st.integers(1, 4))
    es = [T(data.draw(st.lists(st.integers(-8, 8), min_size=len(b), max_size=len(b))), dtype=torch.float32) / 4
          for _ in range(n)]
    assert torch.equal(run(pm, "dare_ties", b, es, seed=seed, density=1.0), run(pm, "ties", b, es, density=1.0))


# ---- TIES against a naive element-by-element reference -------------------------------------------

def naive_ties(base, experts, weights, density, lam, global_k=None):
    """Straight from the definition, in plain Python (no shared code with the implementation)."""
    n = len(base)
    taus = [[e[i] - base[i] for i in range(n)] for e in experts]
    trimmed = []
    for t_idx, tau in enumerate(taus):
        k = int(density * n + 0.5) if global_k is None else global_k[t_idx]
        order = sorted(range(n), key=lambda i: (-abs(tau[i]), i))
        keep = set(order[:k])
        trimmed.append([tau[i] if i in keep else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        s = sum(w * tr[i] for w, tr in zip(weights, trimmed))
        sign = (s > 0) - (s < 0)
        agree = [(w, tr[i]) for w, tr in zip(weights, trimmed) if tr[i] != 0 and ((tr[i] > 0) - (tr[i] < 0)) == sign]
        mean = sum(w * v for w, v in agree) / sum(w for w, _ in agree) if agree and sign else 0.0
        out.append(base[i] + lam * mean)
    return out


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_ties_matches_naive_reference(pm, data):
    size = data.draw(st.integers(1, 16))
    n = data.draw(st.integers(1, 5))
    ints = st.lists(st.integers(-6, 6), min_size=size, max_size=size)
    base = [v / 2 for v in data.draw(ints)]
    experts = [[v / 2 for v in data.draw(ints)] for _ in range(n)]
    weights = [float(data.draw(st.sampled_from([1, 2, 4]))) for _ in range(n)]
    density = data.draw(st.sampled_from([0.1, 0.2, 0.25, 0.5, 0.8, 1.0]))
    lam = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    got = run(pm, "ties", T(base), [T(e) for e in experts], weights=weights, density=density, **{"lambda": lam})
    want = naive_ties(base, experts, weights, density, lam)
    assert torch.allclose(got, T(want), atol=1e-6), (got.tolist(), want)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_global_trim_matches_naive_whole_model_top_k(pm, data):
    """trim_scope=global over two tensors equals per-element TIES with a whole-model top-k."""
    sizes = [data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))]
    n = data.draw(st.integers(1, 3))
    density = data.draw(st.sampled_from([0.1, 0.3, 0.5, 1.0]))

    def draw(size):
        return [v / 2 for v in data.draw(st.lists(st.integers(-6, 6), min_size=size, max_size=size))]

    bases = [draw(s) for s in sizes]
    experts = [[draw(s) for s in sizes] for _ in range(n)]  # experts[t][tensor]
    names = ["a", "b"]
    analysis = MagnitudeThreshold(density, n)
    for p in range(analysis.passes):
        for j, name in enumerate(names):
            analysis.observe(p, name, T(bases[j]), [T(experts[t][j]) for t in range(n)])
        analysis.end_pass(p)
    got = [run(pm, "ties", T(bases[j]), [T(experts[t][j]) for t in range(n)], analysis=analysis.result_for(name),
               density=density, trim_scope="global").tolist() for j, name in enumerate(names)]
    # naive: concatenate the two tensors (in name order) and trim the whole vector at once
    flat_base = bases[0] + bases[1]
    flat_experts = [experts[t][0] + experts[t][1] for t in range(n)]
    k = int(density * len(flat_base) + 0.5)
    want = naive_ties(flat_base, flat_experts, [1.0] * n, density, 1.0, global_k=[k] * n)
    assert torch.allclose(T(got[0] + got[1]), T(want), atol=1e-6), (got, want)


def test_random_keep_mask_keeps_everything_at_density_one_and_nothing_at_zero():
    """The threshold 32768 does not fit in int16: density 1 must not wrap around to 'keep nothing'."""
    from mergebench.core.merge_ops import random_keep_mask

    g = torch.Generator().manual_seed(0)
    assert bool(random_keep_mask(1001, 1.0, g).all())
    assert not bool(random_keep_mask(1001, 0.0, g).any())
    kept = random_keep_mask(200_000, 0.25, g).float().mean().item()
    assert abs(kept - 0.25) < 0.005


# ---- every whole-tensor method: the thread count does not change the bits -----------------------------------

def _whole_tensor_methods():
    pm = make_plugin_manager(entry_points=False)
    return sorted(m.name for m in pm.merge_methods() if not m.elementwise and m.calibration is None)


@pytest.mark.parametrize("name", _whole_tensor_methods())
def test_a_whole_tensor_methods_bits_do_not_depend_on_the_thread_count(pm, name):
    """The engine merges a tensor of the largest size on every worker's cores (intra-op threads) and the others on
    one, and sweeps merge in memory on several: the maths must give the same bits on 1 and 2 threads. At 2**20
    entries torch splits reductions (and BLAS its dot products) across threads; karcher's ``torch.dot`` gave
    outputs 1e-6 apart here."""
    from concurrent.futures import ThreadPoolExecutor

    from mergebench.core.merge_ops import set_torch_threads

    m = pm.merge_methods().get(name)
    n = 1 if name in ("slerp", "nearswap", "arcee_fusion") else 2 if name == "nuslerp" else 3
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2048, 512, generator=g)
    experts = [base + 0.01 * torch.randn(base.shape, generator=g) for _ in range(n)]
    params = m.resolve_params({})

    def merge(threads):
        set_torch_threads(threads)  # as the engine's workers do
        ctx = TensorContext("w", (1.0,) * n, seed=0, streams=tuple(range(n)))
        return m.merge(base.clone() if not m.ignores_base else None, [e.clone() for e in experts], params, ctx)

    with ThreadPoolExecutor(1) as pool:  # the main thread's count stays as it is
        one, two = pool.submit(merge, 1).result(), pool.submit(merge, 2).result()
    assert torch.equal(one, two), f"{name}: max |difference| {float((one - two).abs().max()):.3g} between 1 and 2 threads"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_scaled_merge_is_base_plus_lambda_delta_in_deltas_memory(dtype):
    """merge = theta_0 + lambda * delta, torch.add's bits and dtype, written into delta's own result where that holds
    the result's dtype (no extra copy of the tensor), a new tensor otherwise (a bfloat16 delta gives float32)."""
    from mergebench.core.registry import MergeMethod, Param

    g = torch.Generator().manual_seed(2)
    base = torch.randn(33, 7, generator=g)
    made = []

    def delta(b, experts, params, ctx):
        made.append(sum(e - b for e in experts).to(dtype))
        return made[-1]

    m = MergeMethod(name="scaled", description="", params=(Param("lam", float, 1.0, ""),), delta=delta,
                    scale_param="lam")
    experts = [base + torch.randn(33, 7, generator=g) for _ in range(2)]
    out = m.merge(base, experts, {"lam": 0.3}, TensorContext("w", (1.0, 1.0)))
    want = torch.add(base, sum(e - base for e in experts).to(dtype), alpha=0.3)
    assert out.dtype == want.dtype and torch.equal(out, want)
    assert (out is made[0]) == (dtype != torch.bfloat16)  # float32 + float64 is float64: into delta's result too
