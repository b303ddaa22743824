"""On a CUDA GPU, the merge maths and the engine keep GPU tensors on the GPU and give the CPU's numbers (issue 16's
mutation testing: the device mutants of docs/testing.md, which a CPU cannot tell from the original). Skipped
without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import load_dir, method_plugin, write_model

import mergebench
from mergebench.core.merge_ops import exact_l1, random_drop_, random_keep_mask
from mergebench.plugins.task_vectors import magprune_probabilities

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_merge_ops_on_gpu_tensors_agree_with_the_cpu():
    tau = torch.randn(1001, generator=_gen(0)) * 3
    dropped = random_drop_(tau.cuda(), 0.3, _gen(1))
    assert dropped.is_cuda and torch.equal(dropped.cpu(), random_drop_(tau.clone(), 0.3, _gen(1)))
    assert exact_l1(tau.cuda()) == exact_l1(tau) > 0
    p = torch.rand(1001, generator=_gen(2))
    keep = random_keep_mask(1001, p.cuda(), _gen(3))
    assert torch.equal(keep.cpu(), random_keep_mask(1001, p, _gen(3)))
    x = torch.randn(7, 9, generator=_gen(4))
    assert torch.allclose(magprune_probabilities(x.cuda(), 0.5, 0.2).cpu(), magprune_probabilities(x, 0.5, 0.2),
                          rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-models")
    g = _gen(5)
    base = {"w": torch.randn(48, 40, generator=g), "b": torch.randn(40, generator=g),
            "ids": torch.arange(6)}
    write_model(root / "base", base)
    for t in range(3):
        write_model(root / f"e{t}", {"w": base["w"] + torch.randn(48, 40, generator=g) * 0.1,
                                     "b": base["b"] + torch.randn(40, generator=g) * 0.1, "ids": torch.arange(6)})
    return root


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3}), ("ties", {"density": 0.3, "trim_scope": "global"}),
    ("dare_ties", {"density": 0.4}), ("dare_linear", {"density": 0.4, "rescale": "l1"}),
    ("della", {"density": 0.5, "epsilon": 0.2}), ("della_linear", {"density": 0.5, "rescale": "l1"}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}), ("average", {}),
])
def test_a_merge_on_the_gpu_writes_the_cpu_merge(models, tmp_path, pm, method, params):
    out = {}
    for device in ("cpu", "cuda"):
        mergebench.merge(method, base=models / "base", experts=[models / f"e{t}" for t in range(3)],
                         output=tmp_path / device, device=device, seed=3, plugin_manager=pm, **params)
        out[device] = load_dir(tmp_path / device)
    assert set(out["cuda"]) == {"w", "b", "ids"}
    for name, tensor in out["cpu"].items():
        torch.testing.assert_close(out["cuda"][name], tensor, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("elementwise", [True, False])
def test_the_engine_hands_the_method_gpu_tensors(models, tmp_path, pm, elementwise):
    from mergebench.core.registry import MergeMethod

    seen = set()

    def mean(base, experts, params, ctx):
        seen.update(x.device.type for x in [base, *experts])
        return sum(experts) / len(experts)

    pm.register(method_plugin(MergeMethod(name="gpumean", description="", merge=mean, elementwise=elementwise)))
    mergebench.merge("gpumean", base=models / "base", experts=[models / f"e{t}" for t in range(3)],
                     output=tmp_path / "out", device="cuda", plugin_manager=pm)
    assert seen == {"cuda"}
    out, experts = load_dir(tmp_path / "out"), [load_dir(models / f"e{t}") for t in range(3)]
    torch.testing.assert_close(out["w"], sum(e["w"] for e in experts) / 3, rtol=1e-6, atol=1e-6)
