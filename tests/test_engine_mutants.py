"""Tests written to kill mutmut's surviving mutants of mergebench/core/engine.py (issue 16, point 6).

Each test checks real engine behaviour against an independent expectation (hand-computed values, the
reference safetensors reader, exact error text); docs/testing.md lists the mutants each one kills.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import method_plugin, toy_tensors, write_hub_snapshot, write_model

import mergebench
from mergebench.core import engine
from mergebench.core.errors import InputError, MergebenchError, ParameterError
from mergebench.core.registry import MergeMethod

# --- the writer thread ---------------------------------------------------------------------------


class _RecordingWriter:
    """A ShardWriter stand-in: records writes; the first write blocks until ``release`` is set."""

    def __init__(self):
        self.written: list[str] = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.aborted = self.finished = False

    def write(self, name, tensor):
        if not self.written:
            self.started.set()
            assert self.release.wait(10)
        self.written.append(name)

    def finish(self):
        self.finished = True

    def abort(self):
        self.aborted = True


def test_writer_abort_drops_the_tensors_still_queued():
    """After abort nothing more is written: the queued tensors are dropped, not written to a doomed file."""
    rec = _RecordingWriter()
    w = engine._Writer(rec)
    t = torch.zeros(1)
    w.put("a", t)
    assert rec.started.wait(10)  # the thread is inside write("a")
    w.put("b", t)
    w.put("c", t)  # the queue (size 2) is now full
    aborter = threading.Thread(target=w.abort)
    aborter.start()
    # abort sets the error before it blocks on the full queue; give it time to get there
    for _ in range(200):
        if w.error is not None:
            break
        threading.Event().wait(0.01)
    rec.release.set()
    aborter.join(10)
    assert not aborter.is_alive()
    assert rec.written == ["a"] and rec.aborted and not rec.finished
    assert isinstance(w.error, RuntimeError)


def test_writer_write_error_is_raised_on_the_next_put_and_on_close():
    class Failing(_RecordingWriter):
        def write(self, name, tensor):
            raise OSError(28, "No space left on device")

    rec = Failing()
    w = engine._Writer(rec)
    w.put("a", torch.zeros(1))
    w.thread.join(0.5)  # the thread has failed on "a" and waits for the next item
    for _ in range(200):
        if w.error is not None:
            break
        threading.Event().wait(0.01)
    with pytest.raises(OSError, match="No space left"):
        w.put("b", torch.zeros(1))
    with pytest.raises(OSError, match="No space left"):
        w.close()
    assert not rec.finished


# --- whole-model analysis: progress and NaN checks ------------------------------------------------


def test_whole_model_analysis_reports_cumulative_progress_per_pass(toy_models, tmp_path, pm):
    """Global TIES streams every float tensor twice; each pass reports bytes done out of the float total."""
    calls = []
    experts = [toy_models[f"e{i}"] for i in range(3)]
    mergebench.merge("ties", base=toy_models["base"], experts=experts, output=tmp_path / "out", plugin_manager=pm,
                     trim_scope="global", threads=1, progress=lambda *a: calls.append(a))
    # float32 bytes, in the files' order (safetensors writes names sorted)
    sizes = {"layer.0.bias": 16 * 4, "layer.0.weight": 16 * 8 * 4, "layer.1.weight": 4 * 16 * 4}
    total = sum(sizes.values())  # position_ids (int64) is not analysed
    analysis = [c for c in calls if c[0].startswith("whole-model analysis")]
    for p in (1, 2):
        mine = [c for c in analysis if c[0] == f"whole-model analysis, pass {p}/2"]
        assert [c[3] for c in mine] == list(sizes)
        running = 0
        for (_, done, tot, name) in mine:
            running += sizes[name]
            assert (done, tot) == (running, total)
    assert len(analysis) == 6
    merging = [c for c in calls if c[0] == "merging"]
    assert merging[-1][1] == merging[-1][2] == total + 8 * 8  # the int64 tensor is copied and counted
    assert sorted(c[3] for c in merging) == sorted([*sizes, "position_ids"])  # each tensor named once, as written


@pytest.mark.parametrize("trim_scope", ["global", "tensor"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_expert_is_refused_and_nothing_is_written(toy_models, tmp_path, pm, trim_scope, bad):
    base = toy_tensors(0)
    bad_expert = {n: t.clone() for n, t in base.items()}
    bad_expert["layer.0.bias"][3] = bad
    path = write_model(tmp_path / "bad", bad_expert)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        mergebench.merge("ties", base=toy_models["base"], experts=[toy_models["e0"], path], output=out,
                         plugin_manager=pm, trim_scope=trim_scope)
    assert str(err.value) == f"expert 2 ({path}): tensor 'layer.0.bias' contains NaN or Inf values"
    assert not out.exists()


# --- the method's output is checked ---------------------------------------------------------------


@pytest.mark.parametrize("elementwise", [False, True])
def test_a_method_returning_the_wrong_shape_is_refused_with_what_it_returned(toy_models, tmp_path, pm, elementwise):
    def short(base, experts, params, ctx):  # wrong only for layer.0.weight, which is not merged first
        return experts[0][:3].clone() if ctx.name == "layer.0.weight" else experts[0].clone()

    pm.register(method_plugin(MergeMethod(name="short", description="", merge=short, needs_base=False,
                                    elementwise=elementwise)))
    out = tmp_path / "out"
    with pytest.raises(MergebenchError) as err:
        mergebench.merge("short", experts=[toy_models["e0"], toy_models["e1"]], output=out, plugin_manager=pm,
                         threads=1)
    got, expected = ("(3,)", "(128,)") if elementwise else ("(3, 8)", "(16, 8)")
    assert str(err.value) == f"merge method 'short' returned {got} for tensor 'layer.0.weight', expected {expected}"
    assert not out.exists()


def test_a_method_returning_a_non_tensor_is_refused_with_its_type(toy_models, tmp_path, pm):
    pm.register(method_plugin(MergeMethod(name="listy", description="", needs_base=False,
                                    merge=lambda base, experts, params, ctx: experts[0].tolist())))
    with pytest.raises(MergebenchError) as err:
        mergebench.merge("listy", experts=[toy_models["e0"], toy_models["e1"]], output=tmp_path / "out",
                         plugin_manager=pm, threads=1)
    assert str(err.value) == "merge method 'listy' returned list for tensor 'layer.0.weight', expected (16, 8)"


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("dtype,factor,hint", [("float16", 1e30, " (too large for float16? try --dtype bfloat16)"),
                                               ("float32", float("inf"), "")])
def test_non_finite_output_is_refused_with_the_float16_hint_only_for_float16(toy_models, tmp_path, pm, elementwise,
                                                                             dtype, factor, hint):
    """1e30 is finite in float32 but overflows float16; the hint is given only when float16 overflowed."""
    pm.register(method_plugin(MergeMethod(name="huge", description="", needs_base=False, elementwise=elementwise,
                                    merge=lambda base, experts, params, ctx: experts[0] * factor)))
    out = tmp_path / "out"
    with pytest.raises(MergebenchError) as err:
        mergebench.merge("huge", experts=[toy_models["e0"], toy_models["e1"]], output=out, plugin_manager=pm,
                         threads=1, dtype=dtype)
    assert str(err.value) == f"merge method 'huge' produced NaN or Inf in tensor 'layer.0.weight'{hint}"
    assert not out.exists()


@pytest.mark.parametrize("elementwise", [False, True])
def test_a_finite_result_that_overflows_bfloat16_is_refused(toy_models, tmp_path, pm, elementwise):
    """3.4e38 is finite in float32 but beyond bfloat16's largest value (3.3895e38, rounding to Inf above
    3.3961e38): the written tensor is checked, not the float32 result."""
    pm.register(method_plugin(MergeMethod(name="edge", description="", needs_base=False, elementwise=elementwise,
                                    merge=lambda base, experts, params, ctx: torch.full_like(experts[0], 3.4e38))))
    assert torch.isfinite(torch.tensor(3.4e38)) and torch.isinf(torch.tensor(3.4e38).to(torch.bfloat16))
    out = tmp_path / "out"
    with pytest.raises(MergebenchError) as err:
        mergebench.merge("edge", experts=[toy_models["e0"], toy_models["e1"]], output=out, plugin_manager=pm,
                         threads=1, dtype="bfloat16")
    assert str(err.value) == ("merge method 'edge' produced NaN or Inf in tensor 'layer.0.weight' "
                              "(too large for bfloat16? try --dtype float32)")
    assert not out.exists()


def test_a_copied_tensor_that_overflows_the_output_dtype_is_refused(tmp_path, pm):
    """Identical inputs are copied, not merged; the copy is cast to the output dtype and checked like a merge."""
    shared = torch.tensor([1e5, 2.0])  # finite in float32, beyond float16's 65504
    models = [write_model(tmp_path / f"e{i}", {**toy_tensors(i), "scale": shared}) for i in range(2)]
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        mergebench.merge("average", experts=models, output=out, plugin_manager=pm, threads=1, dtype="float16")
    assert str(err.value).startswith("tensor 'scale' (copied from the expert 1")
    assert str(err.value).endswith("overflows to Inf in float16 (too large for float16? try --dtype bfloat16)")
    assert not out.exists()
    mergebench.merge("average", experts=models, output=out, plugin_manager=pm, threads=1, dtype="bfloat16")
    from safetensors.torch import load_file
    assert load_file(out / "model.safetensors")["scale"].tolist() == [99840.0, 2.0]  # bfloat16's nearest


def test_a_copied_float64_tensor_beyond_float32_is_refused_without_a_dtype_hint(tmp_path, pm):
    """float64 to float32: no narrower-dtype hint to give (only float16 and bfloat16 have one)."""
    shared = torch.tensor([1e39, 2.0], dtype=torch.float64)
    models = [write_model(tmp_path / f"e{i}", {**toy_tensors(i), "scale": shared}) for i in range(2)]
    with pytest.raises(InputError) as err:
        mergebench.merge("average", experts=models, output=tmp_path / "out", plugin_manager=pm, threads=1,
                         dtype="float32")
    assert str(err.value).endswith("overflows to Inf in float32")


# --- merges without a base ------------------------------------------------------------------------


def test_average_without_a_base_weights_every_expert_including_the_first(toy_models, tmp_path, pm):
    """No base: expert 1 is an expert like the others, not a base (hand-computed weighted mean)."""
    from safetensors.torch import load_file

    e0, e1 = load_file(toy_models["e0"] / "model.safetensors"), load_file(toy_models["e1"] / "model.safetensors")
    out = tmp_path / "out"
    result = mergebench.merge("average", experts=[toy_models["e0"], toy_models["e1"]], weights=[1.0, 3.0], output=out,
                              plugin_manager=pm)
    merged = load_file(out / "model.safetensors")
    assert result.tensors_merged == 3 and result.tensors_copied == 1
    for name in ("layer.0.weight", "layer.0.bias", "layer.1.weight"):
        torch.testing.assert_close(merged[name], (e0[name] + 3 * e1[name]) / 4, rtol=1e-6, atol=1e-7)
    assert torch.equal(merged["position_ids"], torch.arange(8))


# --- input compatibility checks -------------------------------------------------------------------


def test_same_model_type_but_different_architectures_is_refused_naming_both_roles(toy_models, tmp_path, pm):
    other = write_model(tmp_path / "other", toy_tensors(5), config={"model_type": "toy", "architectures": ["ToyHead"]})
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        mergebench.merge("ties", base=toy_models["base"], experts=[toy_models["e0"], other], output=out,
                         plugin_manager=pm)
    assert str(err.value) == (f"expert 2 ({other}) is a ['ToyHead'] model but the base ({toy_models['base']}) is a "
                              "['ToyModel'] model (architectures in config.json); merging needs one architecture")
    assert not out.exists()


def test_a_model_without_config_merges_with_one_that_has_it(toy_models, tmp_path, pm):
    """Architectures are compared only when both inputs have a config.json."""
    from safetensors.torch import load_file

    bare = write_model(tmp_path / "bare", load_file(toy_models["e1"] / "model.safetensors"))
    (bare / "config.json").unlink()
    out = tmp_path / "out"
    mergebench.merge("average", experts=[toy_models["e0"], bare], output=out, plugin_manager=pm)
    e0, e1 = load_file(toy_models["e0"] / "model.safetensors"), load_file(toy_models["e1"] / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    torch.testing.assert_close(merged["layer.0.weight"], (e0["layer.0.weight"] + e1["layer.0.weight"]) / 2,
                               rtol=1e-6, atol=1e-7)
    mergebench.merge("average", experts=[bare, toy_models["e0"]], output=tmp_path / "out2", plugin_manager=pm)


def test_missing_tensors_are_counted_in_the_refusal(toy_models, tmp_path, pm):
    tensors = toy_tensors(0)
    del tensors["layer.0.bias"], tensors["layer.1.weight"], tensors["position_ids"]  # 3 of the base's 4
    short = write_model(tmp_path / "short", tensors)
    with pytest.raises(InputError) as err:
        mergebench.merge("ties", base=toy_models["base"], experts=[toy_models["e0"], short], output=tmp_path / "out",
                         plugin_manager=pm)
    assert str(err.value) == (f"expert 2 ({short}) has no tensor 'position_ids' that the base has "
                              "(3 tensor(s) missing in all)")


def test_extra_shape_and_int_float_mismatches_are_refused_naming_the_expert(toy_models, tmp_path, pm):
    def refusal(tensors, name):
        path = write_model(tmp_path / name, tensors)
        with pytest.raises(InputError) as err:
            mergebench.merge("ties", base=toy_models["base"], experts=[toy_models["e0"], path],
                             output=tmp_path / f"out-{name}", plugin_manager=pm)
        assert not (tmp_path / f"out-{name}").exists()
        return str(err.value), path

    extra = {**toy_tensors(0), "layer.2.weight": torch.zeros(2)}
    msg, path = refusal(extra, "extra")
    assert msg == f"expert 2 ({path}) has a tensor 'layer.2.weight' that the base does not have"

    wide = {**toy_tensors(0), "layer.0.bias": torch.zeros(17)}
    msg, path = refusal(wide, "wide")
    assert msg == f"tensor 'layer.0.bias' has shape [17] in expert 2 ({path}) but [16] in the base"

    ints = {**toy_tensors(0), "layer.0.bias": torch.zeros(16, dtype=torch.int32)}
    msg, path = refusal(ints, "ints")
    assert msg == f"tensor 'layer.0.bias' is torch.int32 in expert 2 ({path}) but torch.float32 in the base"


# --- config, card and recipe hashes ---------------------------------------------------------------


def test_dtype_option_rewrites_both_config_dtype_keys_and_the_card(tmp_path, pm):
    import json

    config = {"model_type": "toy", "architectures": ["ToyModel"], "torch_dtype": "float32", "dtype": "float32",
              "hidden_size": 8}
    a = write_model(tmp_path / "a", toy_tensors(0), config=config)
    b = write_model(tmp_path / "b", toy_tensors(1), config=config)
    out = tmp_path / "out"
    mergebench.merge("average", experts=[a, b], output=out, dtype="bf16", plugin_manager=pm)
    want = {**config, "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    assert (out / "config.json").read_text() == json.dumps(want, indent=2) + "\n"
    assert json.loads((out / "mergebench.json").read_text())["dtype"] == "bfloat16"
    assert "- Output dtype: bfloat16\n" in (out / "README.md").read_text()
    # without --dtype the config is copied byte for byte
    mergebench.merge("average", experts=[a, b], output=tmp_path / "same", plugin_manager=pm)
    assert (tmp_path / "same" / "config.json").read_bytes() == (a / "config.json").read_bytes()


def test_card_describes_the_kept_dtypes_of_the_template(tmp_path, pm):
    import json

    mixed = {**toy_tensors(0), "layer.0.bias": toy_tensors(0)["layer.0.bias"].to(torch.bfloat16)}
    base = write_model(tmp_path / "base", mixed)
    e = write_model(tmp_path / "e", {n: (t + 1 if t.is_floating_point() else t) for n, t in mixed.items()})
    mergebench.merge("task_arithmetic", base=base, experts=[e], output=tmp_path / "o1", plugin_manager=pm)
    assert json.loads((tmp_path / "o1" / "mergebench.json").read_text())["dtype"] == "as the base (bfloat16, float32)"
    mergebench.merge("average", experts=[e, base], output=tmp_path / "o2", plugin_manager=pm)
    assert json.loads((tmp_path / "o2" / "mergebench.json").read_text())["dtype"] == \
        "as the first expert (bfloat16, float32)"
    ints = write_model(tmp_path / "ints", {"ids": torch.arange(4)})
    mergebench.merge("average", experts=[ints, ints], output=tmp_path / "o3", plugin_manager=pm)
    assert json.loads((tmp_path / "o3" / "mergebench.json").read_text())["dtype"] == "as the first expert (no floats)"


def test_recipe_hashes_are_checked_per_expert_without_a_base(toy_models, tmp_path, pm):
    from mergebench.core.recipe import ModelInput, Recipe

    paths = [str(toy_models["e0"]), str(toy_models["e1"])]
    first = engine.run(Recipe("average", [ModelInput(p) for p in paths]), tmp_path / "o1", pm=pm)
    shas = [i["sha256"] for i in first.inputs]
    assert shas[0] != shas[1]
    ok = engine.run(Recipe("average", [ModelInput(p, sha256=s) for p, s in zip(paths, shas)]), tmp_path / "o2", pm=pm)
    assert [i["sha256"] for i in ok.inputs] == shas and [i["role"] for i in ok.inputs] == ["expert 1", "expert 2"]
    wrong = "f" * 64
    with pytest.raises(InputError) as err:
        engine.run(Recipe("average", [ModelInput(paths[0], sha256=shas[0]), ModelInput(paths[1], sha256=wrong)]),
                   tmp_path / "o3", pm=pm)
    assert str(err.value) == (f"expert 2 ({paths[1]}): content sha256 {shas[1][:12]}... differs from the recipe's "
                              "ffffffffffff...; the input changed since the recipe was written")
    assert not (tmp_path / "o3").exists()


def test_card_inputs_hold_weights_and_resolved_paths(toy_models, tmp_path, monkeypatch, pm):
    """Relative paths are recorded resolved; hub ids as given; each expert carries its own weight."""
    import os

    cache = tmp_path / "hub"
    write_hub_snapshot(cache, "acme/toy-expert", toy_models["e2"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    result = mergebench.merge("ties", base="base", experts=[os.path.join("e0"), "e1", "acme/toy-expert"],
                              weights=[0.5, 2.0, 3.0], output=tmp_path / "out", plugin_manager=pm)
    got = [(i["role"], i["reference"], i["path"], i.get("weight")) for i in result.inputs]
    assert got == [("base", "base", str(tmp_path / "base"), None), ("expert 1", "e0", str(tmp_path / "e0"), 0.5),
                   ("expert 2", "e1", str(tmp_path / "e1"), 2.0),
                   ("expert 3", "acme/toy-expert", "acme/toy-expert", 3.0)]


def test_cpu_merges_use_cache_sized_chunks_and_gpus_large_ones():
    assert engine._chunk_size(torch.device("cpu")) == 1 << 18
    assert engine._chunk_size(torch.device("cuda", 0)) == 1 << 24


def test_empty_and_one_element_float_tensors(toy_models, tmp_path, pm):
    """An empty float tensor merges (copied); NaN in a one-element tensor is found like any other."""
    base = {**toy_tensors(0), "empty": torch.zeros(0), "scalar": torch.tensor([2.0])}
    e1 = {**toy_tensors(1), "empty": torch.zeros(0), "scalar": torch.tensor([4.0])}
    a, b = write_model(tmp_path / "a", base), write_model(tmp_path / "b", e1)
    result = mergebench.merge("average", experts=[a, b], output=tmp_path / "out", plugin_manager=pm)
    from safetensors.torch import load_file

    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out["empty"].shape == (0,) and out["empty"].dtype == torch.float32
    assert torch.equal(out["scalar"], torch.tensor([3.0]))
    assert result.tensors_copied == 2  # position_ids and the empty tensor
    bad = write_model(tmp_path / "bad", {**e1, "scalar": torch.tensor([float("nan")])})
    with pytest.raises(InputError) as err:
        mergebench.merge("average", experts=[a, bad], output=tmp_path / "o2", plugin_manager=pm)
    assert str(err.value) == f"expert 2 ({bad}): tensor 'scalar' contains NaN or Inf values"


def test_nan_messages_name_the_right_input(toy_models, tmp_path, pm):
    nan_base = {n: t.clone() for n, t in toy_tensors(0).items()}
    nan_base["layer.1.weight"][0, 0] = float("nan")
    bad = write_model(tmp_path / "bad", nan_base)
    with pytest.raises(InputError) as err:
        mergebench.merge("task_arithmetic", base=bad, experts=[toy_models["e0"]], output=tmp_path / "o",
                         plugin_manager=pm)
    assert str(err.value) == f"base ({bad}): tensor 'layer.1.weight' contains NaN or Inf values"
    for method in ("average", "ties"):  # not elementwise / elementwise
        kw = {} if method == "average" else {"base": toy_models["base"]}
        with pytest.raises(InputError) as err:
            mergebench.merge(method, experts=[toy_models["e0"], bad], output=tmp_path / "o", plugin_manager=pm, **kw)
        assert str(err.value) == f"expert 2 ({bad}): tensor 'layer.1.weight' contains NaN or Inf values"


def test_inputs_of_different_float_dtypes_are_merged_not_copied(tmp_path, pm):
    from safetensors.torch import load_file

    t = toy_tensors(0)
    a = write_model(tmp_path / "a", t)
    b16 = {n: (v + 1).to(torch.bfloat16) if v.is_floating_point() else v for n, v in t.items()}
    b = write_model(tmp_path / "b", b16)
    result = mergebench.merge("average", experts=[a, b], output=tmp_path / "out", plugin_manager=pm)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert result.tensors_merged == 3
    want = (t["layer.0.weight"] + b16["layer.0.weight"].float()) / 2
    torch.testing.assert_close(out["layer.0.weight"], want, rtol=1e-6, atol=1e-7)


def test_identical_large_tensors_are_copied_and_different_ones_merged(tmp_path, pm):
    """Inputs longer than the 4096-element prefix the identity check compares first."""
    big = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    other = big.clone()
    other[4500] += 1.0  # differs only after the prefix
    a = write_model(tmp_path / "a", {"same": big, "late": big.clone()})
    b = write_model(tmp_path / "b", {"same": big.clone(), "late": other})
    result = mergebench.merge("average", experts=[a, b], output=tmp_path / "out", plugin_manager=pm)
    assert (result.tensors_copied, result.tensors_merged) == (1, 1)
    from safetensors.torch import load_file

    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["same"], big)
    assert out["late"][4500] == (big[4500] + other[4500]) / 2


def test_identical_inputs_are_checked_and_cast_to_the_output_dtype(tmp_path, pm):
    from safetensors.torch import load_file

    t = toy_tensors(0)
    a = write_model(tmp_path / "a", t)
    b = write_model(tmp_path / "b", {**toy_tensors(1), "layer.0.bias": t["layer.0.bias"].clone()})
    mergebench.merge("average", experts=[a, b], output=tmp_path / "out", dtype="bfloat16", plugin_manager=pm)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out["layer.0.bias"].dtype == torch.bfloat16
    assert torch.equal(out["layer.0.bias"], t["layer.0.bias"].to(torch.bfloat16))
    nan = {n: v.clone() for n, v in t.items()}
    nan["layer.0.bias"][0] = float("inf")
    c, d = write_model(tmp_path / "c", nan), write_model(tmp_path / "d", nan)
    with pytest.raises(InputError) as err:
        mergebench.merge("average", experts=[c, d], output=tmp_path / "o2", plugin_manager=pm)
    assert str(err.value) == f"expert 1 ({c}): tensor 'layer.0.bias' contains NaN or Inf values"


def test_a_whole_tensor_method_sees_whole_tensors(toy_models, tmp_path, pm, monkeypatch):
    """elementwise=False: the method gets each tensor whole, even when it is larger than a chunk."""
    monkeypatch.setattr(engine, "CHUNK", 8)
    seen = []

    def centre(base, experts, params, ctx):
        seen.append((ctx.name, tuple(experts[0].shape)))
        return experts[0] - experts[0].mean() + experts[1] * 0

    pm.register(method_plugin(MergeMethod(name="centre", description="", merge=centre, needs_base=False)))
    result = mergebench.merge("centre", experts=[toy_models["e0"], toy_models["e1"]], output=tmp_path / "out",
                              plugin_manager=pm, threads=1)
    assert (result.tensors_merged, result.tensors_copied) == (3, 1)
    from safetensors.torch import load_file

    e0, out = load_file(toy_models["e0"] / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(seen) == [("layer.0.bias", (16,)), ("layer.0.weight", (16, 8)), ("layer.1.weight", (4, 16))]
    for name in ("layer.0.bias", "layer.0.weight", "layer.1.weight"):
        torch.testing.assert_close(out[name], e0[name] - e0[name].mean(), rtol=0, atol=1e-6)


def test_a_whole_tensor_method_gets_float32_copies_of_half_precision_inputs(tmp_path, pm):
    from safetensors.torch import load_file

    dtypes = []

    def first(base, experts, params, ctx):
        dtypes.extend(e.dtype for e in experts)
        return experts[0] / 3

    pm.register(method_plugin(MergeMethod(name="first", description="", merge=first, needs_base=False)))
    t = {n: v.to(torch.bfloat16) if v.is_floating_point() else v for n, v in toy_tensors(0).items()}
    a, b = write_model(tmp_path / "a", t), write_model(tmp_path / "b", toy_tensors(1, dtype=torch.bfloat16))
    mergebench.merge("first", experts=[a, b], output=tmp_path / "out", dtype="float32", plugin_manager=pm)
    assert set(dtypes) == {torch.float32}
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["layer.0.weight"], t["layer.0.weight"].float() / 3)  # divided in float32, not bf16


def test_a_whole_tensor_method_never_sees_nan_inputs(toy_models, tmp_path, pm):
    calls = []
    pm.register(method_plugin(MergeMethod(name="firstw", description="", needs_base=False,
                                    merge=lambda base, experts, params, ctx: calls.append(ctx.name) or experts[0])))
    nan = {n: v.clone() for n, v in toy_tensors(0).items()}
    nan["layer.1.weight"][1, 2] = float("nan")
    bad = write_model(tmp_path / "bad", nan)
    with pytest.raises(InputError) as err:
        mergebench.merge("firstw", experts=[toy_models["e0"], bad], output=tmp_path / "o", plugin_manager=pm,
                         threads=1)
    assert str(err.value) == f"expert 2 ({bad}): tensor 'layer.1.weight' contains NaN or Inf values"
    assert "layer.1.weight" not in calls and not (tmp_path / "o").exists()


def test_a_whole_tensor_method_may_write_into_its_float32_inputs(toy_models, tmp_path, pm):
    """The engine hands the method copies: in-place maths on an input is the method's own business."""
    from safetensors.torch import load_file

    pm.register(method_plugin(MergeMethod(name="double", description="", needs_base=False,
                                    merge=lambda base, experts, params, ctx: experts[0].mul_(2))))
    before = (toy_models["e0"] / "model.safetensors").read_bytes()
    mergebench.merge("double", experts=[toy_models["e0"], toy_models["e1"]], output=tmp_path / "o", plugin_manager=pm,
                     threads=1)
    e0, out = load_file(toy_models["e0"] / "model.safetensors"), load_file(tmp_path / "o" / "model.safetensors")
    for name in ("layer.0.bias", "layer.0.weight", "layer.1.weight"):
        assert torch.equal(out[name], e0[name] * 2), name
    assert (toy_models["e0"] / "model.safetensors").read_bytes() == before


def test_a_whole_tensor_method_gets_the_base_and_its_parameters(toy_models, tmp_path, pm):
    from safetensors.torch import load_file

    from mergebench import Param

    pm.register(method_plugin(MergeMethod(name="scaled", description="", params=[Param("k", float, 1.0, "scale")],
                                    merge=lambda base, experts, params, ctx: base + params["k"] * experts[0])))
    mergebench.merge("scaled", base=toy_models["base"], experts=[toy_models["e0"], toy_models["e1"]], k=0.5,
                     output=tmp_path / "o", plugin_manager=pm)
    base, e0 = load_file(toy_models["base"] / "model.safetensors"), load_file(toy_models["e0"] / "model.safetensors")
    out = load_file(tmp_path / "o" / "model.safetensors")
    torch.testing.assert_close(out["layer.0.weight"], base["layer.0.weight"] + 0.5 * e0["layer.0.weight"],
                               rtol=0, atol=0)


# --- the per-tensor plan without tensor data (describe, what `mergebench convert` shows) ---------------------


def test_describe_lists_every_output_tensor_resolved_without_reading_any(toy_models, pm, monkeypatch):
    from mergebench.core.recipe import ModelInput, Recipe
    from mergebench.core.tensor_io import ModelSource

    def no_reading(self, name):
        raise AssertionError(f"describe read tensor {name}")

    monkeypatch.setattr(ModelSource, "load", no_reading)
    recipe = Recipe("ties", [ModelInput(str(toy_models["e0"]), 2.0, parameters={"density": 0.3}),
                             ModelInput(str(toy_models["e1"]), 1.0)],
                    base=ModelInput(str(toy_models["base"])), parameters={"density": [0.2, 0.6]}, dtype="bfloat16")
    rows = {r.name: r for r in engine.describe(recipe, pm=pm)}
    assert sorted(rows) == ["layer.0.bias", "layer.0.weight", "layer.1.weight", "position_ids"]
    # layer 1 of layers 0..1 sits at t = 1, where the gradient [0.2, 0.6] is 0.6; layer 0 and unnumbered at t = 0
    last = rows["layer.1.weight"]
    assert last.inputs == ("base: layer.1.weight", "expert 1: layer.1.weight", "expert 2: layer.1.weight")
    assert (last.t, last.params["density"], last.weights) == (1.0, 0.6, (2.0, 1.0))
    assert last.expert_params == ({"density": 0.3}, {}) and (last.dtype, last.shape) == ("bfloat16", (4, 16))
    first = rows["layer.0.bias"]
    assert (first.t, first.params["density"], first.dtype, first.shape) == (0.0, 0.2, "bfloat16", (16,))
    ids = rows["position_ids"]
    assert (ids.t, ids.dtype, ids.shape) == (0.0, "int64", (8,))
    assert ids.inputs == ("base: position_ids", "expert 1: position_ids", "expert 2: position_ids")
    # without a base, the first expert is the template and every input is an expert
    plain = Recipe("average", [ModelInput(str(toy_models["e0"])), ModelInput(str(toy_models["e1"]), 3.0)])
    rows = {r.name: r for r in engine.describe(plain, pm=pm)}
    assert rows["layer.0.weight"].inputs == ("expert 1: layer.0.weight", "expert 2: layer.0.weight")
    assert rows["layer.0.weight"].weights == (1.0, 3.0) and rows["layer.0.weight"].dtype == "float32"


def test_describe_refuses_a_pickled_checkpoint_unless_allowed_and_uses_the_given_plugins(toy_models, tmp_path, pm):
    from conftest import load_dir

    from mergebench.core.recipe import ModelInput, Recipe

    (tmp_path / "pickled").mkdir()
    torch.save(load_dir(toy_models["e1"]), tmp_path / "pickled" / "pytorch_model.bin")
    recipe = Recipe("average", [ModelInput(str(toy_models["e0"])), ModelInput(str(tmp_path / "pickled"))])
    with pytest.raises(MergebenchError, match="allow-pickle"):
        engine.describe(recipe, pm=pm)
    assert len(engine.describe(recipe, allow_pickle=True, pm=pm)) == 4
    # a method only the given plugin manager knows
    pm.register(method_plugin(MergeMethod(name="firstonly", description="", merge=lambda b, e, p, c: e[0], needs_base=False)))
    rows = engine.describe(Recipe("firstonly", [ModelInput(str(toy_models["e0"]))]), pm=pm)
    assert sorted(r.name for r in rows) == ["layer.0.bias", "layer.0.weight", "layer.1.weight", "position_ids"]


# --- NaN checks under a one-pass whole-model analysis; dtype names; a single expert that is not copied --------


class _CountingPass:
    """A one-pass whole-model analysis that counts the entries it sees (its result: that count)."""

    passes = 1

    def __init__(self):
        self.seen = 0

    def observe(self, pass_index, name, base, experts):
        self.seen += experts[0].numel()

    def end_pass(self, pass_index):
        pass

    def result_for(self, name):
        return self.seen


def test_a_one_pass_whole_model_analysis_still_refuses_nan_inputs_by_name(toy_models, tmp_path, pm):
    def mean(base, experts, params, ctx):
        return sum(experts) / len(experts)

    pm.register(method_plugin(MergeMethod(name="onepass", description="", merge=mean, needs_base=False, elementwise=True,
                                    analysis=lambda params, own: _CountingPass())))
    bad = {n: t.clone() for n, t in toy_tensors(0).items()}
    bad["layer.1.weight"][2, 5] = float("nan")
    path = write_model(tmp_path / "bad", bad)
    with pytest.raises(InputError) as err:
        mergebench.merge("onepass", experts=[toy_models["e0"], path], output=tmp_path / "out", plugin_manager=pm)
    assert str(err.value) == f"expert 2 ({path}): tensor 'layer.1.weight' contains NaN or Inf values"
    assert not (tmp_path / "out").exists()


def test_dtype_names_may_carry_torch_prefix_and_unknown_ones_list_the_valid():
    assert engine.parse_dtype("torch.bfloat16") is torch.bfloat16
    assert engine.parse_dtype("Torch.Float16") is torch.float16 and engine.parse_dtype(None) is None
    with pytest.raises(ParameterError) as e:
        engine.parse_dtype("float8")
    assert str(e.value) == ("unknown dtype 'float8' (valid: bf16, bfloat16, float, float16, float32, float64, fp16, fp32, "
                            "fp64, half)")


def test_a_single_expert_scaled_by_passthrough_is_merged_not_copied(toy_models, tmp_path, pm, monkeypatch):
    from conftest import load_dir

    monkeypatch.setattr(engine, "CHUNK", 8)  # several chunks per tensor
    result = mergebench.merge("passthrough", experts=[toy_models["e0"]], output=tmp_path / "out", plugin_manager=pm,
                              expert_params=[{"scale": 0.5}])
    assert (result.tensors_merged, result.tensors_copied) == (3, 1)
    e0, out = load_dir(toy_models["e0"]), load_dir(tmp_path / "out")
    for name in ("layer.0.weight", "layer.0.bias", "layer.1.weight"):
        assert torch.equal(out[name], e0[name] * 0.5), name
    assert torch.equal(out["position_ids"], e0["position_ids"])


def test_different_vocabularies_are_refused_naming_the_rows_and_the_fix(tmp_path, pm):
    config = {"model_type": "toy", "architectures": ["ToyModel"]}
    base = write_model(tmp_path / "base", {"model.embed_tokens.weight": torch.zeros(10, 4), "w": torch.zeros(3)},
                       {**config, "vocab_size": 10})
    expert = write_model(tmp_path / "e", {"model.embed_tokens.weight": torch.ones(12, 4), "w": torch.ones(3)},
                         {**config, "vocab_size": 12})
    with pytest.raises(InputError) as e:
        mergebench.merge("task_arithmetic", base=base, experts=[expert], output=tmp_path / "out", plugin_manager=pm)
    assert str(e.value) == (
        "vocabularies differ: tensor 'model.embed_tokens.weight' has 12 rows in expert 1 (" + str(expert) + ") but 10 "
        "in the base; set tokenizer_source (recipe or mergekit config) or --tokenizer-source to base, union or one "
        "model's path to align them by token")


def test_aligned_vocabularies_still_have_every_other_tensor_checked():
    from mergebench.core.in_memory import StateDictSource

    template = StateDictSource({"model.embed_tokens.weight": torch.zeros(10, 4), "w": torch.zeros(3)}, "a")
    other = StateDictSource({"model.embed_tokens.weight": torch.zeros(12, 4), "w": torch.zeros(5)}, "b")
    template.config, other.config = {"vocab_size": 10}, {"vocab_size": 12}
    with pytest.raises(InputError) as e:  # rows aligned by token are fine, the other tensor's shape is not
        engine._check_compatible(template, "the base", other, "expert 1", aligned=True)
    assert str(e.value) == "tensor 'w' has shape [5] in expert 1 (b) but [3] in the base"
    other._state["w"] = torch.ones(3)
    other.tensors = StateDictSource(other._state, "b").tensors
    engine._check_compatible(template, "the base", other, "expert 1", aligned=True)


def test_a_union_vocabulary_rewrites_the_config_and_the_tokenizer(tmp_path, pm):
    import json

    from conftest import load_dir
    from mergekit_ref import write_tokenizer

    from mergebench.core.recipe import ModelInput, Recipe

    config = {"model_type": "toy", "architectures": ["ToyModel"], "torch_dtype": "float32"}
    inputs = []
    for name, tokens in (("e0", ["[UNK]", "a", "b"]), ("e1", ["[UNK]", "a", "b", "c"])):
        rows = torch.arange(len(tokens) * 2, dtype=torch.float32).reshape(-1, 2)
        path = write_model(tmp_path / name, {"model.embed_tokens.weight": rows, "w": torch.ones(2)},
                           {**config, "vocab_size": len(tokens)})
        write_tokenizer(path, tokens)
        inputs.append(ModelInput(str(path)))
    engine.run(Recipe("linear", inputs, tokenizer_source="union"), tmp_path / "out", pm=pm)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written == {**config, "vocab_size": 4}  # without --dtype the dtype keys are left as they were
    assert load_dir(tmp_path / "out")["model.embed_tokens.weight"].shape == (4, 2)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab()) == 4


# --- whole-tensor methods share one working-memory budget across workers -----------------------------------------


SCENARIOS = {
    # the embedding and the head in a row, two workers
    "pair": ({"a.embed.weight": (512, 64), "b.head.weight": (512, 64),
              **{f"c.layer.{i}.weight": (8, 8) for i in range(6)}}, 2),
    # three workers: the embedding alone, then two middle-sized tensors (a quarter of it each) and layers together
    "three workers": ({"a.embed.weight": (512, 64), "b.layer.weight": (8, 8), "c.mid.weight": (128, 64),
                       "d.mid.weight": (128, 64), **{f"e.layer.{i}.weight": (8, 8) for i in range(4)}}, 3),
    # every tensor of one size: one at a time
    "one size": ({f"a.embed.{i}.weight": (64, 64) for i in range(3)}, 2),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("inputs", [3, 1])
def test_workers_share_one_budget_for_whole_tensors(tmp_path, pm, inputs, scenario):
    """A whole-tensor job holds (inputs + 1) float32 copies of its tensor. The workers together hold at most the
    largest job, the engine's (N + 2) x largest bound: a tensor of the largest size runs with nothing beside it,
    while smaller tensors run together as they fit. With base + 2 experts and with a single expert."""
    shapes, threads = SCENARIOS[scenario]
    changed, active, peaks = threading.Condition(), {}, {"bytes": 0, "jobs": 0, "beside_largest": False}

    def hold(base, experts, params, ctx):
        size = (len(experts) + (base is not None) + 1) * experts[0].numel() * 4  # inputs + output, as the engine
        layer = ".layer" in ctx.name
        with changed:
            active[ctx.name] = size
            peaks["bytes"] = max(peaks["bytes"], sum(active.values()))
            peaks["jobs"] = max(peaks["jobs"], len(active))
            peaks["beside_largest"] |= bool({"a.embed.weight", "b.head.weight"} & set(active)) and any(
                ".layer" in n for n in active)
            changed.notify_all()
            # every other tensor is held long enough for the other workers to start whatever they may; a layer
            # leaves once it has a partner
            changed.wait_for(lambda: layer and len(active) > 1, timeout=0.3)
            del active[ctx.name]
            changed.notify_all()
        return experts[0].clone()

    pm.register(method_plugin(MergeMethod(name="hold", description="", merge=hold, needs_base=False,
                                    fixed_point=lambda *_: False)))
    g = torch.Generator().manual_seed(0)
    models = []
    for m in range(inputs):
        models.append(write_model(tmp_path / f"m{m}", {n: torch.randn(s, generator=g) for n, s in shapes.items()}))
    base, experts = (models[0], models[1:]) if inputs > 1 else (None, models)
    # a broken budget can deadlock the workers: a merge that does not finish is a failure, not a hang
    merging = threading.Thread(target=mergebench.merge, args=("hold",), daemon=True, kwargs=dict(
        base=base, experts=experts, output=tmp_path / "o", plugin_manager=pm, threads=threads))
    merging.start()
    merging.join(timeout=60)
    assert not merging.is_alive(), "the merge's workers deadlocked"
    assert (tmp_path / "o" / "model.safetensors").is_file()
    sizes = sorted({(inputs + 1) * h * w * 4 for h, w in shapes.values()})  # inputs + output, float32
    if len(sizes) == 1:
        assert peaks["jobs"] == 1
        return
    assert peaks["bytes"] <= sizes[-1]  # never more than the largest job
    assert peaks["jobs"] >= 2 and not peaks["beside_largest"]  # smaller ones together, none beside the largest


# --- refusals before any tensor is merged: threads, free space, a whole-model pre-pass over slices ----------------


def test_fewer_than_one_thread_is_refused_by_name(toy_models, tmp_path, pm):
    with pytest.raises(ParameterError) as err:
        mergebench.merge("average", experts=[toy_models["e0"], toy_models["e1"]], output=tmp_path / "out",
                         plugin_manager=pm, threads=0)
    assert str(err.value) == "--threads must be at least 1, got 0"


def _disk_with_free(monkeypatch, free):
    """shutil.disk_usage reporting ``free`` bytes; returns the list of the paths it was asked about."""
    import shutil
    from collections import namedtuple

    usage, asked = namedtuple("usage", "total used free"), []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: asked.append(path) or usage(free + (1 << 30), 1 << 30, free))
    return asked


def test_a_merge_fits_in_exactly_its_output_size_plus_16_mib(toy_models, tmp_path, pm, monkeypatch):
    """The output's tensors take 896 bytes (224 float32 values and 8 int64 position ids); the merge needs those plus
    16 MiB for the config, tokenizer and card files, on the filesystem of the output's nearest existing directory."""
    needed = (16 * 8 + 16 + 4 * 16) * 4 + 8 * 8 + (16 << 20)
    experts, out = [toy_models["e0"], toy_models["e1"]], tmp_path / "new" / "out"
    _disk_with_free(monkeypatch, needed - 1)
    with pytest.raises(InputError, match="free some space"):
        mergebench.merge("average", experts=experts, output=out, plugin_manager=pm)
    asked = _disk_with_free(monkeypatch, needed)
    mergebench.merge("average", experts=experts, output=out, plugin_manager=pm)
    assert (out / "model.safetensors").is_file() and asked == [tmp_path.resolve()]


def test_the_free_space_refusal_gives_both_sizes_in_gib_and_the_directory_checked(tmp_path, monkeypatch):
    _disk_with_free(monkeypatch, 5 << 29)  # 2.5 GiB free
    out = tmp_path / "new" / "out"
    with pytest.raises(InputError) as err:
        engine.check_free_space(out, 5 << 30)  # 5 GiB of tensors, plus the 16 MiB margin
    assert str(err.value) == (f"{out}: the merge needs 5.02 GiB but {tmp_path.resolve()} has 2.50 GiB free; free some "
                              "space or choose another output")


def test_a_whole_model_pre_pass_over_slices_of_different_experts_is_refused(toy_models, tmp_path, pm):
    """Global TIES trims every tensor against one threshold per expert, computed over the whole model: output layer 0
    merged from expert 1 and layer 1 from expert 2 have no common experts to compute it for."""
    from mergebench.core.recipe import ModelInput, OutputSlice, Recipe, SliceSource

    base, e0, e1 = (str(toy_models[k]) for k in ("base", "e0", "e1"))
    recipe = Recipe("ties", [ModelInput(e0), ModelInput(e1)], base=ModelInput(base),
                    parameters={"density": 0.5, "trim_scope": "global"},
                    slices=[OutputSlice([SliceSource(base, (0, 1)), SliceSource(e0, (0, 1))]),
                            OutputSlice([SliceSource(base, (1, 2)), SliceSource(e1, (1, 2))])])
    with pytest.raises(ParameterError) as err:
        engine.run(recipe, tmp_path / "out", pm=pm)
    assert str(err.value) == ("merge method 'ties' with these parameters needs one pre-pass over the whole model, so "
                              "every tensor must be merged from the same inputs (no slices)")


# --- what the merge reports and records -------------------------------------------------------------------------


def test_every_shard_header_names_mergebench_and_the_method(toy_models, tmp_path, pm):
    from safetensors import safe_open

    out = tmp_path / "out"
    mergebench.merge("ties", base=toy_models["base"], experts=[toy_models["e0"], toy_models["e1"]], output=out,
                     max_shard_size=600, plugin_manager=pm)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1  # every shard carries the header, not only the first
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt", "merged_with": "mergebench", "method": "ties"}, shard.name


def test_the_result_and_the_record_give_the_method_seed_and_wall_time(toy_models, tmp_path, pm):
    import json
    import time

    out = tmp_path / "out"
    started = time.perf_counter()
    result = mergebench.merge("dare_ties", base=toy_models["base"], experts=[toy_models["e0"], toy_models["e1"]],
                              output=out, seed=4, density=0.4, plugin_manager=pm)
    elapsed = time.perf_counter() - started
    assert (result.method, result.seed) == ("dare_ties", 4) and 0 < result.seconds <= elapsed
    assert json.loads((out / "mergebench.json").read_text())["seed"] == 4
    assert "- Seed: 4 (the method is stochastic" in (out / "README.md").read_text()


def test_a_callers_float64_default_dtype_changes_nothing(toy_models, tmp_path, pm):
    """The engine's chunk buffers are float32 whatever torch's default dtype a Python caller has set."""
    inputs = {"base": toy_models["base"], "experts": [toy_models["e0"], toy_models["e1"]], "plugin_manager": pm}
    mergebench.merge("task_arithmetic", output=tmp_path / "f32", **inputs)
    torch.set_default_dtype(torch.float64)
    try:
        mergebench.merge("task_arithmetic", output=tmp_path / "f64", **inputs)
    finally:
        torch.set_default_dtype(torch.float32)
    assert (tmp_path / "f64" / "model.safetensors").read_bytes() == (tmp_path / "f32" / "model.safetensors").read_bytes()


# --- per-tensor settings: every tensor's values are checked; a one-layer model ------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_expert_weight_is_refused_with_the_weights(toy_models, tmp_path, pm, bad):
    with pytest.raises(ParameterError) as err:
        mergebench.merge("average", experts=[toy_models["e0"], toy_models["e1"]], weights=[1.0, bad],
                         output=tmp_path / "out", plugin_manager=pm)
    assert str(err.value) == f"expert weights must be finite numbers, got [1.0, {bad}] for tensor 'position_ids'"


def test_the_methods_check_runs_on_every_tensors_values_not_only_the_first(toy_models, tmp_path, pm):
    """Expert 2's weight runs from 1 at layer 0 to -1 at layer 1: TIES' sign election refuses layer 1's weights."""
    from mergebench.core.recipe import ModelInput, Recipe

    recipe = Recipe("ties", [ModelInput(str(toy_models["e0"])), ModelInput(str(toy_models["e1"]), [1.0, -1.0])],
                    base=ModelInput(str(toy_models["base"])), parameters={"density": 0.5})
    with pytest.raises(ParameterError) as err:
        engine.run(recipe, tmp_path / "out", pm=pm)
    assert str(err.value) == "sign election needs positive expert weights, got [1.0, -1.0]"
    assert not (tmp_path / "out").exists()


def test_a_model_with_a_single_numbered_layer_merges(tmp_path, pm):
    from conftest import load_dir

    one = {"model.layers.0.mlp.weight": torch.arange(16.0).reshape(4, 4), "model.norm.weight": torch.ones(4)}
    a = write_model(tmp_path / "a", one)
    b = write_model(tmp_path / "b", {n: t + 2 for n, t in one.items()})
    mergebench.merge("average", experts=[a, b], output=tmp_path / "out", plugin_manager=pm)
    out = load_dir(tmp_path / "out")
    assert torch.equal(out["model.layers.0.mlp.weight"], one["model.layers.0.mlp.weight"] + 1)


def test_a_whole_model_pre_pass_refuses_parameters_that_vary_by_tensor(toy_models, tmp_path, pm):
    from mergebench.core.recipe import ModelInput, Recipe

    recipe = Recipe("ties", [ModelInput(str(toy_models["e0"])), ModelInput(str(toy_models["e1"]))],
                    base=ModelInput(str(toy_models["base"])), parameters={"density": [0.2, 0.6], "trim_scope": "global"})
    with pytest.raises(ParameterError) as err:
        engine.run(recipe, tmp_path / "out", pm=pm)
    assert str(err.value) == ("merge method 'ties' with these parameters needs one pre-pass over the whole model, so "
                              "its parameters cannot vary by tensor (no gradients or filters)")
    assert not (tmp_path / "out").exists()


# --- devices --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no CUDA GPU")
def test_cuda_without_a_gpu_is_refused_before_any_file_is_opened(toy_models, tmp_path, pm):
    with pytest.raises(ParameterError) as err:
        mergebench.merge("average", experts=[toy_models["e0"], toy_models["e1"]], output=tmp_path / "out",
                         device="cuda:0", plugin_manager=pm)
    assert str(err.value) == "device 'cuda:0' requested, but no CUDA GPU is available; use --device cpu"


def test_a_torch_device_other_than_cpu_or_cuda_is_refused(toy_models, tmp_path, pm):
    with pytest.raises(ParameterError) as err:
        mergebench.merge("average", experts=[toy_models["e0"], toy_models["e1"]], output=tmp_path / "out",
                         device="meta", plugin_manager=pm)
    assert str(err.value) == "device 'meta' is not supported (use cpu or cuda)"


# --- inputs: roles without a base, a pickled base, the output beside the base, the default row of a token -------


def test_without_a_base_shape_mismatches_name_expert_1_as_the_reference(toy_models, tmp_path, pm):
    wide = write_model(tmp_path / "wide", {**toy_tensors(0), "layer.0.bias": torch.zeros(17)})
    with pytest.raises(InputError) as err:
        mergebench.merge("average", experts=[toy_models["e0"], wide], output=tmp_path / "out", plugin_manager=pm)
    assert str(err.value) == f"tensor 'layer.0.bias' has shape [17] in expert 2 ({wide}) but [16] in expert 1"


def test_a_pickled_base_is_read_when_pickles_are_allowed(toy_models, tmp_path, pm):
    from conftest import load_dir

    (tmp_path / "pickled").mkdir()
    torch.save(load_dir(toy_models["base"]), tmp_path / "pickled" / "pytorch_model.bin")
    mergebench.merge("task_arithmetic", base=tmp_path / "pickled", experts=[toy_models["e0"]], output=tmp_path / "out",
                     allow_pickle=True, plugin_manager=pm)
    assert torch.equal(load_dir(tmp_path / "out")["layer.0.weight"], load_dir(toy_models["e0"])["layer.0.weight"])


def test_an_output_inside_the_base_directory_is_refused(toy_models, tmp_path, pm):
    from mergebench.core.errors import OutputError

    out = toy_models["base"] / "merged"
    with pytest.raises(OutputError) as err:
        mergebench.merge("task_arithmetic", base=toy_models["base"], experts=[toy_models["e0"]], output=out,
                         plugin_manager=pm)
    assert str(err.value) == f"{out}: the output would be inside the input model directory {toy_models['base']}"
    assert not out.exists()


def test_a_token_one_expert_lacks_gets_the_bases_row_where_the_base_has_it(tmp_path, pm):
    """mergekit's default row: token c is in the base and expert 1 but not expert 2, so expert 2's row for c is the
    base's (its task vector there is zero), not the mean of the two that have it."""
    from conftest import load_dir
    from mergekit_ref import write_tokenizer

    from mergebench.core.recipe import ModelInput, Recipe

    config = {"model_type": "toy", "architectures": ["ToyModel"]}
    rows = torch.arange(8, dtype=torch.float32).reshape(4, 2)  # tokens [UNK], a, b, c
    paths = {}
    for name, tokens, embed in (("base", ["[UNK]", "a", "b", "c"], rows), ("e0", ["[UNK]", "a", "b", "c"], rows + 10),
                                ("e1", ["[UNK]", "a", "b"], rows[:3] + 20)):
        paths[name] = write_model(tmp_path / name, {"model.embed_tokens.weight": embed, "w": torch.ones(2)},
                                  {**config, "vocab_size": len(tokens)})
        write_tokenizer(paths[name], tokens)
    recipe = Recipe("task_arithmetic", [ModelInput(str(paths["e0"])), ModelInput(str(paths["e1"]))],
                    base=ModelInput(str(paths["base"])), tokenizer_source="union")
    engine.run(recipe, tmp_path / "out", pm=pm)
    want = torch.cat([rows[:3] + 30, rows[3:] + 10])  # base + 10 + 20; for c: base + 10 + 0
    assert torch.equal(load_dir(tmp_path / "out")["model.embed_tokens.weight"], want)


def test_a_merge_without_experts_is_refused_naming_the_option(tmp_path, pm):
    with pytest.raises(ParameterError) as err:
        mergebench.merge("average", experts=[], output=tmp_path / "out", plugin_manager=pm)
    assert str(err.value) == "no experts given: a merge needs at least one expert (--expert PATH)"


def test_a_frankenmerge_across_vocabularies_aligns_each_edge_tensor_by_token(tmp_path, pm):
    """Slices of one model each (no second input per tensor): the embedding comes from the first slice's model (expert
    1, without token c: zeros there, as no input of it has c), the head from the last slice's (expert 2)."""
    from conftest import load_dir
    from mergekit_ref import write_tokenizer

    from mergebench.core.recipe import ModelInput, OutputSlice, Recipe, SliceSource

    config = {"model_type": "toy", "architectures": ["ToyModel"]}
    paths, rows = {}, {}
    for name, tokens, k in (("e0", ["[UNK]", "a", "b"], 0.0), ("e1", ["[UNK]", "a", "b", "c"], 100.0)):
        rows[name] = torch.arange(len(tokens) * 2, dtype=torch.float32).reshape(-1, 2) + k
        tensors = {"model.embed_tokens.weight": rows[name], "model.layers.0.w": torch.full((2,), k + 1),
                   "model.layers.1.w": torch.full((2,), k + 2), "lm_head.weight": rows[name] + 50}
        paths[name] = str(write_model(tmp_path / name, tensors, {**config, "vocab_size": len(tokens)}))
        write_tokenizer(tmp_path / name, tokens)
    recipe = Recipe("passthrough", [ModelInput(paths["e0"]), ModelInput(paths["e1"])], tokenizer_source="union",
                    slices=[OutputSlice([SliceSource(paths["e0"], (0, 1))]),
                            OutputSlice([SliceSource(paths["e1"], (1, 2))])])
    engine.run(recipe, tmp_path / "out", pm=pm)
    out = load_dir(tmp_path / "out")
    assert torch.equal(out["model.embed_tokens.weight"], torch.cat([rows["e0"], torch.zeros(1, 2)]))
    assert torch.equal(out["lm_head.weight"], rows["e1"] + 50)


def test_an_elementwise_method_may_empty_its_chunk_inputs(toy_models, tmp_path, pm, monkeypatch):
    """MergeFn's ownership lets a method free its scratch inputs (merge_ops.release_): the engine's reused chunk
    buffer must hand every chunk fresh views, or the next chunk would be read into emptied tensors."""
    from conftest import load_dir

    from mergebench.core.merge_ops import release_

    monkeypatch.setattr(engine, "CHUNK", 8)  # several chunks per tensor

    def mean_then_free(base, experts, params, ctx):
        out = (experts[0] + experts[1]) / 2
        for x in experts:
            release_(x)
        return out

    pm.register(method_plugin(MergeMethod(name="freeing", description="", merge=mean_then_free, needs_base=False,
                                          elementwise=True)))
    mergebench.merge("freeing", experts=[toy_models["e0"], toy_models["e1"]], output=tmp_path / "out",
                     plugin_manager=pm)
    e0, e1, out = load_dir(toy_models["e0"]), load_dir(toy_models["e1"]), load_dir(tmp_path / "out")
    for name in ("layer.0.weight", "layer.0.bias", "layer.1.weight"):
        assert e0[name].numel() > 8, name
        assert torch.equal(out[name], (e0[name] + e1[name]) / 2), name
