"""`mergebench report`: the paper's findings tested on runs whose every effect is known by construction, the
per-category view against the recorded normalised scores of a real toy study, and the plan against
statistics.required_n on hand-computed variances."""

from __future__ import annotations

import itertools
import json
import re
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mergebench.cli.main import cli
from mergebench.core.errors import InputError
from mergebench.study import leaderboard as lb
from mergebench.study import per_example, statistics
from mergebench.study import report as rep
from mergebench.study.database import ResultsDB, score_statements
from mergebench.study.normalise import normalise

from test_cli_errors import assert_user_error

A = pytest.approx
PT, IT = rep.PRETRAINED, rep.INSTRUCTION_TUNED

# ---- a constructed run ---------------------------------------------------------------------------------
# Held-in categories a..d (one dataset each), held-out x, y. Every expert scores 0.8 on each example of its own
# dataset and 0.4 elsewhere, the base 0.5 and the multitask model 0.8 on held-in, 0.5 * MULTITASK_OUT on held-out:
# the references are constant over examples. A merge's examples are ``retention * 0.8`` (held-in) or
# ``generalisation * 0.5`` (held-out) plus noise centred on each dataset, so its normalised held-in is exactly
# ``retention`` and its held-out exactly ``generalisation``, while resampling examples moves them.
CATEGORIES = ("a", "b", "c", "d")
SUITE = {"name": "s", "held_in": {c: [f"{c}1"] for c in CATEGORIES}, "held_out": {"x": ["x1"], "y": ["y1"]}}
EXPERT, OTHER, BASE = 0.8, 0.4, 0.5
MULTITASK_OUT = 1.02
EXAMPLES = 40


def merged(seed: int, n: int) -> list[str]:
    """The categories seed ``seed`` merges at N = ``n``: a rotation, so seeds differ."""
    order = CATEGORIES[seed % 4:] + CATEGORIES[:seed % 4]
    return list(order[:n])


def noisy(rng, mean: float, sd: float) -> np.ndarray:
    z = rng.standard_normal(EXAMPLES)
    return mean + sd * (z - z.mean())  # the dataset's mean is exactly ``mean``


def constant(v: float) -> np.ndarray:
    return np.full(EXAMPLES, v)


def add_model(db, key: str, values: dict[str, np.ndarray]) -> None:
    statements = score_statements(key, "test", {d: float(v.mean()) for d, v in values.items()})
    for sql, args in statements + per_example.statements(key, "test", values):
        db.conn.execute(sql, args)


def write_run(path, retention, generalisation=lambda *k: 1.0, sizes=("small", "large"), kinds=(PT, IT),
              ns=(2, 4), methods=("avg", "ties"), seeds=(0, 1, 2), noise=0.1) -> ResultsDB:
    """``retention(size, kind, n, method, seed)`` and ``generalisation(...)``: each merge's normalised scores."""
    db = ResultsDB(path)
    db.set_meta("suite", SUITE)
    db.set_meta("config", {"bases": [{"size": s, "kind": k} for s in sizes for k in kinds]})  # sizes in this order
    rng = np.random.default_rng(1)
    datasets = [d for ds in SUITE["held_in"].values() for d in ds] + ["x1", "y1"]
    held_out = {d: BASE for d in ("x1", "y1")}
    with db.transaction():  # one commit: the database syncs every commit to disk
        for size, kind, seed in itertools.product(sizes, kinds, seeds):
            models = {("base", None): {d: constant(BASE) for d in datasets},
                      ("multitask", None): {d: constant(held_out[d] * MULTITASK_OUT if d in held_out else EXPERT)
                                            for d in datasets}}
            for c in CATEGORIES:
                models[("expert", c)] = {d: constant(EXPERT if d == f"{c}1" else OTHER) for d in datasets}
            for (role, category), values in models.items():
                key = f"{role}-{category}-{size}-{kind}-{seed}"
                db.conn.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (key, role, seed, size, kind, category, "/nonexistent", None))
                add_model(db, key, values)
            experts = {c: {d: float(v.mean()) for d, v in models[("expert", c)].items()} for c in CATEGORIES}
            for n, m in itertools.product(ns, methods):
                categories = merged(seed, n)
                r, g = retention(size, kind, n, m, seed), generalisation(size, kind, n, m, seed)
                values = {f"{c}1": noisy(rng, EXPERT * r, noise) if c in categories else constant(0.3)
                          for c in CATEGORIES}
                values.update({d: noisy(rng, BASE * g, noise) for d in held_out})
                key = f"m-{size}-{kind}-{n}-{m}-{seed}"
                add_model(db, key, values)
                norm = normalise({d: float(v.mean()) for d, v in values.items()},
                                 {c: SUITE["held_in"][c] for c in categories}, SUITE["held_out"], experts,
                                 {d: BASE for d in datasets})
                db.conn.execute("INSERT INTO merges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (seed, size, kind, n, m, json.dumps(categories), "{}", 0.0, norm.held_in,
                                 norm.held_out, json.dumps(norm.__dict__), key, 1.0))
    return db


def finding(report, number: int) -> dict:
    return next(f for f in report["findings"] if f["id"].startswith(f"{number}-"))


def build(db, **kw):
    return rep.build(db, n_boot=kw.pop("n_boot", 1000), **kw)


def strong_base_effect(size, kind, n, method, seed):
    """Instruction-tuned experts keep 0.1 more, and 0.02 more per seed (so the per-seed contrast varies)."""
    return 0.7 + (0.1 + 0.02 * seed if kind == IT else 0.0)


# ---- the verdict rule ----------------------------------------------------------------------------------

def test_outcome_and_verdict_rule_on_their_own():
    assert rep.outcome([0.01, 0.2], 1, 0.0) == rep.AGREES and rep.outcome([-0.2, -0.01], 1, 0.0) == rep.OPPOSES
    assert rep.outcome([-0.01, 0.2], 1, 0.0) == rep.UNCLEAR and rep.outcome(None, 1, 0.0) == rep.UNCLEAR
    assert rep.outcome([-0.2, -0.01], -1, 0.0) == rep.AGREES  # a direction below the threshold
    assert rep.outcome([-0.04, 0.1], 1, -0.05) == rep.AGREES  # non-inferiority: above -D
    assert rep.outcome([-0.2, -0.06], 1, -0.05) == rep.OPPOSES
    assert rep.verdict([rep.AGREES, rep.AGREES]) == rep.REPRODUCED
    assert rep.verdict([rep.AGREES, rep.UNCLEAR]) == rep.PARTLY
    assert rep.verdict([rep.AGREES, rep.OPPOSES]) == rep.PARTLY
    assert rep.verdict([rep.OPPOSES, rep.UNCLEAR]) == rep.NOT_REPRODUCED
    assert rep.verdict([rep.UNCLEAR, rep.UNCLEAR]) == rep.INCONCLUSIVE
    assert rep.verdict([]) == rep.INCONCLUSIVE


@pytest.mark.parametrize("sign, expected", [(1, rep.REPRODUCED), (-1, rep.NOT_REPRODUCED)])
def test_finding_1_follows_a_constructed_effect_and_its_reversal(tmp_path, sign, expected):
    db = write_run(tmp_path / "r.sqlite", lambda s, k, n, m, seed: 0.7 + sign * (0.1 + 0.02 * seed) * (k == IT))
    f = finding(build(db), 1)
    assert f["verdict"] == expected
    assert [t["label"] for t in f["tests"]] == ["small: IT - PT", "large: IT - PT"]
    for t in f["tests"]:  # each size: the mean over (N, method) and seeds of retention(IT) - retention(PT)
        assert t["effect"] == A(sign * (0.1 + 0.02 * 1), abs=1e-6)
        assert t["ci"][0] < t["effect"] < t["ci"][1]
        assert t["outcome"] == (rep.AGREES if sign > 0 else rep.OPPOSES)
        assert t["per_seed"] == {s: A(sign * (0.1 + 0.02 * s), abs=1e-6) for s in (0, 1, 2)}
    # the finding's effect pools its tests: their mean, over the same seeds
    assert f["effect"] == A(sign * 0.12, abs=1e-6) and f["effect_of"] == ["small: IT - PT", "large: IT - PT"]
    assert len(f["rows"]) == 2 * 2 * 2 * 2  # sizes x N x methods x base kinds
    db.close()


def test_finding_1_partly_when_one_size_shows_it_and_inconclusive_when_none_does(tmp_path):
    db = write_run(tmp_path / "p.sqlite", lambda s, k, n, m, seed: 0.7 + 0.15 * (k == IT and s == "large"))
    f = finding(build(db), 1)
    assert f["verdict"] == rep.PARTLY
    small, large = f["tests"]
    assert small["effect"] == A(0.0, abs=1e-6) and small["outcome"] == rep.UNCLEAR and large["outcome"] == rep.AGREES
    assert "1 of 2 tests agree" in f["note"] and "interval contains the threshold: small: IT - PT" in f["note"]
    db.close()
    db = write_run(tmp_path / "z.sqlite", lambda *k: 0.7)
    f = finding(build(db), 1)
    assert f["verdict"] == rep.INCONCLUSIVE and "0 of 2 tests agree" in f["note"]
    db.close()


def test_a_run_without_instruction_tuned_bases_is_inconclusive_saying_why(tmp_path):
    db = write_run(tmp_path / "r.sqlite", lambda *k: 0.7, kinds=(PT,), sizes=("small",))
    report = build(db)
    for number, reason in ((1, "the run has no instruction_tuned base (base kinds: pretrained)"),
                           (2, "the run has one size (small); the finding compares sizes"),
                           (4, "the run has no instruction_tuned base"), (5, "the run has one size (small)")):
        f = finding(report, number)
        assert f["verdict"] == rep.INCONCLUSIVE and reason in f["note"], (number, f["note"])
        assert f["tests"] == [] and f["effect"] is None and f["ci"] is None
    db.close()


def test_findings_2_and_5_compare_sizes_in_their_order(tmp_path):
    # large keeps 0.1 more held-in, and loses 0.05 per doubling of N where small loses 0.15
    def retention(size, kind, n, method, seed):
        drop = 0.05 if size == "large" else 0.15
        return 0.8 + 0.1 * (size == "large") - drop * (n == 4) + 0.01 * seed * (size == "large")

    db = write_run(tmp_path / "r.sqlite", retention)
    report = build(db)
    assert report["run"]["sizes"] == ["small", "large"] and "config" in report["run"]["size_order"]
    two, five = finding(report, 2), finding(report, 5)
    assert two["verdict"] == five["verdict"] == rep.REPRODUCED
    # finding 2: mean over (N, method, seed) of large - small = 0.1 + (0.15 - 0.05) / 2 + 0.01
    assert [t["effect"] for t in two["tests"]] == [A(0.16, abs=1e-6)] * 2
    # finding 5: the change from N=2 to 4, large - small: -0.05 - (-0.15)
    assert [t["effect"] for t in five["tests"]] == [A(0.1, abs=1e-6)] * 2
    assert [t["label"] for t in five["tests"]] == ["instruction-tuned: held-in change N=2->4, large - small",
                                                  "pretrained: held-in change N=2->4, large - small"]
    db.close()


def test_findings_3_4_and_6_on_constructed_effects(tmp_path):
    def retention(size, kind, n, method, seed):  # methods far apart when small or pretrained, together otherwise
        gap = 0.3 if size == "small" else 0.02
        gap += 0.2 if kind == PT else 0.0
        return 0.7 + gap * (method == "ties")

    def generalisation(size, kind, n, method, seed):  # above the base, rising with N; ties 0.2 below multitask
        return 1.05 + 0.05 * (n == 4) - (0.3 if method == "ties" else 0.0) * (n == 4 and size == "large")

    db = write_run(tmp_path / "r.sqlite", retention, generalisation)
    report = build(db)
    three, four, six = finding(report, 3), finding(report, 4), finding(report, 6)
    parts = {t["label"]: t for t in three["tests"]}
    # (a) small, pretrained: merges - base = mean of 0.05 and 0.10 over N -> 0.075
    assert parts["small, pretrained: merges - base"]["effect"] == A(0.075, abs=1e-6)
    assert parts["small, pretrained: N=4 - N=2"]["effect"] == A(0.05, abs=1e-6)
    # large: ties at N=4 drops 0.3: (a) (0.05 + 0.1 + 0.05 - 0.2) / 4 = 0, (b) (0.05 + (0.05 - 0.3)) / 2 = -0.1
    assert parts["large, pretrained: merges - base"]["effect"] == A(0.0, abs=1e-6)
    assert parts["large, pretrained: N=4 - N=2"]["outcome"] == rep.OPPOSES
    assert three["verdict"] == rep.PARTLY and "opposite direction" in three["note"]
    assert "held-out rises at every step of N in 6 of 8" in three["note"]
    # finding 4 at large, instruction-tuned, N=4: avg 1.10 - 1.02 = +0.08 (agrees), ties 0.80 - 1.02 (opposes)
    tests = {t["label"]: t for t in four["tests"]}
    assert tests["large, IT, N=4: avg - multitask"]["effect"] == A(0.08, abs=1e-6)
    assert tests["large, IT, N=4: avg - multitask"]["outcome"] == rep.AGREES
    assert tests["large, IT, N=4: ties - multitask"]["outcome"] == rep.OPPOSES
    assert four["verdict"] == rep.PARTLY and "(the paper: N=8)" in four["note"]
    assert all(t["threshold"] == -0.05 for t in four["tests"])
    # finding 6: spread = |ties - avg| per group; (a) small - large: 0.3 - 0.02; (b) pretrained - IT: 0.2
    six_tests = {t["label"]: t for t in six["tests"]}
    assert six_tests["pretrained: spread small - large"]["effect"] == A(0.28, abs=1e-6)
    assert six_tests["large: spread PT - IT"]["effect"] == A(0.2, abs=1e-6)
    assert six["verdict"] == rep.REPRODUCED and six["effect_of"] == ["instruction-tuned: spread small - large",
                                                                    "pretrained: spread small - large"]
    db.close()


# ---- planning ------------------------------------------------------------------------------------------

def test_planning_numbers_equal_required_n_on_hand_computed_variances(tmp_path):
    db = write_run(tmp_path / "r.sqlite", strong_base_effect, sizes=("small",))
    resolve = 0.02
    f = finding(rep.build(db, n_boot=4000, resolve=resolve), 1)
    (test,) = f["tests"]
    p = test["planning"]
    # seeds: the per-seed contrasts are 0.1 + 0.02 * seed, from the recorded normalised scores
    per_seed = []
    for seed in (0, 1, 2):
        held_in = {(r["base_kind"], r["n"], r["method"]): r["held_in"] for r in db.rows(
            "SELECT * FROM merges WHERE seed = ?", (seed,))}
        per_seed.append(np.mean([held_in[(IT, n, m)] - held_in[(PT, n, m)] for n in (2, 4) for m in ("avg", "ties")]))
    sd = float(np.std(per_seed, ddof=1))
    assert sd == A(0.02) and p["seed_sd"] == A(sd)
    assert p["seeds_needed"] == statistics.required_n(sd, resolve) and p["seeds"] == 3
    # examples: with the references constant, seed s's statistic is sum over datasets of the mean over examples of
    # u_i = sum over cells of (+-1/4) * value_i / (0.8 * N); its bootstrap variance is sum_d var(u_d) / n
    variances = []
    for seed in (0, 1, 2):
        u = {}
        for r in db.rows("SELECT * FROM merges WHERE seed = ?", (seed,)):
            values = per_example.read(db, r["model"], "test")
            sign = 0.25 if r["base_kind"] == IT else -0.25
            for c in json.loads(r["experts"]):
                u[c] = u.get(c, 0.0) + sign * values[f"{c}1"] / (EXPERT * r["n"])
        variances.append(sum(float(np.var(v)) / EXAMPLES for v in u.values()))
    hand_sd = float(np.sqrt(EXAMPLES * np.mean(variances) / 3))
    assert p["examples_per_dataset"] == EXAMPLES
    assert p["example_sd"] == A(hand_sd, rel=0.05)  # Monte Carlo: 4000 replicates per seed
    assert p["examples_needed"] == statistics.required_n(p["example_sd"], resolve)
    assert p["examples_needed"] == A(statistics.required_n(hand_sd, resolve), rel=0.1)
    db.close()


def test_without_per_example_values_the_intervals_and_plan_rest_on_seeds(tmp_path):
    db = write_run(tmp_path / "r.sqlite", strong_base_effect, sizes=("small",))
    db.conn.execute("DELETE FROM examples")  # an evaluator that returns only scores
    f = finding(build(db), 1)
    (test,) = f["tests"]
    assert test["basis"] == "seeds only" and "intervals over seeds only" in f["note"]
    assert test["effect"] == A(0.12, abs=1e-9)  # the scores themselves (float64)
    # over seeds only, a replicate is the mean of three per-seed contrasts drawn from 0.10, 0.12, 0.14
    assert 0.1 - 1e-9 <= test["ci"][0] < test["ci"][1] <= 0.14 + 1e-9
    p = test["planning"]
    assert p["examples_needed"] is None and p["example_sd"] is None
    assert p["seeds_needed"] == statistics.required_n(0.02, 0.05)
    db.close()


# ---- shares, formats, the command ----------------------------------------------------------------------

def test_shares_of_merges_beating_the_base_and_the_best_expert(tmp_path):
    # best single expert's held-in: (1 + 0.5 (N - 1)) / N = 0.75 at N=2, 0.625 at N=4; its held-out 0.4 / 0.5 = 0.8.
    # The base's held-in 0.5 / 0.8 = 0.625, held-out 1. avg keeps 0.7, ties 0.6; generalisation 0.9 for ties.
    db = write_run(tmp_path / "r.sqlite", lambda s, k, n, m, seed: 0.7 if m == "avg" else 0.6,
                   lambda s, k, n, m, seed: 1.1 if m == "avg" else 0.9, sizes=("small",), kinds=(PT,))
    shares = {s["n"]: s for s in build(db)["shares"]}
    assert shares[2]["merges"] == 6  # 2 methods x 3 seeds
    # N=2: held-in above the base (0.625): avg only; above the best expert (0.75): none
    assert shares[2]["held_in"] == {"beat_base": A(0.5), "beat_best_expert": A(0.0)}
    # N=4: above 0.625: avg; above the best expert 0.625: avg
    assert shares[4]["held_in"] == {"beat_base": A(0.5), "beat_best_expert": A(0.5)}
    # held-out: avg 1.1 beats the base (1) and the best expert (0.8); ties 0.9 beats the best expert only
    assert shares[2]["held_out"] == {"beat_base": A(0.5), "beat_best_expert": A(1.0)}
    db.close()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy study of tests/toy_study.py (2 seeds, 2 base kinds, N = 2 and 4, three methods): its run directory."""
    from toy_study import EXAMPLE, plugin_env, write_config

    root = tmp_path_factory.mktemp("toy")
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    result = CliRunner().invoke(cli, ["run", str(write_config(root / "toy.yaml")), "--run-dir", str(root / "run"),
                                      "--no-leaderboard"], env=plugin_env(root / "home"))
    assert result.exit_code == 0, result.output
    return root / "run"


def test_heatmap_numbers_are_the_recorded_per_category_scores_and_the_leaderboards(toy):
    db = ResultsDB(toy / "results.sqlite")
    report = rep.build(db, n_boot=200)
    cells = {(r["size"], r["base_kind"], r["n"], r["row"]): r for r in report["categories"]["rows"]}
    recorded: dict[tuple, dict[str, list[float]]] = {}
    for r in db.rows("SELECT * FROM merges"):
        norm = json.loads(r["normalised"])
        for metric in ("held_in", "held_out"):
            for c, v in norm[f"{metric}_categories"].items():
                recorded.setdefault((r["size"], r["base_kind"], r["n"], r["method"], metric), {}).setdefault(
                    c, []).append(v)
    assert len(recorded) == 2 * 2 * 3 * 2
    for (size, kind, n, method, metric), by_category in recorded.items():
        row = cells[(size, kind, n, method)][metric]
        # rel 1e-6: the report reads the per-example values, stored as float32 (the recorded scores are float64)
        assert {c: v for c, v in row.items() if v is not None} == {c: A(np.mean(v), rel=1e-6)
                                                                  for c, v in by_category.items()}
    # at N=4 every seed merges all four categories: the mean over categories is the leaderboard's held-in
    for r in lb.build(db, n_boot=0):
        if r.kind == "merge" and r.n == 4:
            row = cells[(r.size, r.base_kind, r.n, r.method)]
            assert np.mean(list(row["held_in"].values())) == A(r.held_in.mean, rel=1e-6)
            assert np.mean(list(row["held_out"].values())) == A(r.held_out.mean, rel=1e-6)
    # and the rows behind a finding carry the leaderboard's means
    means = {(r.key, m): getattr(r, m).mean for r in lb.build(db, n_boot=0) for m in ("held_in", "held_out")}
    for f in report["findings"]:
        for row in f["rows"]:
            assert row["mean"] == A(means[(row["row"], row["metric"])], rel=1e-6)
    db.close()


def test_json_markdown_and_html_of_the_toy_study(toy):
    runner = CliRunner()
    out = runner.invoke(cli, ["report", str(toy), "--format", "json", "--bootstrap", "200"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert set(data) == {"run", "verdict_rule", "findings", "categories", "shares"}
    assert [f["id"].split("-")[0] for f in data["findings"]] == ["1", "2", "3", "4", "5", "6"]
    for f in data["findings"]:
        assert {"id", "claim", "verdict", "effect", "ci", "statistic", "rows", "note", "tests"} <= set(f)
        assert f["verdict"] in (rep.REPRODUCED, rep.PARTLY, rep.NOT_REPRODUCED, rep.INCONCLUSIVE)
        if f["ci"] is not None:
            assert f["ci"][0] <= f["effect"] <= f["ci"][1]
    assert data["run"]["sizes"] == ["toy"] and data["run"]["replicates"] == 200
    assert finding(data, 2)["verdict"] == rep.INCONCLUSIVE  # one size
    md = runner.invoke(cli, ["report", str(toy), "--bootstrap", "200"]).output
    assert md.startswith("## The paper's findings, tested") and "| 1 | Merging works better" in md
    assert "### Held-in: each expert's retention" in md and "| toy | pretrained | 4 | ties |" in md
    page = toy.parent / "report.html"
    written = runner.invoke(cli, ["report", str(toy), "--format", "html", "-o", str(page), "--bootstrap", "200"])
    assert written.exit_code == 0 and page.is_file()
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "<script" not in text
    # the heatmap's cells show the per-category values, coloured
    value = next(r for r in data["categories"]["rows"] if r["row"] == "ties" and r["n"] == 4)["held_in"]["beta"]
    assert re.search(rf'<td class="h" style="background:#[0-9a-f]{{6}}" title="[^"]*beta: {value:.3f}">'
                     rf"{value:.2f}</td>", text)


def test_heatmap_colours():
    from mergebench.study.html import colour, heatmap

    assert colour(1.0) == "#ffffff" and colour(0.5) == "#d6604d" and colour(1.5) == "#4393c3"
    assert colour(0.75) == "#eab0a6" and colour(None) == "#f2f2f2" and colour(-3.0) == colour(0.5)
    table = heatmap(["row", "a", "b"], [(["m"], [1.0, None])])
    assert '<td class="h" style="background:#ffffff" title="m, a: 1.000">1.00</td>' in table
    assert 'title="m, b: not merged"></td>' in table


def test_report_errors_are_one_line(tmp_path, toy):
    assert_user_error(CliRunner().invoke(cli, ["report", str(tmp_path)]), "no results database")
    assert_user_error(CliRunner().invoke(cli, ["report", str(toy), "--resolve", "0"]), "--resolve must be a positive")
    empty = ResultsDB(tmp_path / "results.sqlite")
    empty.set_meta("suite", SUITE)
    with pytest.raises(InputError, match="no merges yet"):
        rep.build(empty)
    empty.close()
