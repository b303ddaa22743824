"""Data-aware merging: RegMean against its closed form, Gram and Fisher statistics against hooks and gradients
computed here independently, the calibration cache, and the user errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mergekit_ref import llama_family, read_model, write_tokenizer
from safetensors.torch import save_file

from mergebench.cli.main import cli
from mergebench.core import calibration, in_memory
from mergebench.core.calibration import CalibrationData, CalibrationRequest, Gram
from mergebench.core.context import TensorContext
from mergebench.core.errors import InputError, ParameterError
from mergebench.core.tensor_io import open_local, read_safetensors_header
from mergebench.plugins import fisher as fisher_module
from mergebench.plugins import regmean as regmean_module

TOKENS = ["[UNK]"] + [f"w{i}" for i in range(63)]  # one per row of the tiny Llamas' 64-row embedding
LINEAR = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Two tiny float32 Llama experts (2 layers) with a word-level tokenizer, and a calibration file: texts of
    different lengths (so batches are padded), one longer than max_length, and a prompt/completion pair."""
    root = tmp_path_factory.mktemp("calib")
    paths = llama_family(root, n_experts=2, scale=0.3, layers=2)
    for key in ("e0", "e1"):
        write_tokenizer(paths[key], TOKENS)
    rng = random.Random(0)
    rows = [{"text": " ".join(f"w{rng.randrange(63)}" for _ in range(rng.randrange(3, 12)))} for _ in range(9)]
    rows.append({"text": " ".join(f"w{rng.randrange(63)}" for _ in range(40))})  # cut to max_length
    rows.append({"prompt": "w1 w2 w3", "completion": " w4 w5"})
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    paths["data"], paths["rows"] = data, rows
    return paths


def spec(family, **extra):
    return CalibrationData.parse({"data": str(family["data"]), "max_length": 16, "batch_size": 4, **extra})


def method(pm, name):
    return pm.merge_methods().get(name)


def ctx_with(grams, weights=None):
    return TensorContext("layer.weight", tuple(weights or [1.0] * len(grams)), statistics=tuple(grams))


def closed_form(weights, grams, alpha, w=None):
    """(sum_i w_i W_i G~_i)(sum_i w_i G~_i)^-1 in float64 by an explicit inverse, G~ = alpha G + (1 - alpha) diag(G)."""
    w = w or [1.0] * len(weights)
    tilde = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    lhs = sum(wi * W @ g for wi, W, g in zip(w, weights, tilde))
    return lhs @ np.linalg.inv(sum(wi * g for wi, g in zip(w, tilde)))


# ---- (1) RegMean's maths against the closed form ------------------------------------------------------------

def linear_experts(seed=0, n_in=6, n_out=4, tokens=(20, 30)):
    g = torch.Generator().manual_seed(seed)
    experts = [torch.nn.Linear(n_in, n_out) for _ in tokens]
    for e in experts:
        e.weight.data = torch.randn(n_out, n_in, generator=g, dtype=torch.float64).float()
    xs = [torch.randn(n, n_in, generator=g, dtype=torch.float64) * (1 + torch.arange(n_in)) for n in tokens]
    return [e.weight.detach() for e in experts], xs


# BLOCK = 13: the solve goes by blocks of two output columns (13 // 6 inputs), each written over expert 0's; with
# 5 outputs B is held whole, with 13 (more than N = 2 times the 6 inputs) the experts' w_i G~_i are held instead
@pytest.mark.parametrize("n_out", [5, 13])
@pytest.mark.parametrize("block", [regmean_module.BLOCK, 13])
@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.3, 0.0])
def test_regmean_is_the_closed_form_with_off_diagonal_scaling(pm, alpha, block, n_out, monkeypatch):
    monkeypatch.setattr(regmean_module, "BLOCK", block)
    weights, xs = linear_experts(n_out=n_out)
    grams = [(x.T @ x).numpy() for x in xs]
    ws = [W.double().numpy() for W in weights]
    expected = closed_form(ws, grams, alpha)
    got = method(pm, "regmean").merge(None, [W.clone() for W in weights], {"alpha": alpha},
                                      ctx_with([Gram(torch.tensor(g, dtype=torch.float32), 1) for g in grams]))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    # with the weights 2 : 1, each expert's regression term scaled
    weighted = method(pm, "regmean").merge(None, [W.clone() for W in weights], {"alpha": alpha},
                                           ctx_with([Gram(torch.tensor(g, dtype=torch.float32), 1) for g in grams],
                                                    [2.0, 1.0]))
    np.testing.assert_allclose(weighted.numpy(), closed_form(ws, grams, alpha, [2.0, 1.0]), rtol=1e-5, atol=1e-5)
    if alpha == 1.0:  # the least-squares optimum: the gradient of sum_i ||X_i W^T - X_i W_i^T||^2 vanishes
        gradient = sum(x.numpy().T @ (x.numpy() @ (got.double().numpy() - w).T) for x, w in zip(xs, ws))
        assert np.abs(gradient).max() < 1e-4 * max(np.abs(g).max() for g in grams)
        assert not np.allclose(got.numpy(), (ws[0] + ws[1]) / 2, atol=1e-3)  # and not the plain average


@pytest.mark.parametrize("block", [regmean_module.BLOCK, 13])
def test_regmean_equal_experts_transposed_layout_singular_inputs_and_other_tensors(pm, block, monkeypatch):
    monkeypatch.setattr(regmean_module, "BLOCK", block)
    regmean = method(pm, "regmean").merge
    weights, xs = linear_experts(seed=1)
    grams = [Gram((x.T @ x).float(), len(x)) for x in xs]
    same = regmean(None, [weights[0].clone(), weights[0].clone()], {"alpha": 0.9}, ctx_with(grams))
    torch.testing.assert_close(same, weights[0], rtol=1e-5, atol=1e-6)
    # transformers' Conv1D stores W as in x out: the same merge, transposed
    flipped = regmean(None, [W.T.clone() for W in weights], {"alpha": 0.5},
                      ctx_with([Gram(g.matrix, g.tokens, transposed=True) for g in grams]))
    expected = closed_form([W.double().numpy() for W in weights], [g.matrix.double().numpy() for g in grams], 0.5)
    np.testing.assert_allclose(flipped.numpy(), expected.T, rtol=1e-5, atol=1e-5)
    # input feature 2 never active: the data does not determine column 2, which keeps the weighted mean;
    # the other columns are the closed form of the problem without that feature
    dead = [x.clone() for x in xs]
    for x in dead:
        x[:, 2] = 0
    got = regmean(None, [W.clone() for W in weights], {"alpha": 1.0},
                  ctx_with([Gram((x.T @ x).float(), len(x)) for x in dead], [3.0, 1.0]))
    torch.testing.assert_close(got[:, 2], (3 * weights[0][:, 2] + weights[1][:, 2]) / 4)
    live = [0, 1, 3, 4, 5]
    reduced = closed_form([W.double().numpy()[:, live] for W in weights],
                          [(x.T @ x).numpy()[np.ix_(live, live)] for x in dead], 1.0, [3.0, 1.0])
    np.testing.assert_allclose(got[:, live].numpy(), reduced, rtol=1e-5, atol=1e-5)
    # fewer tokens than inputs (rank 3 of 6) at alpha = 1: still a least-squares optimum (the normal equations
    # hold), and in the directions the data leaves free (the scaled Gram's null space) it keeps the mean
    few = [x[:1] for x in xs] + [xs[0][1:2] * 0.5 + xs[1][2:3]]
    w3 = weights + [weights[0] * 0.5]
    got = regmean(None, [W.clone() for W in w3], {"alpha": 1.0}, ctx_with([Gram((x.T @ x).float(), 1) for x in few]))
    a = sum((x.T @ x).numpy() for x in few)
    b = sum((x.T @ x).numpy() @ W.double().numpy().T for x, W in zip(few, w3))
    x_t = got.double().numpy().T
    assert np.abs(a @ x_t - b).max() < 1e-4 * np.abs(b).max()
    s = 1 / np.sqrt(np.diag(a))
    _, sv, vt = np.linalg.svd(a * s[:, None] * s[None, :])
    null = vt[sv < 1e-6 * sv[0]]
    assert len(null) == 3
    mean_t = sum(W.double().numpy() for W in w3).T / 3
    assert np.abs(null @ ((x_t - mean_t) / s[:, None])).max() < 1e-4
    # no statistic (a norm, a bias, an embedding): the weighted mean
    norms = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    mean = regmean(None, [n.clone() for n in norms], {"alpha": 0.9}, TensorContext("n", (1.0, 3.0)))
    torch.testing.assert_close(mean, (norms[0] + 3 * norms[1]) / 4)


# ---- (2) Gram statistics of a real transformers model, against hooks written here -------------------------

def reference_inputs(model_dir, texts, max_length, names):
    """Each named linear layer's inputs, recorded by forward pre-hooks, one unpadded text at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    seen = {n: [] for n in names}
    modules = dict(model.named_modules())
    for n in names:
        modules[n.removesuffix(".weight")].register_forward_pre_hook(
            lambda m, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for text in texts:
            ids = tok(text)["input_ids"][-max_length:]
            model(input_ids=torch.tensor([ids]))
    return {n: torch.cat(v) for n, v in seen.items()}


# block 5: several blocks of the lower triangle, and a narrower last one, at the tiny model's widths (16 and 32)
@pytest.mark.parametrize("block", [calibration.GRAM_BLOCK, 5])
def test_gram_statistics_are_x_transpose_x_of_each_linear_layers_inputs(family, block, monkeypatch):
    monkeypatch.setattr(calibration, "GRAM_BLOCK", block)
    data = spec(family)
    source = open_local(str(family["e0"]), family["e0"], False)
    stats = calibration.statistics(source, CalibrationRequest("gram"), data)
    linear = {n for n in source.tensors if n.endswith("proj.weight")} | {"lm_head.weight"}
    assert set(stats.names()) == linear  # every linear weight, nothing else (norms and embeddings are averaged)
    texts = [r.get("text", r.get("prompt", "") + r.get("completion", "")) for r in family["rows"]]
    names = [LINEAR, "lm_head.weight", *(f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))]
    inputs = reference_inputs(family["e0"], texts, 16, names)
    for name in names:
        gram = stats.get(name)
        x = inputs[name]
        assert gram.tokens == len(x) == sum(min(16, len(t.split())) for t in texts)
        assert not gram.transposed
        torch.testing.assert_close(gram.matrix.double(), x.T @ x, rtol=1e-4, atol=1e-4 * float((x.T @ x).abs().max()))
    assert stats.get("model.norm.weight") is None
    # layers reading one input share its Gram, stored once: one of q/k/v and one of gate/up per layer
    stored = set(read_safetensors_header(stats.path))
    for i in (0, 1):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            readers = {n for n in linear if n.startswith(f"model.layers.{i}.") and n.split(".")[-2] in group}
            assert len(readers) == len(group) and len(readers & stored) == 1, (readers, stored)
    assert {n for n in linear if n.endswith(("o_proj.weight", "down_proj.weight"))} <= stored


@pytest.mark.parametrize("n", [1, 255, 256, 257, 600])
def test_lower_gram_by_blocks_is_x_transpose_x(n):
    x = torch.randn(40, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    acc = torch.full((n, n), 2.0, dtype=torch.float64)  # sums onto what is there
    calibration._add_lower_gram_(acc, x)
    calibration._add_lower_gram_(acc, x[:7])
    want = x.T @ x + x[:7].T @ x[:7] + 2.0
    got = calibration._symmetrize_(acc)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.T)  # exactly: the lower triangle's own values, mirrored


def test_the_gram_pass_computes_no_logits_unless_the_forward_reads_them(family, monkeypatch):
    """The output head's logits are not computed (a third of a small model's pass); a model whose forward reads
    them gets its first batch run again with the head restored, and the same statistics."""
    from transformers import LlamaForCausalLM

    calls = []
    head_forward = torch.nn.Linear.forward

    def counted(self, x):
        if x.shape[-1] == self.in_features and self.out_features == len(TOKENS):
            calls.append(x.shape)
        return head_forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    source = open_local(str(family["e0"]), family["e0"], False)
    plain = calibration.statistics(source, CalibrationRequest("gram"), spec(family))
    assert calls == []
    forward = LlamaForCausalLM.forward

    def reads_logits(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits.argmax(-1)  # fails on an empty vocabulary dimension
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", reads_logits)
    monkeypatch.setenv("MERGEBENCH_HOME", str(family["data"].parent / "home-reads-logits"))
    again = calibration.statistics(source, CalibrationRequest("gram"), spec(family))
    assert len(calls) == 3  # the three batches of 11 texts, 4 at a time
    assert again.names() == plain.names()
    for name in plain.names():
        a, b = plain.get(name), again.get(name)
        assert a.tokens == b.tokens
        torch.testing.assert_close(a.matrix, b.matrix, rtol=1e-6, atol=1e-6)


def test_a_layer_that_stops_sharing_its_input_gets_its_own_gram(family, monkeypatch):
    """q/k/v read one input tensor in the first batch, so they share one product; where k's input is another
    tensor in a later batch (here: twice the input in the last batch, the only one of 3 texts), the pass starts
    again with a product per layer, and k's Gram is its own: sum_b<3 X_b^T X_b + 4 X_3^T X_3."""
    load = calibration.load_model
    k_name = "model.layers.0.self_attn.k_proj.weight"
    q_name = "model.layers.0.self_attn.q_proj.weight"

    def doubled_in_the_last_batch(root, device):
        model = load(root, device)
        dict(model.named_modules())[k_name.removesuffix(".weight")].register_forward_pre_hook(
            lambda module, args: (args[0] * 2,) if args[0].shape[0] == 3 else None)
        return model

    monkeypatch.setattr(calibration, "load_model", doubled_in_the_last_batch)
    source = open_local(str(family["e0"]), family["e0"], False)
    data = spec(family)  # batches of 4 texts
    stats = calibration.statistics(source, CalibrationRequest("gram"), data)
    texts = [r.get("text", r.get("prompt", "") + r.get("completion", "")) for r in family["rows"]]
    x = reference_inputs(family["e0"], texts, 16, [q_name])[q_name]  # one text at a time, in order
    assert len(texts) == 11
    first = sum(min(16, len(t.split())) for t in texts[:8])
    want = x[:first].T @ x[:first] + 4 * (x[first:].T @ x[first:])
    got = stats.get(k_name).matrix.double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    torch.testing.assert_close(stats.get(q_name).matrix.double(), x.T @ x, rtol=1e-4,
                               atol=1e-4 * float((x.T @ x).abs().max()))


# ---- (3) end to end: the CLI merge, the cache -------------------------------------------------------------

def test_cli_regmean_merge_is_the_closed_form_and_a_second_merge_reads_the_cache(family, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    args = ["merge", "regmean", "-e", str(family["e0"]), "-e", str(family["e1"]), "-w", "1", "-w", "2",
            "--calibration-data", str(family["data"]), "-q"]
    result = CliRunner().invoke(cli, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    merged = read_model(out)
    experts = [read_model(family[k]) for k in ("e0", "e1")]
    data = CalibrationData.parse({"data": str(family["data"])})
    grams = [calibration.statistics(open_local(str(family[k]), family[k], False), CalibrationRequest("gram"),
                                    data).get(LINEAR).matrix.double().numpy() for k in ("e0", "e1")]
    expected = closed_form([e[LINEAR].double().numpy() for e in experts], grams, 0.9, [1.0, 2.0])
    np.testing.assert_allclose(merged[LINEAR].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected, (experts[0][LINEAR] + 2 * experts[1][LINEAR]).numpy() / 3, atol=1e-3)
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(merged[norm], (experts[0][norm] + 2 * experts[1][norm]) / 3)

    def no_model(*a, **k):
        raise AssertionError("the model was run although its statistics are cached")

    monkeypatch.setattr(calibration, "load_model", no_model)
    again = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert all(torch.equal(t, read_model(tmp_path / "again")[n]) for n, t in merged.items())
    # other data (or other parameters) is another entry: the model has to run again
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "w1 w2 w3"}) + "\n")
    with pytest.raises(AssertionError, match="was run"):
        calibration.statistics(open_local("e0", family["e0"], False), CalibrationRequest("gram"),
                               CalibrationData.parse({"data": str(other)}))
    with pytest.raises(AssertionError, match="was run"):
        calibration.statistics(open_local("e0", family["e0"], False), CalibrationRequest("gram"),
                               CalibrationData.parse({"data": str(family["data"]), "samples": 5}))


def test_each_expert_its_own_calibration_file(family, tmp_path):
    """--calibration-data once per expert: expert i's Gram comes from file i (RegMean on each model's own task
    data), the closed form holds with those Grams, and the card records each file by content hash."""
    from mergebench.core.hashing import sha256_file

    other = tmp_path / "other.jsonl"
    rng = random.Random(1)
    other.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(5)}" for _ in range(8))}) + "\n"
                             for _ in range(6)))
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", "regmean", "-e", str(family["e0"]), "-e", str(family["e1"]),
                                      "--calibration-data", str(family["data"]), "--calibration-data", str(other),
                                      "-p", "alpha=1.0", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    merged, experts = read_model(out), [read_model(family[k]) for k in ("e0", "e1")]
    grams = [calibration.statistics(open_local(str(family[k]), family[k], False), CalibrationRequest("gram"),
                                    CalibrationData.parse({"data": str(f)})).get(LINEAR).matrix.double().numpy()
             for k, f in (("e0", family["data"]), ("e1", other))]
    expected = closed_form([e[LINEAR].double().numpy() for e in experts], grams, 1.0)
    np.testing.assert_allclose(merged[LINEAR].numpy(), expected, rtol=1e-4, atol=1e-5)
    same = [calibration.statistics(open_local(str(family[k]), family[k], False), CalibrationRequest("gram"),
                                   CalibrationData.parse({"data": str(family["data"])})).get(LINEAR)
            .matrix.double().numpy() for k in ("e0", "e1")]
    assert not np.allclose(expected, closed_form([e[LINEAR].double().numpy() for e in experts], same, 1.0),
                           atol=1e-4)  # one file for both would be another merge
    record = json.loads((out / "mergebench.json").read_text())["calibration"]
    assert [(r["expert"], r["data"], r["sha256"], r["statistic"]) for r in record] == [
        (1, str(family["data"].resolve()), sha256_file(family["data"]), "gram"),
        (2, str(other.resolve()), sha256_file(other), "gram")]
    # and the data's parameters and the statistics' artefact (the cache entry they were read from)
    assert [r["parameters"] for r in record] == [CalibrationData.parse({"data": str(other)}).parameters()] * 2
    for r, k, f in zip(record, ("e0", "e1"), (family["data"], other)):
        stats = calibration.statistics(open_local(str(family[k]), family[k], False), CalibrationRequest("gram"),
                                       CalibrationData.parse({"data": str(f)}))
        assert r["artefact"] == stats.path.parent.name
    three = CliRunner().invoke(cli, ["merge", "regmean", "-e", str(family["e0"]), "-e", str(family["e1"]),
                                     *["--calibration-data", str(other)] * 3, "-q", "-o", str(tmp_path / "x")])
    assert_user_error(three, "lists 3 file(s) for 2 expert(s)")
    assert not (tmp_path / "x").exists()


# ---- (4) Fisher statistics against gradients computed here, and the Fisher merge --------------------------

def reference_fisher(model_dir, rows, max_length):
    """mean over examples of (grad of the example's log-likelihood)^2, through transformers' own loss: the
    mean cross-entropy over the labelled tokens (-100 over a pair's prompt) times their number."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for row in rows:
        prompt, completion = row.get("prompt", ""), row.get("text", row.get("completion"))
        ids = tok(prompt + completion)["input_ids"][-max_length:]
        labels = list(ids)
        labels[:len(tok(prompt)["input_ids"])] = [-100] * len(tok(prompt)["input_ids"])
        labels = torch.tensor([labels])
        model.zero_grad()
        out = model(input_ids=torch.tensor([ids]), labels=labels)
        (-out.loss * (labels[0, 1:] != -100).sum()).backward()
        for n, p in model.named_parameters():
            total[n] += p.grad.double() ** 2
    return {n: t / len(rows) for n, t in total.items()}


def test_fisher_statistics_and_merge(family, pm):
    data = spec(family)
    sources = [open_local(str(family[k]), family[k], False) for k in ("e0", "e1")]
    stats = [calibration.statistics(s, CalibrationRequest("fisher"), data) for s in sources]
    reference = reference_fisher(family["e0"], family["rows"], 16)
    assert set(stats[0].names()) == set(sources[0].tensors) == set(reference)
    for name, expected in reference.items():
        got = stats[0].get(name).values.double()
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6 * float(expected.abs().max()))
    # the whole model's norm: over named_parameters (a tied parameter once)
    norm = float(torch.sqrt(sum(t.square().sum() for t in reference.values())))
    assert stats[0].get(LINEAR).model_norm == pytest.approx(norm, rel=1e-3)
    # the merge: sum_i w_i max(F_i, floor) theta_i / sum_i w_i max(F_i, floor), per entry
    experts = [read_model(family[k]) for k in ("e0", "e1")]
    floor = 1e-3
    merged = in_memory.merge(method(pm, "fisher"), {"fisher_floor": floor}, None, experts, weights=[1.0, 3.0],
                             statistics=stats)
    for name in (LINEAR, "model.norm.weight", "model.embed_tokens.weight"):
        f = [s.get(name).values.clamp_min(floor) * w for s, w in zip(stats, (1.0, 3.0))]
        torch.testing.assert_close(merged[name], (f[0] * experts[0][name] + f[1] * experts[1][name]) / (f[0] + f[1]))
    # normalize: each expert's Fisher over its whole-model norm first (the authors' normalize_fishers)
    norms = [float(torch.sqrt(sum(s.get(n).values.double().square().sum() for n in s.names()))) for s in stats]
    assert norms[0] != pytest.approx(norms[1], rel=1e-2)  # else the test could not tell normalising from not
    merged = in_memory.merge(method(pm, "fisher"), {"fisher_floor": floor, "normalize": True}, None, experts,
                             weights=[1.0, 3.0], statistics=stats)
    for name in (LINEAR, "model.norm.weight"):
        f = [s.get(name).values.clamp_min(floor) * w / n for s, w, n in zip(stats, (1.0, 3.0), norms)]
        torch.testing.assert_close(merged[name], (f[0] * experts[0][name] + f[1] * experts[1][name]) / (f[0] + f[1]))
    with pytest.raises(InputError, match="normalize needs each expert's whole-model Fisher norm"):
        in_memory.merge(method(pm, "fisher"), {"normalize": True}, None, experts,
                        statistics=[{n: s.get(n).values for n in s.names()} for s in stats])
    weights = stats[0].get("model.embed_tokens.weight").values  # rows of tokens the data never uses: no information
    assert (weights.sum(1) == 0).any() and (weights.sum(1) > floor).any()



@pytest.mark.parametrize("floor", [0.0, 1e-3])
def test_fisher_by_blocks_is_the_per_entry_formula(pm, monkeypatch, floor):
    """The per-entry sums go by blocks of fisher.BLOCK entries (7 here: uneven) written over expert 0's scratch
    copy: the formula per entry, and where no expert has information (floor 0, every F_i = 0) the weighted mean."""
    monkeypatch.setattr(fisher_module, "BLOCK", 7)
    g = torch.Generator().manual_seed(5)
    experts = [torch.randn(9, 5, generator=g) for _ in range(3)]
    fishers = [torch.rand(9, 5, generator=g) * (torch.rand(9, 5, generator=g) > 0.4) for _ in range(3)]
    fishers[0][2:4] = fishers[1][2:4] = fishers[2][2:4] = 0.0  # two rows no expert's data reaches
    weights = (1.0, 2.0, 0.5)
    got = method(pm, "fisher").merge(None, [e.clone() for e in experts], {"fisher_floor": floor, "normalize": False},
                                     TensorContext("w", weights, statistics=tuple(fishers)))
    f = [fi.double().clamp_min(floor) * w for fi, w in zip(fishers, weights)]
    want = sum(fi * e.double() for fi, e in zip(f, experts)) / sum(f)
    mean = sum(w * e.double() for w, e in zip(weights, experts)) / sum(weights)
    want = torch.where(sum(f) == 0, mean, want)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)

def test_tied_embeddings_get_no_gram_and_one_fisher_under_both_names(family, tmp_path):
    """A tied output head is the embedding: RegMean averages it (its Gram would describe only one of its two
    roles), and its Fisher (gradients of both uses) is stored under each name the files hold."""
    import shutil

    tied = tmp_path / "tied"
    shutil.copytree(family["e0"], tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = read_model(tied)  # both names in the files, one value (transformers ties only then)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
              str(tied / "model.safetensors"))
    source = open_local("tied", tied, False)
    grams = calibration.statistics(source, CalibrationRequest("gram"), spec(family))
    assert grams.get("lm_head.weight") is None and grams.get(LINEAR) is not None
    fishers = calibration.statistics(source, CalibrationRequest("fisher"), spec(family))
    head, embedding = fishers.get("lm_head.weight"), fishers.get("model.embed_tokens.weight")
    assert torch.equal(head.values, embedding.values)
    assert len({"lm_head.weight", "model.embed_tokens.weight"} & set(read_safetensors_header(fishers.path))) == 1
    # the whole-model norm counts the tied parameter once
    once = sum(float(fishers.get(n).values.double().square().sum()) for n in fishers.names() if n != "lm_head.weight")
    assert head.model_norm == pytest.approx(once ** 0.5, rel=1e-9)


# ---- (5) user errors: one line, exit code 2 ----------------------------------------------------------------

def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert len(text.splitlines()) == 1 and text.startswith("Error: ") and "Traceback" not in text, text
    for f in fragments:
        assert f in text, text


@pytest.mark.parametrize("name", ["regmean", "fisher"])
def test_errors(family, tmp_path, name):
    def merge(*extra):
        return CliRunner().invoke(cli, ["merge", name, "-e", str(family["e0"]), "-e", str(family["e1"]),
                                        "-o", str(tmp_path / "out"), "-q", *map(str, extra)])

    assert_user_error(merge(), "learns from data", "--calibration-data")
    assert_user_error(merge("--calibration-data", tmp_path / "nope.jsonl"), "nope.jsonl", "no such calibration data")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert_user_error(merge("--calibration-data", tmp_path / "empty.jsonl"), "no calibration examples")
    (tmp_path / "bad.jsonl").write_text('{"text": "w1"}\n{"text": \n')
    assert_user_error(merge("--calibration-data", tmp_path / "bad.jsonl"), "bad.jsonl line 2: not JSON")
    (tmp_path / "keys.jsonl").write_text('{"sentence": "w1"}\n')
    assert_user_error(merge("--calibration-data", tmp_path / "keys.jsonl"), "line 1", "['sentence']")
    assert_user_error(merge("--calibration-data", family["data"], "-w", "1", "-w", "-1"), "weights must be >= 0")
    assert not (tmp_path / "out").exists()


def test_calibration_settings_are_checked(family):
    with pytest.raises(ParameterError, match="'samples' of calibration must be in"):
        CalibrationData.parse({"data": str(family["data"]), "samples": 0})
    with pytest.raises(ParameterError, match=r"unknown calibration key\(s\) \['split'\]"):
        CalibrationData.parse({"data": str(family["data"]), "split": "train"})
    with pytest.raises(ParameterError, match="unknown calibration statistic 'hessian'"):
        CalibrationRequest("hessian")
    rows = CalibrationData.parse({"data": str(family["data"]), "samples": 4, "seed": 1}).chosen()
    assert len(rows) == 4 and rows == CalibrationData.parse({"data": str(family["data"]), "samples": 4,
                                                             "seed": 1}).chosen()
    bare = open_local("bare", family["e0"] / "model.safetensors", False)
    with pytest.raises(InputError, match="needs a model directory"):
        calibration.statistics(bare, CalibrationRequest("gram"), spec(family))
