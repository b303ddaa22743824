"""The streaming engine end to end: files in, files out, through the public API and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mergebench
from mergebench.core.context import TensorContext, content_key
from mergebench.core.errors import InputError

from conftest import load_dir, toy_tensors, write_hub_snapshot, write_model

METHODS = ["average", "task_arithmetic", "ties", "dare_ties"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_digest(directory: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(directory.glob("*.safetensors"))}


@pytest.mark.parametrize("method", METHODS)
def test_engine_output_equals_the_method_maths(toy_models, tmp_path, pm, method):
    """What lands on disk is exactly the method applied to each tensor; int tensors are copied."""
    experts = [toy_models[f"e{i}"] for i in range(3)]
    result = mergebench.merge(method, base=toy_models["base"], experts=experts, output=tmp_path / "out",
                              weights=[1.0, 2.0, 1.0], seed=3, plugin_manager=pm)
    assert result.tensors_merged == 3 and result.tensors_copied == 1
    out = load_dir(tmp_path / "out")
    base, exps = load_dir(toy_models["base"]), [load_dir(e) for e in experts]
    m = pm.merge_methods().get(method)
    params = m.resolve_params({})
    for name in ("layer.0.weight", "layer.0.bias", "layer.1.weight"):
        # a stochastic method's streams are keyed by each expert's stored bytes (its content)
        streams = tuple(content_key(e[name]) for e in exps) if m.stochastic else None
        ctx = TensorContext(name, (1.0, 2.0, 1.0), seed=3, streams=streams)
        want = m.merge(base[name].clone(), [e[name].clone() for e in exps], params, ctx)
        assert torch.equal(out[name], want), name
    assert torch.equal(out["position_ids"], base["position_ids"])


@pytest.mark.parametrize("method,params", [("average", {}), ("task_arithmetic", {"lambda_": 0.7}),
                                           ("ties", {"density": 0.3}), ("ties", {"trim_scope": "global"}),
                                           ("dare_ties", {"density": 0.4})])
def test_chunked_streaming_equals_whole_tensor_maths(toy_models, tmp_path, pm, monkeypatch, method, params):
    """The engine's chunk loop (odd chunk sizes that split rows) gives exactly the whole-tensor result."""
    from mergebench.core import engine

    experts = [toy_models[f"e{i}"] for i in range(3)]
    outputs = {}
    for chunk in (8, 102, 1 << 18):  # even, as the engine's chunks are
        monkeypatch.setattr(engine, "CHUNK", chunk)
        out = tmp_path / f"out-{chunk}"
        mergebench.merge(method, base=toy_models["base"], experts=experts, output=out, seed=2, plugin_manager=pm,
                         **params)
        outputs[chunk] = load_dir(out)
    for name, tensor in outputs[1 << 18].items():
        assert torch.equal(outputs[8][name], tensor) and torch.equal(outputs[102][name], tensor), name


def test_identical_tensors_are_copied_from_the_base(tmp_path, pm):
    base = toy_tensors(0)
    expert = dict(base, **{"layer.0.bias": base["layer.0.bias"] + 1})
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "e", expert)
    r = mergebench.merge("ties", base=tmp_path / "b", experts=[tmp_path / "e"], output=tmp_path / "o", plugin_manager=pm)
    assert (r.tensors_merged, r.tensors_copied) == (1, 3)
    out = load_dir(tmp_path / "o")
    assert torch.equal(out["layer.0.weight"], base["layer.0.weight"])


def test_sharded_and_reordered_inputs_give_bit_identical_output(tmp_path, pm):
    base = toy_tensors(0, dtype=torch.bfloat16)
    experts = [{n: (t + toy_tensors(10 + i, scale=0.1)[n].to(t.dtype) if t.is_floating_point() else t)
                for n, t in base.items()} for i in range(2)]
    write_model(tmp_path / "b1", base)
    write_model(tmp_path / "b2", dict(reversed(list(base.items()))), shards=2)
    for i, e in enumerate(experts):
        write_model(tmp_path / f"e{i}-single", e)
        write_model(tmp_path / f"e{i}-sharded", dict(reversed(list(e.items()))), shards=3)
    for method in ("dare_ties", "ties"):
        a = mergebench.merge(method, base=tmp_path / "b1", experts=[tmp_path / "e0-single", tmp_path / "e1-single"],
                             output=tmp_path / f"{method}-a", seed=5, density=0.5, plugin_manager=pm)
        b = mergebench.merge(method, base=tmp_path / "b2", experts=[tmp_path / "e0-sharded", tmp_path / "e1-sharded"],
                             output=tmp_path / f"{method}-b", seed=5, density=0.5, plugin_manager=pm)
        ta, tb = load_dir(a.output), load_dir(b.output)
        assert ta.keys() == tb.keys()
        for name in ta:
            assert torch.equal(ta[name], tb[name]), (method, name)
            assert ta[name].dtype == torch.bfloat16 or not ta[name].is_floating_point()


def test_one_and_two_threads_give_bit_identical_files(tiny_llamas, tmp_path):
    digests = {}
    for threads in (1, 2):
        for method in ("dare_ties", "ties"):
            out = tmp_path / f"{method}-{threads}"
            cmd = [sys.executable, "-m", "mergebench", "merge", method, "--base", str(tiny_llamas["base"]),
                   "-e", str(tiny_llamas["e0"]), "-e", str(tiny_llamas["e1"]), "--seed", "11", "--threads",
                   str(threads), "-q", "-o", str(out)]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "MERGEBENCH_LOAD_PLUGINS": ""})
            digests[(method, threads)] = weights_digest(out)
    assert digests[("dare_ties", 1)] == digests[("dare_ties", 2)]
    assert digests[("ties", 1)] == digests[("ties", 2)]
    assert digests[("ties", 1)] != digests[("dare_ties", 1)]


def test_merged_tiny_llama_loads_in_transformers_with_small_shards(tiny_llamas, tmp_path, pm):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    mergebench.merge("ties", base=tiny_llamas["base"], experts=[tiny_llamas["e0"], tiny_llamas["e1"]], output=out,
                     max_shard_size="6KB", plugin_manager=pm)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    for s in shards:  # each shard's data within the limit unless a single tensor is larger
        tensors = load_dir_file(s)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 6000
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()
    for name in ("config.json", "generation_config.json", "README.md", "mergebench.json"):
        assert (out / name).is_file()


def load_dir_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_dtype_option_casts_output_and_updates_config(tiny_llamas, tmp_path, pm):
    out = tmp_path / "f32"
    mergebench.merge("average", experts=[tiny_llamas["e0"], tiny_llamas["e1"]], output=out, dtype="float32",
                     plugin_manager=pm)
    tensors = load_dir(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_global_trim_keeps_exactly_k_entries_of_the_whole_task_vector(tmp_path, pm):
    base = toy_tensors(0)
    expert = {n: (t + toy_tensors(9, scale=0.1)[n] if t.is_floating_point() else t) for n, t in base.items()}
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "e", expert)
    results = {}
    for scope in ("tensor", "global"):
        out = tmp_path / scope
        mergebench.merge("ties", base=tmp_path / "b", experts=[tmp_path / "e"], output=out, density=0.3,
                         trim_scope=scope, plugin_manager=pm)
        merged = load_dir(out)
        results[scope] = {n: (merged[n] != base[n]) for n in base if base[n].is_floating_point()}
    total = sum(t.numel() for n, t in base.items() if t.is_floating_point())
    assert sum(int(m.sum()) for m in results["global"].values()) == round(0.3 * total)
    per_tensor = [int(m.sum()) for m in results["global"].values()]
    assert per_tensor != [int(m.sum()) for m in results["tensor"].values()]  # global moves the budget around
    for n, m in results["tensor"].items():
        assert int(m.sum()) == int(0.3 * base[n].numel() + 0.5)


def test_card_redoes_the_merge_and_refuses_changed_inputs(toy_models, tmp_path):
    from click.testing import CliRunner

    from mergebench.cli.main import cli

    first = tmp_path / "first"
    mergebench.merge("dare_ties", base=toy_models["base"], experts=[toy_models["e0"], toy_models["e1"]],
                     output=first, seed=4, density=0.4)
    card = (first / "README.md").read_text()
    assert "dare_ties" in card and "density: 0.4" in card and "seed: 4" in card
    record = json.loads((first / "mergebench.json").read_text())
    assert record["inputs"][0]["sha256"] == hashlib.sha256(
        f"model.safetensors:{sha(toy_models['base'] / 'model.safetensors')}\n".encode()).hexdigest()
    runner = CliRunner()
    redo = runner.invoke(cli, ["merge", str(first / "README.md"), "-o", str(tmp_path / "redo"), "-q"])
    assert redo.exit_code == 0, redo.output
    assert weights_digest(first) == weights_digest(tmp_path / "redo")
    # change an expert: the recipe's hash no longer matches, nothing is written
    tensors = load_dir(toy_models["e1"])
    tensors["layer.0.bias"] = tensors["layer.0.bias"] + 1
    write_model(toy_models["e1"], tensors)
    again = runner.invoke(cli, ["merge", str(first / "README.md"), "-o", str(tmp_path / "again"), "-q"])
    assert again.exit_code == 2 and "differs from the recipe" in again.output
    assert not (tmp_path / "again").exists()


def test_hub_id_resolves_through_the_local_hf_cache(toy_models, tmp_path, monkeypatch, pm):
    """A fake hub cache laid out as huggingface_hub does (blobs named by sha256, snapshot symlinks)."""
    cache = tmp_path / "hub"
    write_hub_snapshot(cache, "acme/toy-expert", toy_models["e0"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    result = mergebench.merge("average", experts=["acme/toy-expert", toy_models["e1"]], output=tmp_path / "o",
                              plugin_manager=pm)
    assert result.inputs[0]["files"]["model.safetensors"] == sha(toy_models["e0"] / "model.safetensors")
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        mergebench.merge("average", experts=["acme/missing-model"], output=tmp_path / "o2", plugin_manager=pm)


def test_allow_pickle_loads_weights_only_and_matches_safetensors(toy_models, tmp_path, pm):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((toy_models["e0"] / "config.json").read_text())
    torch.save(load_dir(toy_models["e0"]), pickled / "pytorch_model.bin")
    a = mergebench.merge("task_arithmetic", base=toy_models["base"], experts=[pickled], output=tmp_path / "a",
                         allow_pickle=True, plugin_manager=pm)
    b = mergebench.merge("task_arithmetic", base=toy_models["base"], experts=[toy_models["e0"]],
                         output=tmp_path / "b", plugin_manager=pm)
    assert weights_digest(a.output) == weights_digest(b.output)


def test_force_replaces_an_existing_output_only_on_success(toy_models, tmp_path, pm):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    mergebench.merge("average", experts=[toy_models["e0"]], output=out, force=True, plugin_manager=pm)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_finite_check_finds_every_nan_and_inf_and_passes_sums_that_overflow(dtype):
    """engine._finite against torch.isfinite(x).all(), the entry-by-entry definition: one NaN or Inf anywhere
    fails it (+Inf and -Inf together included), and finite entries whose sum overflows pass."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mergebench.core.engine import _finite

    big = torch.finfo(dtype).max
    values = st.sampled_from([0.0, 1.0, -2.5, big, -big, big / 2, float("nan"), float("inf"), float("-inf")])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(values, min_size=1, max_size=40))
    def check(entries):
        x = torch.tensor(entries, dtype=torch.float64).to(dtype)
        assert _finite(x) == bool(torch.isfinite(x).all())

    check()
    assert _finite(torch.full((1000,), big, dtype=dtype))  # the sum overflows; every entry is finite


def test_every_shard_is_on_disk_before_the_output_is_renamed_into_place(tiny_llamas, tmp_path, pm, monkeypatch):
    """The output directory appears only after each weight shard was fsynced, not only the last one."""
    import mergebench.core.writer as writer

    synced = []
    real_fsync = writer.os.fsync

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    out = tmp_path / "merged"
    mergebench.merge("average", experts=[tiny_llamas["e0"], tiny_llamas["e1"]], output=out, max_shard_size="6KB",
                     plugin_manager=pm)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(n for n in synced if n.endswith(".safetensors")) == shards


def test_each_tensor_written_is_handed_to_the_disk_at_once(tiny_llamas, tmp_path, pm, monkeypatch):
    """After each tensor the shard's written bytes are flushed and their write-back started, so the fsync at the
    shard's end has little left to write; on a pipe (or where Linux's call is missing) it does nothing and
    raises nothing."""
    import mergebench.core.writer as writer
    from mergebench.core.memory import start_writeback

    calls = []
    monkeypatch.setattr(writer, "start_writeback",
                        lambda fd: calls.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, os.fstat(fd).st_size)))
    out = tmp_path / "merged"
    mergebench.merge("average", experts=[tiny_llamas["e0"], tiny_llamas["e1"]], output=out, max_shard_size="6KB",
                     plugin_manager=pm)
    shards = {p.name: p.stat().st_size for p in out.glob("model-*.safetensors")}
    written = [n for n, info in load_dir(out).items() if info.numel()]
    assert len(calls) == len(written) and {name for name, _ in calls} == set(shards)
    for name, size in shards.items():
        sizes = [at for shard, at in calls if shard == name]
        assert sizes == sorted(set(sizes)) and sizes[-1] == size  # every tensor's bytes, up to the whole shard
    read, write = os.pipe()
    try:
        start_writeback(write)
    finally:
        os.close(read), os.close(write)


def _two_large_and_many_small(tmp_path):
    """A base and two experts: an embedding first and a head last in the output's order, both 64 x 8 (the
    largest), and 16 small layers between them."""
    g = torch.Generator().manual_seed(5)
    models = []
    for name in ("base", "e0", "e1"):
        tensors = {"a_embed.weight": torch.randn(64, 8, generator=g),
                   **{f"b_layer.{i:02d}.weight": torch.randn(4, 8, generator=g) for i in range(16)},
                   "c_head.weight": torch.randn(64, 8, generator=g)}
        models.append(write_model(tmp_path / name, tensors))
    return models


def _timed_mean_method(log, fail_on=None, elementwise=False):
    """A mean that takes 0.4 s on a 64 x 8 tensor (one chunk) and 0.05 s on others, logging (name, start, end,
    torch's thread count)."""
    import threading
    import time

    from mergebench.core.registry import MergeMethod

    lock = threading.Lock()

    def slow_mean(base, experts, params, ctx):
        start = time.perf_counter()
        if ctx.name == fail_on:
            raise ValueError("deliberate failure")
        time.sleep(0.4 if base.shape[0] == 64 else 0.05)
        with lock:
            log.append((ctx.name, start, time.perf_counter(), torch.get_num_threads()))
        return sum(experts) / len(experts)

    return MergeMethod(name="slow_mean", description="a timed mean", merge=slow_mean, elementwise=elementwise)


@pytest.mark.parametrize("elementwise", [False, True])
def test_a_largest_tensor_is_merged_alone_on_every_workers_cores(tmp_path, pm, elementwise):
    """A whole-tensor method's tensors of the largest size (an embedding first in the output's order, a head
    last) are merged with nothing beside them, so the engine holds (N + 2) copies of the largest tensor at most,
    and on both workers' cores; the small layers between them run two at a time on one core each. Both large
    tensors are merged first (the output is written largest first), so none is left running at the end with the
    other core idle. Written in order, the output is the one-worker merge's, bit for bit. An elementwise method
    streams chunks with no gate: the embedding and the head run beside each other, one core each."""
    from conftest import method_plugin

    base, *experts = _two_large_and_many_small(tmp_path)
    log: list[tuple[str, float, float, int]] = []
    pm.register(method_plugin(_timed_mean_method(log, elementwise=elementwise)))
    mergebench.merge("slow_mean", base=base, experts=experts, output=tmp_path / "two", plugin_manager=pm, threads=2)
    times = {name: (start, end) for name, start, end, _ in log}
    threads = {name: count for name, _, _, count in log}
    embed, head = times["a_embed.weight"], times["c_head.weight"]
    layers = [span for name, span in times.items() if name.startswith("b_layer")]
    beside = [s for s in layers if s[0] < embed[1] and s[1] > embed[0] or s[0] < head[1] and s[1] > head[0]]
    together = sum(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(layers) for b in layers[i + 1:])
    assert together >= 4  # the small ones share the cores
    assert max(end for _, end in layers) > max(embed[1], head[1])  # the large ones are not left to the end
    if elementwise:
        assert embed[0] < head[1] and head[0] < embed[1] and set(threads.values()) == {1}
    else:
        assert not beside, "a small tensor was merged beside a tensor of the largest size"
        assert threads["a_embed.weight"] == threads["c_head.weight"] == 2
        assert {threads[n] for n in times if n.startswith("b_layer")} == {1}
    log.clear()
    mergebench.merge("slow_mean", base=base, experts=experts, output=tmp_path / "one", plugin_manager=pm, threads=1)
    assert {count for *_, count in log} == {1}
    two, one = load_dir(tmp_path / "two"), load_dir(tmp_path / "one")
    assert list(two) == list(one) and all(torch.equal(two[n], one[n]) for n in one)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "two" / "model.safetensors"), "pt") as f:  # written in the output's order
        assert list(f.keys()) == sorted(f.keys())


@pytest.mark.parametrize("fail_on", ["c_head.weight", "a_embed.weight", "b_layer.03.weight"])
def test_a_failure_in_one_tensor_ends_a_two_worker_merge_without_hanging(tmp_path, pm, fail_on):
    import threading

    from conftest import method_plugin

    base, *experts = _two_large_and_many_small(tmp_path)
    pm.register(method_plugin(_timed_mean_method([], fail_on=fail_on)))
    raised: list[BaseException] = []

    def run():
        try:
            mergebench.merge("slow_mean", base=base, experts=experts, output=tmp_path / "out", plugin_manager=pm,
                             threads=2)
        except BaseException as exc:  # noqa: BLE001
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the merge hung after a tensor's merge failed"
    # the library raises the method's own exception (the CLI reports it as the plugin's)
    assert len(raised) == 1 and isinstance(raised[0], ValueError) and str(raised[0]) == "deliberate failure"
    assert not (tmp_path / "out").exists()
