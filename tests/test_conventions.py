"""Issue 16, point 4: the random and trimming conventions hold end to end, against independent references.

- DARE: every expert draws its keep-mask from its own random stream, keyed by its content (sha256 of the tensor's
  stored bytes, 128 bits); the masks are recomputed here from the documented derivation (sha256 of
  "seed\\0name\\0key" -> CPU generator -> 32-bit words -> two 16-bit uniforms each, low half first),
  without mergebench's helpers, and the merged files must equal the reference whatever the chunk size,
  thread count, expert order (and device, where a GPU exists).
- Trimming (TIES, either scope, and every chunked method): on bf16 data built so that the k-th largest
  magnitude is repeated many times, a merge streamed in tiny chunks equals the whole-tensor merge and a
  naive sort-based reference bit for bit.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import mergebench
from mergebench.core import engine

from conftest import load_dir, write_model

WHOLE = 1 << 18  # the engine's default CPU chunk: every tensor below fits in one chunk
SMALL_CHUNKS = (2, 14, 126)  # even, as the engine requires; they split rows and leave odd tails
TIE_CHUNKS = (14, 126)  # the trimming tests' tensors span 2 to 138 chunks (chunks of 2 only cost time)


# ---- an independent DARE reference ---------------------------------------------------------------

def ref_key(tensor: torch.Tensor) -> str:
    """An expert's stream key for one tensor: the first 32 hex digits of sha256 of its bytes as stored."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


def ref_stream_seed(seed: int, name: str, stream) -> int:
    """The documented derivation: the first 8 bytes (little endian) of sha256("seed\\0name\\0stream"), 63 bits."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (1 << 63)


def ref_keep_mask(seed: int, name: str, stream, numel: int, density: float) -> torch.Tensor:
    """Bernoulli(density) flags of one expert's stream: ceil(numel / 2) uniform 32-bit words, each split
    into two 16-bit uniforms (low half first); keep when uniform < round(density * 2**16)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(ref_stream_seed(seed, name, stream))
    words = torch.randint(-(2**31), 2**31, ((numel + 1) // 2,), generator=g, dtype=torch.int32)
    u32 = words.to(torch.int64) & 0xFFFFFFFF
    halves = torch.stack([u32 & 0xFFFF, u32 >> 16], dim=1).reshape(-1)[:numel]
    # the int16 that the bytes spell, shifted to [0, 2**16): flip the top bit (offset binary)
    uniform = halves ^ 0x8000
    return uniform < round(density * 65536)


def ref_disjoint_mean(taus: list[torch.Tensor], weights) -> torch.Tensor:
    """TIES sign election + disjoint mean from the definition, in float64 (exact on the dyadic data used
    here; a float64 quotient of float32 operands rounds to float32 exactly as a float32 division would)."""
    taus64 = [t.to(torch.float64) for t in taus]
    total = sum(w * t for w, t in zip(weights, taus64))
    sign = torch.sign(total)
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for w, t in zip(weights, taus64):
        agree = (t != 0) & (torch.sign(t) == sign) & (sign != 0)
        num += torch.where(agree, w * t, 0.0)
        den += torch.where(agree, w, 0.0)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0).to(torch.float32)


def ref_dare_ties(base, experts, weights, density, seed, name):
    """theta_0 + (disjoint mean of the masked task vectors) / density, lambda = 1."""
    flat = base.reshape(-1)
    taus = []
    for t, e in enumerate(experts):
        tau = e.reshape(-1).to(torch.float64) - flat.to(torch.float64)
        taus.append(tau * ref_keep_mask(seed, name, ref_key(e), flat.numel(), density))
    merged = ref_disjoint_mean(taus, weights).div_(density)  # the rescale, applied once (a float32 op)
    return (flat.to(torch.float32) + merged).view(base.shape)


DARE_SHAPES = {"enc.weight": (37, 29), "enc.bias": (101,), "head.weight": (16, 64)}  # odd and even sizes


def dyadic(g: torch.Generator, shape, scale: int = 16, span: int = 64) -> torch.Tensor:
    """Values k / scale with |k| <= span: exact in bf16 and float32, so task vectors are exact too."""
    return torch.randint(-span, span + 1, shape, generator=g).to(torch.float32) / scale


@pytest.fixture(scope="module")
def dare_models(tmp_path_factory):
    """A float32 base and three experts whose task vectors mix signs and magnitudes (dyadic, exact)."""
    root = tmp_path_factory.mktemp("dare")
    g = torch.Generator().manual_seed(1234)
    base = {n: dyadic(g, s) for n, s in DARE_SHAPES.items()}
    write_model(root / "base", base)
    experts = []
    for t in range(3):
        e = {n: b + torch.randint(-3, 4, b.shape, generator=g).to(torch.float32) / 4 for n, b in base.items()}
        experts.append(e)
        write_model(root / f"e{t}", e)
    return root, base, experts


def _accepted_experts(method, params) -> int:
    """The most experts (3, 2 or 1) the method's check accepts."""
    from mergebench.core.errors import ParameterError

    for n in (3, 2, 1):
        try:
            if method.check is not None:
                declared = {k: v for k, v in params.items() if k in {p.name for p in method.params}}
                method.check(method.resolve_params(declared), TIE_WEIGHTS[:n])
            return n
        except ParameterError:
            continue
    raise AssertionError(f"{method.name} accepts no expert count")


def _merge(method, root, n, out, pm, weights=None, experts=None, **kwargs):
    experts = experts if experts is not None else [root / f"e{t}" for t in range(n)]
    mergebench.merge(method, base=root / "base", experts=experts, output=out, weights=weights,
                     plugin_manager=pm, **kwargs)
    return load_dir(out)


@pytest.mark.parametrize("density,seed,weights", [(0.5, 0, (1.0, 1.0, 1.0)), (0.3, 7, (1.0, 2.0, 0.5))])
def test_dare_ties_equals_an_independent_mask_reference_at_every_chunk_size(dare_models, tmp_path, pm,
                                                                          monkeypatch, density, seed, weights):
    root, base, experts = dare_models
    want = {n: ref_dare_ties(base[n], [e[n] for e in experts], weights, density, seed, n) for n in base}
    for chunk in SMALL_CHUNKS + (WHOLE,):
        monkeypatch.setattr(engine, "CHUNK", chunk)
        got = _merge("dare_ties", root, 3, tmp_path / f"out-{chunk}", pm, weights=list(weights), seed=seed,
                     density=density)
        for n in base:
            assert torch.equal(got[n], want[n]), (chunk, n, int((got[n] != want[n]).sum()))


@pytest.mark.parametrize("threads", [1, 2])
def test_dare_ties_equals_the_reference_on_one_and_two_threads(dare_models, tmp_path, pm, threads):
    root, base, experts = dare_models
    got = _merge("dare_ties", root, 3, tmp_path / "out", pm, seed=3, density=0.4, threads=threads)
    for n in base:
        assert torch.equal(got[n], ref_dare_ties(base[n], [e[n] for e in experts], (1.0,) * 3, 0.4, 3, n)), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dare_ties_on_cuda_equals_the_cpu_reference(dare_models, tmp_path, pm):
    root, base, experts = dare_models
    got = _merge("dare_ties", root, 3, tmp_path / "out", pm, seed=5, density=0.3, device="cuda")
    for n in base:
        assert torch.equal(got[n], ref_dare_ties(base[n], [e[n] for e in experts], (1.0,) * 3, 0.3, 5, n)), n


# -- recovering each expert's mask from the merged file --
# base = 0 and expert t = 2**t everywhere: with density 1/2 and lambda 1 the merged entry is
# 2 * (sum of 2**t over the kept experts) / (number kept), a different number for each subset of experts.

MASK_SHAPE = (64, 48)


@pytest.fixture(scope="module")
def power_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("powers")
    write_model(root / "base", {"w": torch.zeros(MASK_SHAPE)})
    for t in range(3):
        write_model(root / f"p{t}", {"w": torch.full(MASK_SHAPE, float(2**t))})
    return root


def decode_masks(merged: torch.Tensor, powers: list[int]) -> list[torch.Tensor]:
    """Per position, which experts (with constant task vectors ``powers``) were kept."""
    masks = [torch.zeros(merged.numel(), dtype=torch.bool) for _ in powers]
    flat = merged.reshape(-1)
    decoded = torch.zeros(flat.numel(), dtype=torch.bool)
    for subset in range(1 << len(powers)):
        members = [t for t in range(len(powers)) if subset >> t & 1]
        value = 0.0 if not members else float(
            torch.tensor(sum(powers[t] for t in members) / len(members), dtype=torch.float32) * 2)
        hit = flat == value
        assert not (hit & decoded).any()
        decoded |= hit
        for t in members:
            masks[t] |= hit
    assert decoded.all(), "merged entries that no subset of experts explains"
    return masks


def test_dare_masks_differ_between_experts_and_each_is_its_own_stream(power_models, tmp_path, pm):
    root = power_models
    experts = [root / f"p{t}" for t in range(3)]
    merged = _merge("dare_ties", root, 3, tmp_path / "out", pm, experts=experts, seed=11, density=0.5)["w"]
    masks = decode_masks(merged, [1, 2, 4])
    for a in range(3):
        for b in range(a + 1, 3):
            agreement = (masks[a] == masks[b]).float().mean().item()
            assert 0.4 < agreement < 0.6, (a, b, agreement)  # independent streams agree about half the time
    numel = merged.numel()
    for t, mask in enumerate(masks):
        assert abs(mask.float().mean().item() - 0.5) < 0.05
        key = ref_key(torch.full(MASK_SHAPE, float(2**t)))
        assert torch.equal(mask, ref_keep_mask(11, "w", key, numel, 0.5)), t


def test_dare_mask_belongs_to_the_experts_content_not_to_its_position(power_models, tmp_path, pm):
    """An expert's mask follows its content: the same experts in another order give the same masks and the
    same merged file; an expert keeps its mask whichever other experts it is merged with."""
    root = power_models
    reordered = _merge("dare_ties", root, 3, tmp_path / "a", pm, experts=[root / "p2", root / "p0", root / "p1"],
                       seed=11, density=0.5)["w"]
    straight = _merge("dare_ties", root, 3, tmp_path / "c", pm, experts=[root / f"p{t}" for t in range(3)],
                      seed=11, density=0.5)["w"]
    assert torch.equal(straight, reordered)  # same models, same weights, another order: the same merge
    masks = decode_masks(reordered, [4, 1, 2])
    pair = decode_masks(_merge("dare_ties", root, 2, tmp_path / "b", pm, experts=[root / "p1", root / "p0"],
                               seed=11, density=0.5)["w"], [2, 1])
    numel = reordered.numel()
    for t, power in enumerate([4, 1, 2]):
        key = ref_key(torch.full(MASK_SHAPE, float(power)))
        assert torch.equal(masks[t], ref_keep_mask(11, "w", key, numel, 0.5)), t
    assert torch.equal(pair[0], masks[2]) and torch.equal(pair[1], masks[1])


# ---- trimming on bf16 data with many exact ties at the threshold ----------------------------------

TIE_SHAPES = {"m.mlp.weight": (40, 48), "a.attn.weight": (33, 31), "z.norm": (257,)}  # storage != name order
MAGNITUDES = torch.tensor([0.0, 0.125, 0.25, 0.5])
PROBS = torch.tensor([0.3, 0.4, 0.2, 0.1])  # density 0.2 cuts inside the 0.25s, density 0.35 inside the 0.125s
TIE_WEIGHTS = (1.0, 2.0, 0.5)


def tie_tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    base = {n: dyadic(g, s, scale=16, span=32) for n, s in TIE_SHAPES.items()}
    experts = []
    for _ in range(3):
        e = {}
        for n, b in base.items():
            mag = MAGNITUDES[torch.multinomial(PROBS, b.numel(), replacement=True, generator=g)].view(b.shape)
            sign = torch.randint(0, 2, b.shape, generator=g).to(torch.float32) * 2 - 1
            e[n] = b + sign * mag
        experts.append(e)
    bf = lambda d: {n: t.to(torch.bfloat16) for n, t in d.items()}  # noqa: E731
    for d in [base] + experts:
        for n, t in d.items():
            assert torch.equal(t.to(torch.bfloat16).to(torch.float32), t)  # exact in bf16
    return bf(base), [bf(e) for e in experts]


@pytest.fixture(scope="module")
def tie_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ties")
    base, experts = tie_tensors(99)
    write_model(root / "base", base)
    for t, e in enumerate(experts):
        write_model(root / f"e{t}", e)
    return root, base, experts


def ref_top_k(taus: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep the k largest |tau| over the concatenation of ``taus``; ties go to the earliest entries."""
    flat = torch.cat([t.reshape(-1) for t in taus]).to(torch.float64)
    order = torch.sort(-flat.abs(), stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    assert (flat.abs()[keep].min() if k else 0) >= (flat.abs()[~keep].max() if k < flat.numel() else 0)
    return list(keep.split([t.numel() for t in taus]))


def ref_ties(base, experts, names, density, weights, scope):
    """Naive TIES: k = round half up (density x entries) per tensor, or over the whole model in name order."""
    taus = {n: [e[n].to(torch.float64).reshape(-1) - base[n].to(torch.float64).reshape(-1) for e in experts]
            for n in names}
    keeps = {n: [] for n in names}
    for t in range(len(experts)):
        groups = [[n] for n in names] if scope == "tensor" else [sorted(names)]
        for group in groups:
            vecs = [taus[n][t] for n in group]
            total = sum(v.numel() for v in vecs)
            k = int(density * total + 0.5)
            kth = torch.cat(vecs).abs().sort(descending=True).values[k - 1]
            ties = torch.cat(vecs).abs() == kth
            above = int((torch.cat(vecs).abs() > kth).sum())
            # the data is built so the cut falls inside a run of equal magnitudes: some kept, some dropped
            assert 0 < k - above < int(ties.sum()), (group, t, k, above, int(ties.sum()))
            for n, keep in zip(group, ref_top_k(vecs, k)):
                keeps[n].append(keep)
    out = {}
    for n in names:
        trimmed = [tau * keep for tau, keep in zip(taus[n], keeps[n])]
        merged = ref_disjoint_mean([x.to(torch.float32) for x in trimmed], weights)
        out[n] = (base[n].to(torch.float32).reshape(-1) + merged).to(torch.bfloat16).view(base[n].shape)
    return out


@pytest.mark.parametrize("density,scope", [(0.2, "tensor"), (0.35, "tensor"), (0.2, "global"), (0.35, "global")])
def test_ties_chunked_equals_whole_and_naive_reference_on_bf16_ties(tie_models, tmp_path, pm, monkeypatch,
                                                                     density, scope):
    root, base, experts = tie_models
    want = ref_ties(base, experts, list(TIE_SHAPES), density, TIE_WEIGHTS, scope)
    outputs = {}
    for chunk in (WHOLE,) + TIE_CHUNKS:
        monkeypatch.setattr(engine, "CHUNK", chunk)
        # one thread: tiny chunks through a two-thread pre-pass cost seconds of thread hand-offs on 2 busy cores
        outputs[chunk] = _merge("ties", root, 3, tmp_path / f"out-{chunk}", pm, weights=list(TIE_WEIGHTS),
                                density=density, trim_scope=scope, threads=1)
    for chunk, got in outputs.items():
        for n in TIE_SHAPES:
            assert got[n].dtype == torch.bfloat16
            assert torch.equal(got[n], outputs[WHOLE][n]), (chunk, n, int((got[n] != outputs[WHOLE][n]).sum()))
            assert torch.equal(got[n], want[n]), (chunk, n, int((got[n] != want[n]).sum()))


# Parameters for the chunked-vs-whole check of every registered chunked (elementwise) method; a method
# not listed here runs with its defaults, so a new trimming plugin is covered as soon as it registers.
METHOD_PARAMS = {"ties": {"density": 0.2}, "dare_ties": {"density": 0.3, "seed": 4}}


def test_every_chunked_method_gives_the_whole_tensor_result_on_bf16_ties(tie_models, tmp_path, pm, monkeypatch):
    root, base, _ = tie_models
    methods = [m.name for m in pm.merge_methods() if m.elementwise]
    assert {"ties", "dare_ties"} <= set(methods)
    for method in methods:
        params = METHOD_PARAMS.get(method, {})
        n = _accepted_experts(pm.merge_methods().get(method), params)  # two-model methods take one expert
        outputs = {}
        for chunk in (WHOLE,) + TIE_CHUNKS:
            monkeypatch.setattr(engine, "CHUNK", chunk)
            outputs[chunk] = _merge(method, root, n, tmp_path / f"{method}-{chunk}", pm, weights=list(TIE_WEIGHTS[:n]),
                                    **params)
        changed = 0
        for n in TIE_SHAPES:
            changed += int((outputs[WHOLE][n] != base[n]).sum())
            for chunk in TIE_CHUNKS:
                assert torch.equal(outputs[chunk][n], outputs[WHOLE][n]), (method, chunk, n)
        assert changed > 0, method  # the merge did something
