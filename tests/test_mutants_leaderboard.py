"""The leaderboard's intervals, marks, notes, random-draw table and searched parameters, on results databases
written by hand (issue 16's mutation testing: docs/testing.md names the mutants these kill).

Every expected number is worked out in the comments. With two seeds and stored scores only (no per-example
values), a seed-level bootstrap replicate is the mean of two seeds drawn with replacement, so a quarter of
the replicates sit at each extreme and the 95% percentile interval is exactly [lower seed, higher seed].
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from mergebench.study import leaderboard as lb
from mergebench.study import per_example
from mergebench.study.database import ResultsDB, score_statements

A = pytest.approx
SUITE = {"name": "s", "held_in": {"a": ["a1"], "b": ["b1"]}, "held_out": {"x": ["x1"]}}
MODEL = "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
MERGE = "INSERT INTO merges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
DRAW = "INSERT INTO draws VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
EXAMPLES = "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?)"


def _models(db, seeds=(0, 1), size="toy"):
    """Per seed: a base scoring 0.4 on a1 and b1 and 0.5 on x1; experts a and b scoring 0.8 on their own
    dataset and 0.4 on x1. Base held-in = mean(0.4/0.8, 0.4/0.8) = 0.5, held-out 1; experts' held-out
    = 0.4 / 0.5 = 0.8."""
    prefix = "" if size == "toy" else size
    for seed in seeds:
        db.conn.execute(MODEL, (f"{prefix}base{seed}", "base", seed, size, "pre", None, "p", None))
        for sql, args in score_statements(f"{prefix}base{seed}", "test", {"a1": 0.4, "b1": 0.4, "x1": 0.5}):
            db.conn.execute(sql, args)
        for c in "ab":
            db.conn.execute(MODEL, (f"{prefix}e{c}{seed}", "expert", seed, size, "pre", c, "p", None))
            for sql, args in score_statements(f"{prefix}e{c}{seed}", "test", {f"{c}1": 0.8, "x1": 0.4}):
                db.conn.execute(sql, args)


def _merge(db, seed, method, held_in, held_out, params=None, size="toy", model=None):
    db.conn.execute(MERGE, (seed, size, "pre", 2, method, json.dumps(["a", "b"]), json.dumps(params or {}), 0.0,
                            held_in, held_out, "{}", model or f"m-{method}-{seed}", 1.0))


@pytest.fixture
def db(tmp_path):
    out = ResultsDB(tmp_path / "r.sqlite")
    out.set_meta("suite", SUITE)
    _models(out)
    yield out
    out.close()


def _by_method(rows):
    return {r.method: r for r in rows}


def test_intervals_and_marks_by_hand(db):
    # stored scores (held-in, held-out) at seeds 0 and 1; intervals [min, max] (see the module docstring)
    for method, seeds in {"ta": ((0.9, 1.0), (0.9, 1.0)),      # held-in [0.9, 0.9] best; held-out [1, 1]
                          "tie": ((0.9, 0.95), (0.9, 0.95)),   # held-in equal to the best, later: tied
                          "touch": ((0.4, 0.5), (0.9, 0.7)),   # held-in [0.4, 0.9] touches 0.9: tied
                          "close": ((0.7, 0.8), (0.95, 1.2)),  # held-in [0.7, 0.95] tied; held-out [0.8, 1.2]
                          "avg": ((0.6, 1.1), (0.8, 1.3)),     # held-in [0.6, 0.8] below; held-out [1.1, 1.3] best
                          }.items():
        for seed, (held_in, held_out) in enumerate(seeds):
            _merge(db, seed, method, held_in, held_out)
    rows = lb.build(db)
    r = _by_method(rows)
    # merges by held-in mean (ta before tie: the merges are read in method order), then the baselines
    assert [x.method for x in rows] == ["ta", "tie", "close", "avg", "touch", "experts", "base"]
    expected = {  # method: (held-in mean, ci, rank, held-out mean, ci, rank)
        "ta": (0.9, [0.9, 0.9], "best", 1.0, [1.0, 1.0], "below"),
        "tie": (0.9, [0.9, 0.9], "tied", 0.95, [0.95, 0.95], "below"),
        "touch": (0.65, [0.4, 0.9], "tied", 0.6, [0.5, 0.7], "below"),
        "close": (0.825, [0.7, 0.95], "tied", 1.0, [0.8, 1.2], "tied"),
        "avg": (0.7, [0.6, 0.8], "below", 1.2, [1.1, 1.3], "best"),
        "experts": (1.0, [1.0, 1.0], None, 0.8, [0.8, 0.8], None),
        "base": (0.5, [0.5, 0.5], None, 1.0, [1.0, 1.0], None),
    }
    for method, (hi, hi_ci, hi_rank, ho, ho_ci, ho_rank) in expected.items():
        row = r[method]
        assert (row.held_in.mean, row.held_in_ci, row.held_in_rank) == (A(hi), A(hi_ci), hi_rank), method
        assert (row.held_out.mean, row.held_out_ci, row.held_out_rank) == (A(ho), A(ho_ci), ho_rank), method
        assert row.ci_basis == "seeds only"
    # without the bootstrap: no intervals, no marks, and the table shows mean ± sd
    plain = lb.build(db, n_boot=0)
    assert all(x.held_in_ci is None and x.held_out_ci is None and x.held_in_rank is None and x.ci_basis is None
               for x in plain)
    assert "mean ± standard deviation over seeds" in lb.markdown(plain) and lb.notes(plain) == []


def test_a_merge_without_a_held_out_score_gets_no_held_out_mark(db):
    for seed in (0, 1):
        _merge(db, seed, "ta", 0.9, None)
        _merge(db, seed, "avg", 0.6, 1.1)
    r = _by_method(lb.build(db))
    assert r["ta"].held_out_ci is None and r["ta"].held_out_rank is None and r["ta"].held_in_rank == "best"
    assert r["avg"].held_out_rank == "best" and r["avg"].held_in_rank == "below"


def test_marks_rank_among_every_merge_of_the_group_even_when_the_table_shows_one_method(db):
    for seed in (0, 1):
        _merge(db, seed, "ta", 0.9, 1.0)
        _merge(db, seed, "avg", 0.6, 1.1)
        _merge(db, seed, "ta", 0.1, 0.1, size="other")
    _models(db, size="other")
    rows = lb.build(db, methods=("avg",))
    assert [(x.size, x.method) for x in rows] == [("other", "experts"), ("other", "base"), ("toy", "avg"),
                                                   ("toy", "experts"), ("toy", "base")]
    avg = rows[2]
    assert (avg.held_in_rank, avg.held_out_rank) == ("below", "best")  # ta, filtered out, is still the best
    only_other = _by_method(lb.build(db, sizes=("other",)))
    assert only_other["ta"].held_in_rank == "best" and only_other["ta"].held_in_ci == A([0.1, 0.1])


def test_intervals_follow_n_boot_and_the_generator_seed(db):
    # five seeds of stored scores: the interval is the percentiles of the means of five seeds drawn with
    # replacement from numpy's PCG64 generator, which this reference redraws independently
    values = np.array([0.1, 0.4, 0.35, 0.9, 0.6])
    _models(db, seeds=range(2, 5))
    for seed, v in enumerate(values):
        _merge(db, seed, "ta", float(v), 1.0)

    def reference(n_boot, seed):
        picks = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
        return list(np.percentile(values[picks].mean(axis=1), [2.5, 97.5]))

    assert _by_method(lb.build(db))["ta"].held_in_ci == A(reference(2000, 0))
    assert _by_method(lb.build(db, n_boot=500, ci_seed=3))["ta"].held_in_ci == A(reference(500, 3))
    assert reference(2000, 0) != A(reference(500, 3))


def _with_examples(db, model, dataset, values):
    dtype, data = per_example.encode(np.asarray(values, dtype=np.float32))
    db.conn.execute(EXAMPLES, (model, "test", dataset, len(values), dtype, data))


def test_interval_basis_and_the_seeds_only_note(db):
    # per-example values for every model on a1 and b1 (so held-in resamples examples) but not on x1:
    # merges with raw scores: held-in "seeds and examples", held-out "seeds only" -> partly;
    # a merge without raw test scores is its stored score (whatever examples its model has): seeds only
    for seed in (0, 1):
        _merge(db, seed, "raw", 0.5, 0.8, model=f"raw{seed}")
        for sql, args in score_statements(f"raw{seed}", "test", {"a1": 0.4, "b1": 0.4, "x1": 0.4}):
            db.conn.execute(sql, args)
        _merge(db, seed, "stored", 0.5, 0.8)
    for seed in (0, 1):
        for model, v in ((f"base{seed}", 0.4), (f"ea{seed}", 0.8), (f"eb{seed}", 0.8), (f"raw{seed}", 0.4),
                         (f"m-stored-{seed}", 0.5)):
            for dataset in ("a1", "b1"):
                _with_examples(db, model, dataset, [v - 0.1, v + 0.1])
    rows = lb.build(db)
    r = _by_method(rows)
    assert r["raw"].ci_basis == "seeds, and examples where recorded"
    assert r["stored"].ci_basis == "seeds only"
    assert r["base"].ci_basis == "seeds, and examples where recorded"
    # held-in of raw: per seed mean(0.4/0.8, 0.4/0.8) = 0.5
    assert r["raw"].held_in.mean == A(0.5)
    assert lb.notes(rows) == [
        ("Intervals: two-level bootstrap over seeds and test examples (mergebench.study.statistics). ▲ the best "
         "merge of its (size, base, N) group; ≈ a merge whose interval overlaps the best's: the table cannot order "
         "them (`mergebench compare RUN A B` tests a pair on paired data)."),
        ("Intervals over seeds only (4 rows, e.g. toy/pre/N=2/base): no per-example results were recorded for "
         "some of their datasets (an evaluator that returns only scores, or evaluated before they were kept).")]
    # a table whose every row resamples examples has only the first note
    examples_only = [lb.Row("toy", "pre", 2, "m", "merge", lb.Stat(0.5, 0.0, 2), lb.Stat(0.5, 0.0, 2),
                            held_in_ci=[0.4, 0.6], ci_basis="seeds and examples")]
    assert lb.notes(examples_only) == lb.notes(rows)[:1]
    held_out_only = [lb.Row("toy", "pre", 2, "m", "merge", lb.Stat(0.5, 0.0, 2), lb.Stat(0.5, 0.0, 2),
                            held_out_ci=[0.4, 0.6], ci_basis="seeds only")]
    assert lb.notes(held_out_only)[1].startswith("Intervals over seeds only (1 rows, e.g. toy/pre/N=2/m): ")


def _draws(db):
    """A stochastic method with further draws: held-in per seed [0.6, 0.8] (seed 0, three draws: 0.6, 0.8, 0.7)
    and [1.0, 1.2] (seed 1); held-out recorded for the first draws only."""
    for seed, first in ((0, 0.6), (1, 1.0)):
        _merge(db, seed, "dare", first, None, params={"density": 0.1 * (seed + 1)})
    further = [(0, 1, 0.8), (0, 2, 0.7), (1, 1, 1.2)]
    for seed, draw, held_in in further:
        db.conn.execute(DRAW, (seed, "toy", "pre", 2, "dare", draw, 100 + draw, json.dumps(["a", "b"]),
                               json.dumps({"density": 0.5 + draw}), 0.0, held_in, None, "{}", f"d{seed}{draw}", 1.0))


def test_random_draws_by_hand(db):
    _draws(db)
    row = _by_method(lb.build(db, n_boot=0))["dare"]
    # seed means 0.7 and 1.1 -> mean 0.9, sample sd sqrt(0.08)
    assert row.held_in.mean == A(0.9) and row.held_in.std == A(math.sqrt(0.08)) and row.held_in.n == 2
    assert row.held_out.mean is None and row.held_out.n == 0
    # within-seed variance: (0.01 + 0.01 + 0 + 0.02) / (2 + 1) = 0.04 / 3; seed-mean variance 0.08, less
    # within / mean draws per seed (2.5): 0.08 - 0.04 / 7.5; draws' share within / (within + between):
    # sd 0.1155 and 0.2733, share 15.2%
    within, between = 0.04 / 3, 0.08 - 0.04 / 7.5
    assert row.draws["per_seed"] == 3
    assert row.draws["held_in"] == {"draw_sd": A(math.sqrt(within)), "seed_sd": A(math.sqrt(between)),
                                    "draw_share": A(within / (within + between))}
    assert row.draws["held_out"] == {"draw_sd": None, "seed_sd": None, "draw_share": None}
    assert row.draws["params"] == {0: [{"density": 0.1}, {"density": 1.5}, {"density": 2.5}],
                                   1: [{"density": 0.2}, {"density": 1.5}]}
    cells = lb.draw_rows([row])
    assert cells == [["toy", "pre", "2", "dare", "3", f"{math.sqrt(within):.3f}", f"{math.sqrt(between):.3f}",
                      f"{100 * within / (within + between):.0f}%", "-", "-", "-"]]
    assert cells[0][5:8] == ["0.115", "0.273", "15%"]
    # a method without further draws has no draws entry and no line in that table
    _merge(db, 0, "ta", 0.9, 1.0)
    ta = _by_method(lb.build(db, n_boot=0))["ta"]
    assert ta.draws is None and lb.draw_rows([ta]) == []


def test_markdown_with_intervals_and_the_random_draws_table(db):
    _draws(db)
    for seed in (0, 1):
        _merge(db, seed, "ta", 0.9, 1.0, params={"lambda": 0.5})
    rows = lb.build(db, methods=("ta", "dare"))
    text = lb.markdown(rows, title="T")
    lines = text.split("\n")
    assert lines[:3] == ["## T", "", ("Normalised scores (held-in: merged / expert of the category; held-out: merged "
                         "/ base, zero-shot), mean over seeds [95% interval], on the test splits; hyperparameters "
                         "chosen on validation.")]
    dare_held_in = lines[7].split(" | ")[4]  # its interval comes from resampled draws: within 0.6 .. 1.2
    low, high = (float(x) for x in dare_held_in.removeprefix("0.900 [").removesuffix("] ≈").split(", "))
    assert 0.6 <= low < 0.9 < high <= 1.2
    assert lines[3:] == [
        "",
        "| size | base | N | method | held-in | held-out | seeds | chosen (validation) |",
        "|---|---|---|---|---|---|---|---|",
        "| toy | pre | 2 | ta | 0.900 [0.900, 0.900] ▲ | 1.000 [1.000, 1.000] ▲ | 2 | lambda=0.5 (seeds 0, 1) |",
        f"| toy | pre | 2 | dare | {dare_held_in} | - | 2 | density=0.1 (seed 0); density=0.2 (seed 1) |",
        "| toy | pre | 2 | *experts* | 1.000 [1.000, 1.000] | 0.800 [0.800, 0.800] | 2 | baseline |",
        "| toy | pre | 2 | *base* | 0.500 [0.500, 0.500] | 1.000 [1.000, 1.000] | 2 | baseline |",
        "", *lb.notes(rows),
        "", "### Random draws (stochastic methods, draws: K)", "",
        ("Standard deviation of one merge's score from its random draw (pooled within seeds) and between seeds "
         "(beyond the draws'), and the draws' share of the variance."), "",
        ("| size | base | N | method | draws | held-in: sd from draws | sd from seeds | draws' share | "
         "held-out: sd from draws | sd from seeds | draws' share |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| toy | pre | 2 | dare | 3 | 0.115 | 0.273 | 15% | - | - | - |", ""]
    assert len(lb.notes(rows)) == 2
    assert text.endswith("|\n") and not text.endswith("\n\n")


def test_markdown_cells_escape_pipes_so_a_cell_cannot_split():
    assert lb.markdown_table(("a", "b"), [["x|y", 1], ["z", None]]) == [
        "| a | b |", "|---|---|", "| x\\|y | 1 |", "| z | None |"]
    row = lb.Row("toy", "pre", 2, "odd|name", "merge", lb.Stat(0.5, None, 1), lb.Stat(None, None, 0), [0], [{}])
    assert "| toy | pre | 2 | odd\\|name | 0.500 | - | 1 | no parameters |" in lb.markdown([row]).split("\n")


def test_chosen_parameters_show_only_what_the_sweeps_searched(db):
    grid = [{"lambda": 0.5, "trim_scope": "global"}, {"lambda": 1.0, "density": 0.2, "trim_scope": "global"}]
    db.conn.execute("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?)",
                    ("u1", "sweep", json.dumps({"method": "ties", "grid": grid}), None, 1.0, 0.0, "{}"))
    db.conn.execute("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?)",  # another kind of unit: not a sweep
                    ("u2", "merge", json.dumps({"method": "avg", "grid": [{"weight": 1}]}), None, 1.0, 0.0, "{}"))
    db.conn.execute("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?)",  # a sweep whose spec names no method
                    ("u3", "sweep", json.dumps(["ties"]), None, 1.0, 0.0, "{}"))
    chosen = {"lambda": 1.0, "density": 0.2, "trim_scope": "global", "rescale": "none"}
    for seed in (0, 1):
        _merge(db, seed, "ties", 0.9, 1.0, params=chosen)
        _merge(db, seed, "avg", 0.7, 1.0, params={"weight": 1, "trim_scope": "x"})
    r = _by_method(lb.build(db, n_boot=0))
    assert r["ties"].searched == ["density", "lambda", "trim_scope"]
    assert r["avg"].searched is None
    table = {cells[3]: cells[7] for cells in lb.table_rows(list(r.values()))}
    # searched parameters only (rescale was fixed); without a sweep record: all but trim_scope
    assert table["ties"] == "density=0.2, lambda=1.0, trim_scope=global (seeds 0, 1)"
    assert table["avg"] == "weight=1 (seeds 0, 1)"


def _row(params, seeds):
    return lb.Row("toy", "pre", 2, "m", "merge", lb.Stat(0.5, 0.0, 2), lb.Stat(0.5, 0.0, 2), seeds, params)


def test_chosen_parameters_text_for_every_shape_of_choice():
    # one choice per seed: equal choices share an entry naming their seeds, in the entries' text order
    assert lb._params_text(_row([{}, {}], [0, 1])) == "no parameters"
    assert lb._params_text(_row([{}, {"lambda": 1.0}], [0, 1])) == "no parameters (seed 0); lambda=1.0 (seed 1)"
    assert lb._params_text(_row([{"lambda": 1.0}, {}, {"lambda": 1.0}], [4, 5, 6])) == \
        "no parameters (seed 5); lambda=1.0 (seeds 4, 6)"
    # not one per seed: the distinct choices, without seeds
    assert lb._params_text(_row([{"b": 2}, {"a": 1}, {}, {"a": 1}], [0])) == "no parameters; a=1; b=2"
    assert lb._params_text(_row([], [0])) == "-"
    assert lb._params_text(_row([], [])) == "-"


def test_csv_holds_intervals_marks_basis_and_draws(db):
    _draws(db)
    for seed in (0, 1):
        _merge(db, seed, "ta", 0.9, 1.0)
    rows = lb.build(db)
    table = list(csv.DictReader(io.StringIO(lb.to_csv(rows))))
    by_method = {r["method"]: r for r in table}
    ta, dare, base = by_method["ta"], by_method["dare"], by_method["base"]
    assert json.loads(ta["held_in_ci"]) == A([0.9, 0.9]) and json.loads(ta["held_out_ci"]) == A([1.0, 1.0])
    assert (ta["held_in_rank"], ta["held_out_rank"], ta["ci_basis"], ta["draws"]) == ("best", "best", "seeds only", "")
    assert dare["held_in_rank"] == "tied" and dare["held_out_ci"] == "" and dare["held_out_rank"] == ""
    low, high = json.loads(dare["held_in_ci"])
    assert 0.6 <= low < 0.9 < high <= 1.2
    draws = json.loads(dare["draws"])
    assert draws["per_seed"] == 3 and draws["params"]["1"] == [{"density": 0.2}, {"density": 1.5}]
    assert draws["held_in"]["draw_sd"] == A(math.sqrt(0.04 / 3))
    assert (base["held_in_rank"], base["ci_basis"]) == ("", "seeds only")


def test_draw_table_cells_and_the_header_of_a_table_with_held_in_intervals_only():
    row = lb.Row("toy", "pre", 2, "m", "merge", lb.Stat(0.5, 0.0, 2), lb.Stat(None, None, 0), [0, 1], [{}, {}],
                 held_in_ci=[0.25, 0.75], held_in_rank="best",
                 draws={"per_seed": 4, "held_in": {"draw_sd": 0.0125, "seed_sd": 0.5, "draw_share": 0.8},
                        "held_out": {"draw_sd": 0.25, "seed_sd": None, "draw_share": 0.004}})
    assert lb.draw_rows([row]) == [["toy", "pre", "2", "m", "4", "0.013", "0.500", "80%", "0.250", "-", "0%"]]
    text = lb.markdown([row])
    assert "mean over seeds [95% interval], on the test splits" in text
    assert "| toy | pre | 2 | m | 0.500 [0.250, 0.750] ▲ | - | 2 | no parameters |" in text


def test_add_intervals_defaults_to_2000_replicates_from_generator_seed_0(db):
    values = np.array([0.1, 0.4, 0.35, 0.9, 0.6])
    _models(db, seeds=range(2, 5))
    for seed, v in enumerate(values):
        _merge(db, seed, "ta", float(v), 1.0)
    rows = lb.build(db, n_boot=0)
    lb.add_intervals(db, SUITE, rows)
    picks = np.random.default_rng(0).integers(0, len(values), size=(2000, len(values)))
    assert _by_method(rows)["ta"].held_in_ci == A(list(np.percentile(values[picks].mean(axis=1), [2.5, 97.5])))


def test_add_intervals_skips_a_group_without_merges_and_a_metric_without_intervals(db):
    # a row whose group has no merge recorded gets nothing, and the groups after it are still done;
    # no merge has a held-in score, so only held-out is ranked
    for seed in (0, 1):
        _merge(db, seed, "ta", None, 1.0)
        _merge(db, seed, "avg", None, 1.2)
        _merge(db, seed, "none", None, None)
    ghost = lb.Row("ghost", "pre", 2, "avg", "merge", lb.Stat(0.5, 0.0, 2), lb.Stat(0.5, 0.0, 2), [0, 1])
    rows = [ghost] + lb.build(db, n_boot=0)
    lb.add_intervals(db, SUITE, rows, n_boot=200)
    r = {x.method: x for x in rows[1:]}
    assert ghost.held_in_ci is None and ghost.ci_basis is None and ghost.held_in_rank is None
    assert r["avg"].held_out_rank == "best" and r["ta"].held_out_rank == "below"
    assert r["avg"].held_in_rank is None and r["avg"].held_in_ci is None
    # a merge that nothing could normalise has no interval, so no basis either
    assert (r["none"].held_in_ci, r["none"].held_out_ci, r["none"].ci_basis) == (None, None, None)
    assert r["none"].held_out_rank is None and r["ta"].ci_basis == "seeds only"


def test_draws_of_a_method_whose_seeds_have_two_draws_or_one(db):
    # seed 0: two draws (0.5 then 0.7), seed 1: only its first (0.9): per seed means 0.6 and 0.9
    _merge(db, 0, "dare", 0.5, None, params={"density": 0.1})
    _merge(db, 1, "dare", 0.9, None, params={"density": 0.2})
    db.conn.execute(DRAW, (0, "toy", "pre", 2, "dare", 1, 7, json.dumps(["a", "b"]), json.dumps({"density": 0.3}),
                           0.0, 0.7, None, "{}", "d01", 1.0))
    # sweep records: one without a method (ignored), one of this method
    db.conn.execute("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?)",
                    ("u0", "sweep", json.dumps({"grid": [{"x": 1}]}), None, 1.0, 0.0, "{}"))
    db.conn.execute("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?)",
                    ("u1", "sweep", json.dumps({"method": "dare", "grid": [{"density": 0.1}]}), None, 1.0, 0.0, "{}"))
    row = _by_method(lb.build(db, n_boot=0))["dare"]
    assert row.held_in.mean == A(0.75) and row.searched == ["density"]
    assert row.draws["per_seed"] == 2
    assert row.draws["params"] == {0: [{"density": 0.1}, {"density": 0.3}], 1: [{"density": 0.2}]}
    # within: (0.01 + 0.01) / 1; between: var(0.6, 0.9) = 0.045 less 0.02 / 1.5
    assert row.draws["held_in"]["draw_sd"] == A(math.sqrt(0.02))
    assert row.draws["held_in"]["seed_sd"] == A(math.sqrt(0.045 - 0.02 / 1.5))
