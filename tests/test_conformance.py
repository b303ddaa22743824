"""The conformance kit (mergebench.core.conformance, ``mergebench plugin check``): every built-in method
passes it, and each deliberately broken method below fails exactly the invariant it breaks."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch
from click.testing import CliRunner

from mergebench import MergeMethod, Param, hookimpl
from mergebench.cli.main import cli
from mergebench.core import plugin_manager
from mergebench.core.conformance import INVARIANTS, assert_conforms, check_method
from mergebench.core.errors import ParameterError
from mergebench.core.merge_ops import task_vectors_, weighted_sum

BUILTINS = plugin_manager.make_plugin_manager(entry_points=False).merge_methods().names()


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_method_conforms(name, pm):
    report = assert_conforms(name, pm)
    assert [r.name for r in report.results] == list(INVARIANTS)
    speed = report.result("speed")  # measured, unless the method learns from data the kit does not have
    assert report.expert_counts and (speed.status == "info" or "calibration data" in speed.detail)


# ---- deliberately broken methods: each breaks one invariant ---------------------------------------------

def _mean(base, experts, params, ctx):
    return weighted_sum(experts, ctx.weights).div_(sum(ctx.weights))


def _global_rng_dare(base, experts, params, ctx):
    """DARE drawing its masks from torch's global generator instead of ctx.generator_for(i)."""
    taus = task_vectors_(base, experts)
    for tau in taus:
        tau.mul_(torch.rand(tau.shape) < 0.5)
    return base + weighted_sum(taus, ctx.weights) / 0.5


def _chunk_centred(base, experts, params, ctx):
    """Task arithmetic centred on the median of what it sees: a chunk's median, not the tensor's. (A mean
    would also fail in_memory_vs_engine: torch splits a large reduction across threads.)"""
    tau = weighted_sum(task_vectors_(base, experts), ctx.weights)
    return base + (tau - tau.median())


def _task_arithmetic(base, experts, params, ctx):
    return torch.add(base, weighted_sum(task_vectors_(base, experts), ctx.weights), alpha=params["lambda"])


def _halving(base, experts, params, ctx):
    """Task arithmetic that writes its scale back into params: each later call with that dict gets half the last's."""
    params["lambda"] = scale = params["lambda"] / 2
    return torch.add(base, weighted_sum(task_vectors_(base, experts), ctx.weights), alpha=scale)


def _transposed(base, experts, params, ctx):
    return _mean(base, experts, params, ctx).t()


def _unsigned_geometric_mean(base, experts, params, ctx):
    """exp(mean(log x)): NaN wherever an expert's entry is negative."""
    return torch.stack(experts).log().mean(0).exp()


def _per_thread_partial_sums(base, experts, params, ctx):
    """The experts' mean summed as one partial sum per torch thread: its rounding follows the thread count."""
    k = torch.get_num_threads()
    partials = [weighted_sum(experts[j::k], ctx.weights[j::k]) for j in range(min(k, len(experts)))]
    return weighted_sum(partials, [1.0] * len(partials)).div_(sum(ctx.weights))


def _task_arithmetic_plus_offset(base, experts, params, ctx):
    """Task arithmetic plus a constant: all-equal inputs do not give the input back."""
    return weighted_sum(task_vectors_(base, experts), ctx.weights).add_(base).add_(1e-3)


def _doubled_optional_base(base, experts, params, ctx):
    """The mean, or, given a base, base + 2 (mean - base): equal experts do not give that expert."""
    mean = _mean(base, experts, params, ctx)
    return mean if base is None else base + 2 * (mean - base)


def _first_counts_twice(base, experts, params, ctx):
    """A mean in which expert 1 counts twice whatever the weights say."""
    return (weighted_sum(experts, ctx.weights) + experts[0]) / (len(experts) + 1)


def _undeclared_random(base, experts, params, ctx):
    """Drops half the merged task vector with ctx's random stream but is not declared stochastic."""
    tau = weighted_sum(task_vectors_(base, experts), ctx.weights)
    return base + tau * (torch.rand(tau.shape, generator=ctx.generator_for(0)) < 0.5)


def _worker_dependent(base, experts, params, ctx):
    """Task arithmetic whose scale depends on which engine worker thread runs it (a per-worker setting that only
    the first worker has). Pool threads sleep so that the engine starts its second worker."""
    worker = threading.current_thread().name
    if worker != "MainThread":
        time.sleep(0.05)
    scale = 0.5 if re.search(r"_[1-9]\d*$", worker) else 1.0
    return torch.add(base, weighted_sum(task_vectors_(base, experts), ctx.weights), alpha=scale)


def _late_refusal(base, experts, params, ctx):
    if len(experts) < 2:
        raise ParameterError("needs two experts")
    return _mean(base, experts, params, ctx)


def _raises(base, experts, params, ctx):
    raise RuntimeError("boom\nsecond line")


def _swap_check(params, weights):
    if len(weights) != 1:
        raise ParameterError(f"takes exactly one expert besides the base, got {len(weights)}")


def _near_swap(base, experts, params, ctx):
    """A two-model method that conforms: each entry moves a fraction t from the base towards the other model."""
    return torch.lerp(base, experts[0], params["t"])


LAMBDA = Param("lambda", float, 1.0, "scale", min=0.0, max=10.0)
BROKEN = {  # name -> (the invariant it breaks, words its one-line detail says, its declaration)
    "global_rng": ("deterministic", "a second run with seed 0 differs", dict(merge=_global_rng_dare, stochastic=True)),
    "chunk_centred": ("chunking", "chunks of 2 vs whole tensors", dict(merge=_chunk_centred, elementwise=True)),
    "halving": ("inputs_unchanged", "changed params['lambda'] from 1.0 to 0.5", dict(merge=_halving, params=(LAMBDA,))),
    "transposed": ("shape_and_dtype", "returned torch.float32 [5, 7] on cpu, expected torch.float32 [7, 5]",
                   dict(merge=_transposed, needs_base=False)),
    "raises": ("shape_and_dtype", "merge raised RuntimeError: boom second line", dict(merge=_raises)),
    "nan_mean": ("finite_output", "are NaN or Inf", dict(merge=_unsigned_geometric_mean, needs_base=False,
                                                        elementwise=True)),
    "bad_default": ("parameters", ("default of 'lambda' is not a valid value: parameter 'lambda' of bad_default "
                                   "must be in [0.0, 1.0], got 2.0"), dict(merge=_task_arithmetic, params=(
                        Param("lambda", float, 2.0, "scale", min=0.0, max=1.0),))),
    "per_thread": ("in_memory_vs_engine", "N=3, float32 models, in memory vs engine",
                   dict(merge=_per_thread_partial_sums, needs_base=False, elementwise=True)),
    "offset": ("identity", "all inputs equal to x do not give x", dict(merge=_task_arithmetic_plus_offset,
                                                                      elementwise=True)),
    "doubled_base": ("equal_experts", "with base: equal experts do not give that expert",
                     dict(merge=_doubled_optional_base, needs_base=False)),
    "first_twice": ("permutation", "experts in order [3, 2, 1] change the merge",
                    dict(merge=_first_counts_twice, needs_base=False, elementwise=True)),
    "undeclared_random": ("seed", "not declared stochastic, but seed 1 changes the output",
                          dict(merge=_undeclared_random)),
    "worker_dependent": ("threads", "models, N=3, 2 threads vs 1", dict(merge=_worker_dependent)),
    "late_refusal": ("expert_counts", "check accepts N=1 but the maths refuses it (needs two experts)",
                     dict(merge=_late_refusal)),
}


class BrokenMethods:
    """A test plugin registering every method of BROKEN, and one conforming two-model method."""

    @hookimpl
    def register_merge_methods(self, register):
        for name, (_, _, declared) in BROKEN.items():
            register(MergeMethod(name=name, description=f"broken: {name}", **declared))
        register(MergeMethod(name="near_swap", description="t of the way from the base to the other model.",
                             params=(Param("t", float, 0.5, "fraction", min=0.0, max=1.0),), merge=_near_swap,
                             check=_swap_check, elementwise=True, search_space={"t": (0.25, 0.5)}))


@pytest.fixture
def broken_pm(pm):
    pm.register(BrokenMethods(), name="broken")
    return pm


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_method_fails_exactly_the_invariant_it_breaks(name, broken_pm):
    invariant, words, _ = BROKEN[name]
    report = check_method(name, broken_pm)
    assert [r.name for r in report.failures] == [invariant], [(r.name, r.detail) for r in report.failures]
    detail = report.failures[0].detail
    assert words in detail and "\n" not in detail and "Traceback" not in detail, detail
    assert not report.ok


def test_skips_name_the_invariant_that_failed(broken_pm):
    report = check_method("global_rng", broken_pm)
    for name in ("seed", "permutation", "threads", "in_memory_vs_engine"):
        assert report.result(name).status == "skip" and "see deterministic" in report.result(name).detail
    assert report.result("identity").status == "pass"  # judged without a second run
    report = check_method("transposed", broken_pm)
    assert {r.name for r in report.results if r.status == "skip"} == set(INVARIANTS) - {
        "parameters", "expert_counts", "shape_and_dtype"}


def test_a_two_model_method_is_checked_with_one_expert(broken_pm):
    report = assert_conforms("near_swap", broken_pm)
    assert report.expert_counts == (1,)
    assert report.result("permutation").status == "skip"
    assert "refuses N = 2" in report.result("expert_counts").detail


def test_an_unregistered_method_object_can_be_checked_and_assert_conforms_lists_failures():
    method = MergeMethod(name="average", description="shadows the built-in name", merge=_transposed,
                         needs_base=False)
    with pytest.raises(AssertionError, match=r"breaks 1 invariant\(s\):\n  shape_and_dtype: tensor 'mlp.weight'"):
        assert_conforms(method)


def test_identity_is_not_required_where_fixed_point_says_equal_inputs_move():
    # the engine calls such a method's maths on equal inputs instead of copying them
    method = MergeMethod(name="offset_declared", description="task arithmetic + 1e-3, declared",
                         merge=_task_arithmetic_plus_offset, elementwise=True, fixed_point=lambda p, w, own: False)
    report = assert_conforms(method)
    assert report.result("identity").status == "skip" and "fixed_point" in report.result("identity").detail


def test_a_data_aware_method_is_checked_for_its_declaration_only():
    method = MergeMethod(name="needs_data", description="learns from data", merge=_raises,
                         check=_swap_check, calibration=lambda params: "a request")
    report = assert_conforms(method)
    assert report.expert_counts == (1,)
    assert [r.name for r in report.results if r.status != "skip"] == ["parameters", "expert_counts"]
    assert "calibration data" in report.result("deterministic").detail


def test_inputs_unchanged_sees_changes_to_the_callers_state_dicts_and_model_files(pm, monkeypatch):
    # no method can reach them today (both paths copy into scratch buffers): break the merge paths instead
    from mergebench.core import api, in_memory

    real_in_memory, real_engine = in_memory.merge, api.merge

    def aliasing_in_memory(method, params, base, experts, *args, **kwargs):
        out = real_in_memory(method, params, base, experts, *args, **kwargs)
        experts[-1]["mlp.bias"].add_(1.0)
        return out

    monkeypatch.setattr(in_memory, "merge", aliasing_in_memory)
    report = check_method("average", pm)
    assert [(r.name, r.detail) for r in report.failures] == [
        ("inputs_unchanged", "in-memory merging changed the caller's state dict (tensor 'mlp.bias')")]
    monkeypatch.setattr(in_memory, "merge", real_in_memory)

    def writing_engine(method, *, experts, **kwargs):
        with open(experts[0] / "config.json", "a") as f:
            f.write(" ")
        return real_engine(method, experts=experts, **kwargs)

    monkeypatch.setattr(api, "merge", writing_engine)
    failures = check_method("average", pm).failures
    assert [r.name for r in failures] == ["inputs_unchanged"] and "config.json changed" in failures[0].detail


def test_an_unknown_name_raises_the_registrys_error(pm):
    with pytest.raises(ParameterError, match="unknown merge method 'avrage'.*did you mean 'average'"):
        check_method("avrage", pm)


# ---- the command ------------------------------------------------------------------------------------------

def test_plugin_check_command_exit_codes_and_table(broken_pm, monkeypatch):
    monkeypatch.setattr(plugin_manager, "_default", broken_pm)
    runner = CliRunner()
    good = runner.invoke(cli, ["plugin", "check", "near_swap"])
    assert good.exit_code == 0, good.output
    for word in ("invariant", "result", "detail", "time", "in_memory_vs_engine", "near_swap: conforms"):
        assert word in good.output

    bad = runner.invoke(cli, ["plugin", "check", "transposed"])
    assert bad.exit_code == 1
    row = next(line for line in bad.output.splitlines() if "shape_and_dtype" in line)
    assert "FAIL" in row and "1 invariant(s) broken" in bad.output and "Traceback" not in bad.output

    as_json = runner.invoke(cli, ["plugin", "check", "nan_mean", "--json"])
    assert as_json.exit_code == 1
    record = json.loads(as_json.stdout)
    assert record["ok"] is False and record["method"] == "nan_mean"
    assert [r["name"] for r in record["results"] if r["status"] == "fail"] == ["finite_output"]

    unknown = runner.invoke(cli, ["plugin", "check", "nope"])
    assert unknown.exit_code == 2
    assert unknown.output.strip().splitlines() == [f"Error: {_unknown_message('nope', broken_pm)}"]


def _unknown_message(name, pm):
    with pytest.raises(ParameterError) as info:
        pm.merge_methods().get(name)
    return str(info.value)
