"""Tests written to kill surviving mutants (issue 16: `benchmarks/mutation.sh`, docs/testing.md).

Each test checks real behaviour against an expectation computed here by hand, not against mergebench's
own output; docs/testing.md names the mutant each one kills.
"""

from __future__ import annotations

from mergebench.study.jobs import SweepPoint, best_point


# ---- the sweep's selection (study/jobs.py: best_point) -------------------------------------------------
# The toy study runs sweeps in spawned worker processes, where mutmut cannot see which tests reach
# best_point, so the selection is also checked here, in-process.

def _point(i: int, held_in: float | None) -> SweepPoint:
    return SweepPoint(params={"i": i}, held_in=held_in, scores={"d": float(i)})


def test_best_point_takes_the_highest_validation_score():
    points = [_point(0, 0.5), _point(1, 0.9), _point(2, 0.7), _point(3, -1.0)]
    assert best_point(points).params == {"i": 1}
    assert best_point(list(reversed(points))).params == {"i": 1}


def test_best_point_takes_the_first_point_in_grid_order_on_a_tie():
    assert best_point([_point(0, 0.4), _point(1, 0.8), _point(2, 0.8)]).params == {"i": 1}


def test_best_point_ranks_a_point_nothing_could_normalise_last():
    assert best_point([_point(0, None), _point(1, -5.0)]).params == {"i": 1}
    assert best_point([_point(0, 0.1), _point(1, None)]).params == {"i": 0}
    assert best_point([_point(0, None), _point(1, None)]).params == {"i": 0}


# ---- normalisation (study/normalise.py) ------------------------------------------------------------------

import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sqlite3  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from mergebench.core.errors import InputError, MergebenchError  # noqa: E402
from mergebench.study import leaderboard as lb  # noqa: E402
from mergebench.study.database import ResultsDB, score_statements  # noqa: E402
from mergebench.study.normalise import normalise  # noqa: E402


def test_normalise_skips_zero_references_and_drops_emptied_categories():
    scores = {"a1": 0.3, "a2": 0.2, "b1": 0.5, "x1": 0.9, "y1": 0.4}
    n = normalise(scores, {"a": ["a1", "a2"], "b": ["b1"]}, {"x": ["x1"], "y": ["y1"]},
                  {"a": {"a1": 0.6, "a2": 0.0}, "b": {"b1": 0.0}}, {"x1": 0.0, "y1": 0.8}, on_zero="skip")
    assert n.skipped == ["a2", "b1", "x1"]
    assert n.per_dataset == {"a1": 0.5, "y1": 0.5}
    assert n.held_in_categories == {"a": 0.5} and n.held_out_categories == {"y": 0.5}
    assert n.held_in == 0.5 and n.held_out == 0.5


def test_normalise_with_nothing_left_has_no_overall_score():
    n = normalise({"a1": 1.0, "x1": 1.0}, {"a": ["a1"]}, {"x": ["x1"]}, {"a": {"a1": 0.0}}, {"x1": -1.0},
                  on_zero="skip")
    assert n.held_in is None and n.held_out is None
    assert n.held_in_categories == {} and n.held_out_categories == {} and n.per_dataset == {}
    n = normalise({}, {}, {}, {}, {})
    assert (n.held_in, n.held_out, n.skipped) == (None, None, [])


def test_normalise_means_are_unweighted_over_datasets_then_categories():
    n = normalise({"a1": 1.0, "a2": 3.0, "a3": 2.0, "b1": 4.0}, {"a": ["a1", "a2", "a3"], "b": ["b1"]}, {},
                  {"a": {"a1": 1.0, "a2": 1.0, "a3": 1.0}, "b": {"b1": 1.0}}, {})
    assert n.held_in_categories == {"a": 2.0, "b": 4.0} and n.held_in == 3.0


def test_normalise_refuses_a_reference_of_zero_or_below_naming_it():
    with pytest.raises(MergebenchError) as e:
        normalise({"a1": 1.0}, {"a": ["a1"]}, {}, {"a": {"a1": 0.0}}, {})
    assert str(e.value) == ("cannot normalise by the 'a' expert on 'a1': its score is 0.0; "
                            "a reference must be > 0")
    with pytest.raises(MergebenchError) as e:
        normalise({"x1": 1.0}, {}, {"x": ["x1"]}, {}, {"x1": -0.5}, on_zero="error")
    assert str(e.value) == "cannot normalise by the base on 'x1': its score is -0.5; a reference must be > 0"
    # a tiny positive reference is fine
    assert normalise({"x1": 1e-9}, {}, {"x": ["x1"]}, {}, {"x1": 1e-9}).held_out == 1.0


def test_normalise_needs_an_expert_score_for_every_held_in_category():
    with pytest.raises(MergebenchError) as e:
        normalise({"a1": 1.0}, {"a": ["a1"]}, {}, {"b": {"a1": 1.0}}, {})
    assert str(e.value) == "no expert score for held-in category 'a'"


# ---- the results database (study/database.py) ------------------------------------------------------------

def test_database_settings_and_schema(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    assert db.path == tmp_path / "r.sqlite"
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.conn.isolation_level is None  # autocommit outside explicit transactions
    assert db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 60_000  # ms waited for another writer's lock
    tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"meta", "units", "models", "scores", "sweep_points", "merges", "draws", "examples"}
    db.close()
    with pytest.raises(sqlite3.ProgrammingError):
        db.conn.execute("SELECT 1")


def test_database_records_a_unit_and_its_results_together(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    assert not db.done("u1") and db.unit_output("u1") is None
    before = time.time()
    db.complete("u1", "eval", {"b": 1, "a": tmp_path}, {"scores": [1, 2]}, 1.5, {"mergebench": "1"},
                score_statements("m", "test", {"d1": 0.25, "d2": 0.5}))
    after = time.time()
    assert db.done("u1") and not db.done("u2")
    assert db.unit_output("u1") == {"scores": [1, 2]}
    row = db.rows("SELECT * FROM units WHERE key = ?", ("u1",))[0]
    assert row["kind"] == "eval" and row["seconds"] == 1.5
    assert row["spec"] == json.dumps({"a": str(tmp_path), "b": 1}, sort_keys=True)
    assert json.loads(row["versions"]) == {"mergebench": "1"}
    assert before <= row["finished"] <= after
    assert db.scores("m", "test") == {"d1": 0.25, "d2": 0.5}
    assert db.scores("m", "validation") == {} and db.scores("other", "test") == {}
    db.complete("u3", "eval", {}, None, 0.0, {})
    assert db.done("u3") and db.unit_output("u3") is None
    db.complete("u4", "eval", {}, {"p": tmp_path}, 0.0, {})
    assert db.unit_output("u4") == {"p": str(tmp_path)}
    db.close()
    # what was written is on disk for another connection
    other = ResultsDB(tmp_path / "r.sqlite")
    assert other.done("u1") and other.scores("m", "test") == {"d1": 0.25, "d2": 0.5}


def test_database_a_failed_unit_leaves_nothing(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    bad = score_statements("m", "test", {"d1": 0.25}) + [("INSERT INTO no_such_table VALUES (1)", ())]
    with pytest.raises(sqlite3.OperationalError):
        db.complete("u1", "eval", {}, {}, 0.0, {}, bad)
    assert not db.done("u1") and db.scores("m", "test") == {}
    assert not db.conn.in_transaction
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.conn.execute("INSERT INTO meta VALUES ('k', '1')")
            assert db.conn.in_transaction
            raise RuntimeError
    assert db.meta("k") is None
    with db.transaction():
        db.conn.execute("INSERT INTO meta VALUES ('k', '1')")
    assert db.meta("k") == 1 and not db.conn.in_transaction


def test_database_transactions_take_the_write_lock_at_once(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    other = sqlite3.connect(tmp_path / "r.sqlite", timeout=0, isolation_level=None)
    with db.transaction():  # BEGIN IMMEDIATE: another writer is refused even before this one writes
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")


def test_database_meta_round_trips_json(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    assert db.meta("suite") is None
    db.set_meta("suite", {"held_in": {"a": ["a1"]}, "path": tmp_path})
    db.set_meta("n", 3)
    assert db.meta("suite") == {"held_in": {"a": ["a1"]}, "path": str(tmp_path)} and db.meta("n") == 3
    db.set_meta("n", 4)
    assert db.meta("n") == 4
    assert [tuple(r) for r in db.rows("SELECT key, value FROM meta WHERE key = ?", ("n",))] == [("n", "4")]


def test_score_statements_are_one_upsert_per_dataset():
    assert score_statements("m", "validation", {"d1": 0.5, "d2": 1.0}) == [
        ("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", ("m", "validation", "d1", 0.5)),
        ("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", ("m", "validation", "d2", 1.0)),
    ]


# ---- the leaderboard (study/leaderboard.py) --------------------------------------------------------------
# A results database written by hand: size "toy" (two seeds, categories a and b, held-out x) with a base,
# two experts and a multitask model per seed, and two merge methods; size "big" holds one merge and no
# models (so no baselines). Every expected number below is worked out in the comments.

SUITE = {"name": "s", "held_in": {"a": ["a1", "a2"], "b": ["b1"], "c": ["c1"]}, "held_out": {"x": ["x1", "x2"]}}
BASE_TEST = {"a1": 0.2, "a2": 0.4, "b1": 0.5, "x1": 0.5, "x2": 0.25}
EXPERT_TEST = {"a": {"a1": 0.8, "a2": 0.8, "x1": 0.25, "x2": 0.25}, "b": {"b1": 1.0, "x1": 0.5, "x2": 0.5}}
MULTITASK_TEST = {0: {"a1": 0.4, "a2": 0.4, "b1": 0.5, "x1": 1.0, "x2": 0.5},
                  1: {"a1": 0.8, "a2": 0.8, "b1": 1.0, "x1": 0.5, "x2": 0.25}}


@pytest.fixture
def board(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    db.set_meta("suite", SUITE)
    model = "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    for seed in (0, 1):
        db.conn.execute(model, (f"base{seed}", "base", seed, "toy", "pre", None, "p", None))
        db.conn.execute(model, (f"mt{seed}", "multitask", seed, "toy", "pre", None, "p", None))
        for c in ("a", "b"):
            db.conn.execute(model, (f"e{c}{seed}", "expert", seed, "toy", "pre", c, "p", None))
            for sql, args in score_statements(f"e{c}{seed}", "test", EXPERT_TEST[c]):
                db.conn.execute(sql, args)
        for key, scores in ((f"base{seed}", BASE_TEST), (f"mt{seed}", MULTITASK_TEST[seed])):
            for sql, args in score_statements(key, "test", scores):
                db.conn.execute(sql, args)
    merge = "INSERT INTO merges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    for seed, size, n, method, experts, params, held_in, held_out in [
        (1, "toy", 2, "avg", ["a", "b"], {}, 0.8, 1.3),
        (0, "toy", 2, "avg", ["a", "b"], {}, 0.6, 1.1),
        (0, "toy", 2, "ta", ["a", "b"], {"lambda": 0.5, "trim_scope": "global"}, 0.9, 0.5),
        (1, "toy", 2, "ta", ["a", "b"], {"lambda": 1.0}, 0.9, 0.7),
        (0, "big", 4, "avg", ["a", "b", "c", "d"], {}, 0.5, None),
    ]:
        db.conn.execute(merge, (seed, size, "pre", n, method, json.dumps(experts), json.dumps(params), 0.0,
                                held_in, held_out, "{}", "m", 1.0))
    yield db
    db.close()


def _summary(rows):
    return [(r.size, r.n, r.method, r.kind, r.held_in.mean, r.held_in.std, r.held_in.n,
             r.held_out.mean, r.held_out.std, r.held_out.n, r.seeds) for r in rows]


A = pytest.approx


def test_leaderboard_rows_by_hand(board):
    rows = lb.build(board)
    # merges: toy/ta held-in (0.9, 0.9) -> 0.9 ± 0, held-out (0.5, 0.7) -> 0.6 ± sqrt(0.02);
    # toy/avg (0.6, 0.8) -> 0.7 ± sqrt(0.02), (1.1, 1.3) -> 1.2 ± sqrt(0.02); big/avg one seed, no held-out.
    # baselines (same both seeds but the multitask model):
    #   base: held-in mean(mean(0.2/0.8, 0.4/0.8), 0.5/1.0) = mean(0.375, 0.5) = 0.4375; held-out 1
    #   experts: held-in 1; held-out mean(mean(0.25/0.5, 0.25/0.25), mean(0.5/0.5, 0.5/0.25)) = 1.125
    #   multitask: seed 0: held-in mean(0.5, 0.5) = 0.5, held-out mean(2, 2) = 2;
    #              seed 1: held-in 1, held-out 1 -> 0.75 ± sqrt(0.125), 1.5 ± sqrt(0.5)
    s = math.sqrt(0.02)
    assert _summary(rows) == [
        ("big", 4, "avg", "merge", 0.5, 0.0, 1, None, None, 0, [0]),
        ("toy", 2, "ta", "merge", A(0.9), A(0.0), 2, A(0.6), A(s), 2, [0, 1]),
        ("toy", 2, "avg", "merge", A(0.7), A(s), 2, A(1.2), A(s), 2, [0, 1]),
        ("toy", 2, "experts", "baseline", 1.0, 0.0, 2, A(1.125), A(0.0), 2, [0, 1]),
        ("toy", 2, "multitask", "baseline", A(0.75), A(math.sqrt(0.125)), 2, A(1.5), A(math.sqrt(0.5)), 2, [0, 1]),
        ("toy", 2, "base", "baseline", A(0.4375), A(0.0), 2, A(1.0), A(0.0), 2, [0, 1]),
    ]
    assert rows[1].params == [{"lambda": 0.5, "trim_scope": "global"}, {"lambda": 1.0}]
    assert rows[2].params == [{}, {}] and rows[3].params == []


def test_leaderboard_sorts_and_filters(board):
    def order(**kw):
        return [(r.size, r.method) for r in lb.build(board, **kw)]

    assert order(sort="held_in") == [("toy", "experts"), ("toy", "ta"), ("toy", "multitask"), ("toy", "avg"),
                                     ("big", "avg"), ("toy", "base")]
    assert order(sort="held_out") == [("toy", "multitask"), ("toy", "avg"), ("toy", "experts"), ("toy", "base"),
                                      ("toy", "ta"), ("big", "avg")]  # no held-out ranks last
    assert order(sort="method") == [("big", "avg"), ("toy", "avg"), ("toy", "base"), ("toy", "experts"),
                                    ("toy", "multitask"), ("toy", "ta")]
    assert order(sort="n") == [("toy", "ta"), ("toy", "avg"), ("toy", "experts"), ("toy", "multitask"),
                               ("toy", "base"), ("big", "avg")]
    assert order(sizes=("toy",)) == [("toy", "ta"), ("toy", "avg"), ("toy", "experts"), ("toy", "multitask"),
                                     ("toy", "base")]
    assert order(sizes=("big",)) == [("big", "avg")]
    assert order(base_kinds=("other",)) == [] and len(order(base_kinds=("pre",))) == 6
    assert order(methods=("ta",)) == [("toy", "ta"), ("toy", "experts"), ("toy", "multitask"), ("toy", "base")]
    with pytest.raises(InputError) as e:
        lb.build(board, sort="worst")
    assert str(e.value) == "unknown sort 'worst' (valid: default, held_in, held_out, method, n)"


def test_leaderboard_baselines_need_the_base_and_every_expert(board):
    board.conn.execute("DELETE FROM models WHERE key IN ('eb1', 'mt0')")
    rows = {(r.method, r.kind): r for r in lb.build(board, sizes=("toy",))}
    # seed 1 lacks an expert: only seed 0 counts; seed 0 lacks the multitask model: no multitask row
    assert rows[("experts", "baseline")].seeds == [0, 1]  # the seeds of the merges beside it
    assert rows[("experts", "baseline")].held_in.n == 1 and rows[("base", "baseline")].held_in.n == 1
    assert ("multitask", "baseline") not in rows
    board.conn.execute("DELETE FROM models WHERE key IN ('base0')")
    assert [r.kind for r in lb.build(board, sizes=("toy",))] == ["merge", "merge"]


def test_leaderboard_multitask_without_test_scores_is_left_out(board):
    board.conn.execute("DELETE FROM scores WHERE model IN ('mt0', 'mt1')")
    assert [r.method for r in lb.build(board, sizes=("toy",))] == ["ta", "avg", "experts", "base"]


def test_leaderboard_experts_held_out_skips_a_zero_base(board):
    board.conn.execute("UPDATE scores SET score = 0 WHERE model IN ('base0', 'base1') AND dataset = 'x2'")
    rows = {r.method: r for r in lb.build(board, sizes=("toy",))}
    # x2 is skipped: experts' held-out mean(0.25/0.5, 0.5/0.5) = 0.75; the base's own held-out is 1
    assert rows["experts"].held_out.mean == A(0.75) and rows["base"].held_out.mean == A(1.0)
    board.conn.execute("UPDATE scores SET score = 0 WHERE model IN ('base0', 'base1') AND dataset = 'x1'")
    rows = {r.method: r for r in lb.build(board, sizes=("toy",))}
    assert rows["experts"].held_out.n == 0 and rows["experts"].held_in.mean == 1.0


def test_leaderboard_without_a_suite_is_refused(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    with pytest.raises(InputError) as e:
        lb.build(db)
    assert str(e.value) == f"{db.path}: the run has not recorded its suite yet; nothing to show"


def test_stat_mean_sample_std_and_text():
    s = lb.Stat.of([1.0, None, 3.0, 2.0])
    assert (s.mean, s.n) == (2.0, 3) and s.std == A(1.0)  # sample std: sqrt((1 + 1 + 0) / 2)
    assert lb.Stat.of([1.0, 3.0]).std == A(math.sqrt(2.0))
    assert lb.Stat.of([None, 2.5]) == lb.Stat(2.5, 0.0, 1)
    assert lb.Stat.of([]) == lb.Stat(None, None, 0) and lb.Stat.of([None]) == lb.Stat(None, None, 0)
    assert lb.Stat(2.0, math.sqrt(2.0), 2).text() == "2.000 ± 1.414"
    assert lb.Stat(2.0, math.sqrt(2.0), 2).text(1) == "2.0 ± 1.4"
    assert lb.Stat(2.0, 0.0, 1).text() == "2.000"
    assert lb.Stat(None, None, 0).text() == "-"


def _rows():
    return [lb.Row("toy", "pre", 2, "ta", "merge", lb.Stat(0.9, 0.0, 2), lb.Stat(0.6, 0.25, 2), [0, 1],
                   [{"lambda": 1.0, "trim_scope": "global"}, {"lambda": 0.5}]),
            lb.Row("toy", "pre", 2, "avg", "merge", lb.Stat(0.7, None, 1), lb.Stat(None, None, 0), [3],
                   [{}, {}]),
            lb.Row("toy", "pre", 2, "empty", "merge", lb.Stat(None, None, 0), lb.Stat(None, None, 0), [], []),
            lb.Row("toy", "pre", 2, "base", "baseline", lb.Stat(0.4375, 0.0, 2), lb.Stat(1.0, 0.0, 2), [0, 1])]


def test_leaderboard_markdown_exactly():
    assert lb.markdown(_rows()) == (
        "## mergebench leaderboard\n\n"
        "Normalised scores (held-in: merged / expert of the category; held-out: merged / base, zero-shot), "
        "mean ± standard deviation over seeds, on the test splits; hyperparameters chosen on validation.\n\n"
        "| size | base | N | method | held-in | held-out | seeds | chosen (validation) |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| toy | pre | 2 | ta | 0.900 ± 0.000 | 0.600 ± 0.250 | 2 | lambda=0.5 (seed 1); lambda=1.0 (seed 0) |\n"
        "| toy | pre | 2 | avg | 0.700 | - | 1 | no parameters |\n"
        "| toy | pre | 2 | empty | - | - | 0 | - |\n"
        "| toy | pre | 2 | *base* | 0.438 ± 0.000 | 1.000 ± 0.000 | 2 | baseline |\n")
    assert lb.markdown([], title="T").startswith("## T\n\n")
    assert lb.COLUMNS == ("size", "base", "N", "method", "held-in", "held-out", "seeds", "chosen (validation)")


def test_leaderboard_json_and_csv_exactly():
    rows = _rows()
    text = lb.to_json(rows)
    assert text.endswith("]\n") and text.startswith('[\n  {\n    "size": "toy",')
    records = json.loads(text)
    assert records[0] == {"size": "toy", "base_kind": "pre", "n": 2, "method": "ta", "kind": "merge",
                          "held_in": {"mean": 0.9, "std": 0.0, "n": 2}, "held_out": {"mean": 0.6, "std": 0.25, "n": 2},
                          "seeds": [0, 1], "params": [{"lambda": 1.0, "trim_scope": "global"}, {"lambda": 0.5}],
                          "held_in_ci": None, "held_out_ci": None, "held_in_rank": None, "held_out_rank": None,
                          "ci_basis": None, "draws": None, "searched": None, "key": "toy/pre/N=2/ta"}
    assert [r["key"] for r in records] == ["toy/pre/N=2/ta", "toy/pre/N=2/avg", "toy/pre/N=2/empty",
                                           "toy/pre/N=2/base"]
    assert rows[3].record()["params"] == [] and rows[3].key == "toy/pre/N=2/base"
    table = list(csv.reader(io.StringIO(lb.to_csv(rows))))
    assert table == [
        ["size", "base_kind", "n", "method", "kind", "held_in_mean", "held_in_std", "held_out_mean", "held_out_std",
         "seeds", "params", "held_in_ci", "held_out_ci", "held_in_rank", "held_out_rank", "ci_basis", "draws"],
        ["toy", "pre", "2", "ta", "merge", "0.9", "0.0", "0.6", "0.25", "2",
         '[{"lambda": 1.0, "trim_scope": "global"}, {"lambda": 0.5}]'] + [""] * 6,
        ["toy", "pre", "2", "avg", "merge", "0.7", "", "", "", "1", "[{}, {}]"] + [""] * 6,
        ["toy", "pre", "2", "empty", "merge", "", "", "", "", "0", "[]"] + [""] * 6,
        ["toy", "pre", "2", "base", "baseline", "0.4375", "0.0", "1.0", "0.0", "2", "[]"] + [""] * 6,
    ]


def test_ci_gate_by_hand(tmp_path):
    rows = _rows()
    record = lb.baseline_record(rows)
    assert record == {"format": "mergebench-baseline/1", "rows": {
        "toy/pre/N=2/ta": {"held_in": 0.9, "held_out": 0.6},
        "toy/pre/N=2/avg": {"held_in": 0.7, "held_out": None},
        "toy/pre/N=2/empty": {"held_in": None, "held_out": None}}}
    path = tmp_path / "baseline.json"

    def gate(saved, tolerance=0.125):
        path.write_text(json.dumps({"format": "mergebench-baseline/1", "rows": saved}))
        return lb.check(rows, path, tolerance)

    assert gate(record["rows"]) == []
    # 1.025 - 0.125 rounds to just below 0.9, so this passes; just beyond fails
    assert gate({"toy/pre/N=2/ta": {"held_in": 1.025, "held_out": 0.6}}) == []
    assert gate({"toy/pre/N=2/ta": {"held_in": 1.03, "held_out": 0.6}}) == [
        "toy/pre/N=2/ta: held-in 0.900 < baseline 1.030 - 0.125"]
    assert gate({"toy/pre/N=2/ta": {"held_in": 0.9, "held_out": 0.8}}, tolerance=0.1) == [
        "toy/pre/N=2/ta: held-out 0.600 < baseline 0.800 - 0.1"]
    assert gate({"toy/pre/N=2/avg": {"held_in": 0.5, "held_out": 0.5}}) == [
        "toy/pre/N=2/avg: held-out none < baseline 0.500 - 0.125"]
    assert gate({"toy/pre/N=2/base": {"held_in": 0.1}, "toy/pre/N=2/gone": {}}) == [
        "toy/pre/N=2/base: missing from this run", "toy/pre/N=2/gone: missing from this run"]
    assert gate({"toy/pre/N=2/avg": {}, "toy/pre/N=2/empty": {"held_in": None}}) == []
    for bad in ("not json", json.dumps({"rows_": {}}), json.dumps([1])):
        path.write_text(bad)
        with pytest.raises(InputError) as e:
            lb.check(rows, path, 0.1)
        assert str(e.value) == f"{path}: not a mergebench baseline (write one with --save-baseline)"
    with pytest.raises(InputError):
        lb.check(rows, tmp_path / "missing.json", 0.1)


# ---- in-memory merging for sweeps (core/in_memory.py) ------------------------------------------------
# Not reached by the fast tests otherwise (the toy study runs its sweeps in spawned workers, which mutmut
# cannot trace), so checked here on hand-computed tensors.

import torch  # noqa: E402

from mergebench.core import in_memory  # noqa: E402
from mergebench.core.context import TensorContext  # noqa: E402
from mergebench.core.errors import ParameterError  # noqa: E402
from mergebench.core.merge_ops import random_keep_mask, ties_merge_  # noqa: E402
from mergebench.core.plugin_manager import make_plugin_manager  # noqa: E402


@pytest.fixture(scope="module")
def methods():
    return make_plugin_manager(entry_points=False).merge_methods()


def _models():
    base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "same": torch.tensor([0.5, 0.25], dtype=torch.bfloat16),
            "ids": torch.tensor([0, 1, 2]), "tied": torch.tensor([1.0, 1.0])}
    e0 = {"w": base["w"] + torch.tensor([[1.0, 0.0], [0.0, -2.0]]), "same": base["same"].clone(),
          "ids": torch.tensor([5, 5, 5]), "tied": torch.tensor([2.0, 3.0])}
    e1 = {"w": base["w"] + torch.tensor([[3.0, 0.0], [0.0, 1.0]]), "same": base["same"].clone(),
          "ids": torch.tensor([7, 7, 7]), "tied": torch.tensor([2.0, 3.0])}
    return base, [e0, e1]


def _same(a, b):
    """The input tensor itself (same storage, dtype and shape), not a converted copy."""
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape


def _unchanged(models, snapshot):
    return all(torch.equal(a[n], b[n]) for a, b in zip(models, snapshot) for n in a)


def test_in_memory_average_by_hand(methods):
    base, experts = _models()
    snapshot = [{n: t.clone() for n, t in m.items()} for m in [base] + experts]
    out = in_memory.merge(methods.get("average"), {}, base, experts)
    assert torch.equal(out["w"], torch.tensor([[3.0, 2.0], [3.0, 3.5]]))  # (e0 + e1) / 2
    assert out["w"].shape == (2, 2) and out["w"].dtype == torch.float32
    assert _same(out["same"], base["same"]) and _same(out["ids"], base["ids"])  # copied from the template
    assert torch.equal(out["tied"], torch.tensor([2.0, 3.0]))  # the experts agree but differ from the base
    out = in_memory.merge(methods.get("average"), {}, None, experts, weights=(1.0, 3.0))
    assert torch.equal(out["w"], torch.tensor([[3.5, 2.0], [3.0, 4.25]]))  # (e0 + 3 e1) / 4
    assert _same(out["ids"], experts[0]["ids"]) and _same(out["same"], experts[0]["same"])
    assert _unchanged([base] + experts, snapshot)  # methods work in place: the sweep's inputs must not move
    with pytest.raises(ParameterError):
        in_memory.merge(methods.get("average"), {}, None, experts, weights=(1.0, -1.0))


def test_in_memory_task_arithmetic_and_its_delta_by_hand(methods):
    base, experts = _models()
    snapshot = [{n: t.clone() for n, t in m.items()} for m in [base] + experts]
    ta = methods.get("task_arithmetic")
    out = in_memory.merge(ta, {"lambda": 0.5}, base, experts)
    assert torch.equal(out["w"], torch.tensor([[3.0, 2.0], [3.0, 3.5]]))  # base + 0.5 * (tau0 + tau1)
    assert torch.equal(out["tied"], torch.tensor([2.0, 3.0]))  # base + 0.5 * 2 * (1, 2)
    assert _same(out["ids"], base["ids"])
    assert torch.equal(in_memory.merge(ta, {}, base, experts)["w"], torch.tensor([[5.0, 2.0], [3.0, 3.0]]))
    delta = in_memory.merge_delta(ta, {"lambda": 0.5}, base, experts, weights=(1.0, 2.0))
    assert delta["same"] is None and delta["ids"] is None
    assert torch.equal(delta["w"], torch.tensor([[7.0, 0.0], [0.0, 0.0]]))
    scaled = in_memory.apply_delta(base, delta, 0.5)
    assert torch.equal(scaled["w"], torch.tensor([[4.5, 2.0], [3.0, 4.0]])) and scaled["w"].shape == (2, 2)
    assert _same(scaled["ids"], base["ids"]) and _same(scaled["same"], base["same"])
    assert torch.equal(in_memory.merge_delta(ta, {}, base, experts)["w"], torch.tensor([[4.0, 0.0], [0.0, -1.0]]))
    assert _unchanged([base] + experts, snapshot)
    with pytest.raises(MergebenchError) as e:
        in_memory.merge_delta(methods.get("average"), {}, base, experts)
    assert str(e.value) == "merge method 'average' has no separate task vector to scale"


def test_in_memory_ties_by_hand(methods):
    base, experts = _models()
    ties = methods.get("ties")
    # tau0 = (1, 0, 0, -2), tau1 = (3, 0, 0, 1); density 0.5 keeps 2 of 4 each: both unchanged.
    # sign(tau0 + tau1) = (+, 0, 0, -); agreeing mean: (1 + 3) / 2 = 2 and -2 -> delta (2, 0, 0, -2)
    out = in_memory.merge(ties, {"density": 0.5, "lambda": 0.5}, base, experts)
    assert torch.equal(out["w"], torch.tensor([[2.0, 2.0], [3.0, 3.0]]))
    # density 0.25 keeps 1 each: tau0 -> (0, 0, 0, -2), tau1 -> (3, 0, 0, 0): delta (3, 0, 0, -2)
    assert torch.equal(in_memory.merge_delta(ties, {"density": 0.25}, base, experts)["w"],
                       torch.tensor([[3.0, 0.0], [0.0, -2.0]]))
    with pytest.raises(ParameterError):
        in_memory.merge(ties, {}, base, experts, weights=(1.0, 0.0))


def test_in_memory_dare_ties_uses_the_engines_per_tensor_streams(methods):
    torch.manual_seed(0)
    base = {"w": torch.randn(8, 8)}
    experts = [{"w": base["w"] + torch.randn(8, 8)} for _ in range(3)]
    dare = methods.get("dare_ties")
    out = in_memory.merge(dare, {"density": 0.5, "lambda": 1.0}, base, experts, seed=3)
    from mergebench.core.context import content_key

    # the streams follow each expert's stored bytes, as in the engine
    ctx = TensorContext("w", (1.0, 1.0, 1.0), 3, streams=tuple(content_key(e["w"]) for e in experts))
    taus = [(e["w"] - base["w"]).reshape(-1) * random_keep_mask(64, 0.5, ctx.generator_for(t))
            for t, e in enumerate(experts)]
    expected = base["w"].reshape(-1) + ties_merge_(taus, (1.0, 1.0, 1.0)) / 0.5
    assert torch.allclose(out["w"].reshape(-1), expected, rtol=0, atol=1e-6)
    other = in_memory.merge(dare, {"density": 0.5, "lambda": 1.0}, base, experts, seed=4)
    assert not torch.equal(other["w"], out["w"])


def test_in_memory_merges_in_float32_whatever_the_input_float_type(methods):
    base = {"h": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    experts = [{"h": torch.tensor([2.0, 2.0], dtype=torch.float16)}, {"h": torch.tensor([3.0, 2.5], dtype=torch.float16)}]
    out = in_memory.merge(methods.get("average"), {}, base, experts)
    assert out["h"].dtype == torch.float32 and torch.equal(out["h"], torch.tensor([2.5, 2.25]))
    delta = in_memory.merge_delta(methods.get("task_arithmetic"), {}, base, experts)
    assert delta["h"].dtype == torch.float32 and torch.equal(delta["h"], torch.tensor([3.0, 0.5]))


def test_in_memory_output_follows_the_first_experts_names_without_a_base(methods):
    e0 = {"a": torch.tensor([1.0]), "b": torch.tensor([2.0])}
    e1 = {"b": torch.tensor([4.0]), "a": torch.tensor([3.0])}
    out = in_memory.merge(methods.get("average"), {}, None, [e0, e1])
    assert list(out) == ["a", "b"]
    assert torch.equal(out["a"], torch.tensor([2.0])) and torch.equal(out["b"], torch.tensor([3.0]))


def test_in_memory_dare_ties_default_seed_is_0_and_its_delta_scales_like_the_merge(methods):
    torch.manual_seed(1)
    base = {"w": torch.randn(6, 6)}
    experts = [{"w": base["w"] + torch.randn(6, 6)} for _ in range(2)]
    dare = methods.get("dare_ties")
    seeded = in_memory.merge(dare, {"density": 0.5}, base, experts, seed=0)
    assert torch.equal(in_memory.merge(dare, {"density": 0.5}, base, experts)["w"], seeded["w"])
    delta = in_memory.merge_delta(dare, {"density": 0.5}, base, experts)
    assert torch.equal(in_memory.merge_delta(dare, {"density": 0.5}, base, experts, seed=0)["w"], delta["w"])
    assert torch.equal(in_memory.apply_delta(base, delta, 1.0)["w"], seeded["w"])
    # density 0.5, not the default 0.2: the given parameters reach the method
    assert not torch.equal(in_memory.merge_delta(dare, {}, base, experts)["w"], delta["w"])
    base2, experts2 = _models()
    assert torch.equal(in_memory.merge_delta(methods.get("ties"), {"density": 0.5}, base2, experts2)["w"],
                       torch.tensor([[2.0, 0.0], [0.0, -2.0]]))  # see test_in_memory_ties_by_hand


def test_in_memory_hands_a_methods_per_tensor_pre_pass_to_it():
    from mergebench.core.analysis import MagnitudeThreshold
    from mergebench.core.registry import MergeMethod

    seen = []

    def delta(base, experts, params, ctx):
        seen.append(ctx.analysis)
        return torch.zeros_like(base)

    probe = MergeMethod(name="probe", description="", delta=delta, scale_param="s", elementwise=True,
                        params=(), tensor_analysis=lambda params, ctx: MagnitudeThreshold(0.5, len(ctx.weights)))
    base, experts = _models()
    in_memory.merge_delta(probe, {}, base, experts)
    # by hand: |tau0| = (1, 0, 0, 2), |tau1| = (3, 0, 0, 1); keeping 2 of 4, the threshold is 1 and one
    # entry equal to it is kept, for each expert
    assert seen[0] == [(1.0, 1), (1.0, 1)]
    assert len(seen) == 2  # "w" and "tied"; identical and integer tensors skipped
    no_merge_scale = MergeMethod(name="noscale", description="", merge=lambda b, e, p, c: b, delta=delta)
    with pytest.raises(MergebenchError, match="no separate task vector"):
        in_memory.merge_delta(no_merge_scale, {}, base, experts)


def test_ci_gate_passes_at_exactly_the_tolerance():
    rows = [lb.Row("toy", "pre", 2, "ta", "merge", lb.Stat(0.75, 0.0, 1), lb.Stat(0.5, 0.0, 1), [0], [{}])]
    path_rows = {"toy/pre/N=2/ta": {"held_in": 0.875, "held_out": 0.625}}  # both exactly 0.125 above, in binary
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "b.json"
        path.write_text(json.dumps({"rows": path_rows}))
        assert lb.check(rows, path, 0.125) == []
        assert lb.check(rows, path, 0.0625) == ["toy/pre/N=2/ta: held-in 0.750 < baseline 0.875 - 0.0625",
                                                "toy/pre/N=2/ta: held-out 0.500 < baseline 0.625 - 0.0625"]


def test_leaderboard_params_text_lists_every_parameter_but_the_trim_scope():
    row = lb.Row("toy", "pre", 2, "ties", "merge", lb.Stat(0.5, None, 1), lb.Stat(0.5, None, 1), [0, 1],
                 [{"lambda": 0.5, "density": 0.2, "trim_scope": "tensor"}, {"density": 0.1, "lambda": 1.0}])
    assert lb.table_rows([row])[0][-1] == "density=0.1, lambda=1.0 (seed 1); density=0.2, lambda=0.5 (seed 0)"


def test_leaderboard_baselines_skip_only_the_incomplete_seed(board):
    board.conn.execute("DELETE FROM models WHERE key = 'ea0'")  # the first seed lacks an expert
    rows = {r.method: r for r in lb.build(board, sizes=("toy",))}
    assert rows["experts"].held_in.n == 1 and rows["base"].held_in.n == 1 and rows["multitask"].held_in.n == 1
    assert rows["multitask"].held_in.mean == A(1.0)  # seed 1's multitask model (seed 0's scored 0.5)


def test_database_waits_for_another_writer_instead_of_failing(tmp_path):
    """sqlite3's default busy timeout is 5 s; the results database waits up to 60 s for a lock."""
    import threading

    db = ResultsDB(tmp_path / "r.sqlite")
    other = sqlite3.connect(tmp_path / "r.sqlite", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(5.5, lambda: other.execute("ROLLBACK"))
    release.start()
    try:
        db.set_meta("k", 1)  # blocks until the other writer lets go, > 5 s later
    finally:
        release.join()
    assert db.meta("k") == 1


# ---- merge maths helpers and the methods' checks (core/merge_ops.py, plugins/) -----------------------------

from conftest import reference_uniforms16  # noqa: E402
from mergebench.core.merge_ops import drop_and_rescale_, magnitude_mask  # noqa: E402
from mergebench.plugins import average as average_plugin, task_vectors as ties_plugin  # noqa: E402
from mergebench.plugins.task_vectors import DARE_TIES as dare_plugin  # noqa: E402


def test_magnitude_mask_is_boolean_at_the_edges():
    x = torch.tensor([0.0, -1.0, 2.0, 0.0])
    for k, expected in ((0, [False] * 4), (-1, [False] * 4), (4, [True] * 4), (9, [True] * 4),
                        (2, [False, True, True, False]), (3, [True, True, True, False])):
        mask = magnitude_mask(x, k)
        assert mask.dtype == torch.bool and mask.tolist() == expected, k


def test_random_keep_mask_keeps_exactly_the_uniforms_below_density():
    n = 1 << 20
    # density 1.0 keeps every entry (its threshold, 32768, is beyond int16: handled apart)
    for density in (0.0, 0.75, 65535 / 65536, 0.2, 1.0):
        g = torch.Generator().manual_seed(5)
        keep = random_keep_mask(n, density, g)
        assert torch.equal(keep, reference_uniforms16(n, 5) < round(density * 65536)), density
    assert not random_keep_mask(n, 0.0, torch.Generator().manual_seed(1)).any()


def test_drop_and_rescale_draws_from_the_given_generator_and_skips_density_one_or_more():
    tau = torch.arange(1.0, 65.0)
    out = drop_and_rescale_(tau.clone(), 0.5, torch.Generator().manual_seed(9))
    assert torch.equal(out, tau * (reference_uniforms16(64, 9) < 32768) / 0.5)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(drop_and_rescale_(tau.clone(), 1.5, g), tau)
    assert torch.equal(drop_and_rescale_(tau.clone(), 1.0, g), tau)


def test_method_checks_refuse_with_their_messages():
    with pytest.raises(ParameterError) as e:
        average_plugin._check({}, (1.0, -1.0))
    assert str(e.value) == "average: the expert weights sum to 0, so their mean is undefined"
    with pytest.raises(ParameterError) as e:
        dare_plugin._check({"density": 0.0}, (1.0, 1.0))
    assert str(e.value) == "parameter 'density' of merge method 'dare_ties' must be > 0 (it rescales by 1/density)"
    with pytest.raises(ParameterError) as e:
        dare_plugin._check({"density": 0.5}, (1.0, 0.0))
    assert str(e.value) == "sign election needs positive expert weights, got [1.0, 0.0]"
    with pytest.raises(ParameterError) as e:
        ties_plugin.positive_weights({}, (2.0, -1.0))
    assert str(e.value) == "sign election needs positive expert weights, got [2.0, -1.0]"
    dare_plugin._check({"density": 1e-6}, (1.0, 2.0))


def test_ties_picks_one_pre_pass_per_trim_scope():
    from mergebench.core.context import TensorContext

    two = TensorContext("w", (1.0, 1.0))
    tensor = ties_plugin.tensor_threshold({"trim_scope": "tensor", "density": 0.3}, two)
    assert (tensor.density, tensor.n, tensor.k) == (0.3, 2, None)
    assert ties_plugin.tensor_threshold({"trim_scope": "global", "density": 0.3}, two) is None
    whole = ties_plugin.global_threshold({"trim_scope": "global", "density": 0.4}, ({}, {}, {}))
    assert (whole.density, whole.n, whole.k) == (0.4, 3, None)
    assert ties_plugin.global_threshold({"trim_scope": "tensor", "density": 0.4}, ({}, {}, {})) is None


def test_threshold_mask_reports_no_ties_used_when_none_are_allowed():
    from mergebench.core.merge_ops import threshold_mask

    mask, used = threshold_mask(torch.tensor([1.0, -2.0, 1.0]), 1.0, 0)
    assert mask.tolist() == [False, True, False] and used == 0


def test_ties_carries_the_tie_allowance_across_chunks():
    # one expert, task vector (1, 1, 1, 1), density 0.5: threshold 1 with 2 tied entries to keep, the
    # first two by index; merged in two chunks of 2 sharing one context, as the engine streams it
    ctx = TensorContext("w", (1.0,), 0, [(1.0, 2)])
    params = {"density": 0.5, "lambda": 1.0, "trim_scope": "tensor"}
    first = ties_plugin.ties_delta(torch.zeros(2), [torch.ones(2)], params, ctx)
    second = ties_plugin.ties_delta(torch.zeros(2), [torch.ones(2)], params, ctx)
    assert first.tolist() == [1.0, 1.0] and second.tolist() == [0.0, 0.0]
