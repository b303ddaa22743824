"""The paper's score normalisation on hand-computed numbers, and the artefact cache."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from mergebench.study.cache import ArtifactCache, cache_key
from mergebench.core.errors import MergebenchError
from mergebench.study.normalise import normalise

HELD_IN = {"qa": ["qa1", "qa2"], "sentiment": ["sent1"]}
HELD_OUT = {"nli": ["nli1", "nli2"], "coref": ["coref1"]}
EXPERTS = {"qa": {"qa1": 0.8, "qa2": 0.5}, "sentiment": {"sent1": 0.9}}
BASE = {"nli1": 0.4, "nli2": 0.5, "coref1": 0.6}


def test_normalisation_by_hand():
    merged = {"qa1": 0.6, "qa2": 0.5, "sent1": 0.45, "nli1": 0.5, "nli2": 0.45, "coref1": 0.66}
    n = normalise(merged, HELD_IN, HELD_OUT, EXPERTS, BASE)
    # qa: (0.6/0.8 + 0.5/0.5) / 2 = (0.75 + 1.0) / 2 = 0.875; sentiment: 0.45/0.9 = 0.5
    assert n.held_in_categories == pytest.approx({"qa": 0.875, "sentiment": 0.5})
    assert n.held_in == pytest.approx((0.875 + 0.5) / 2)  # categories weigh the same: 0.6875
    # nli: (0.5/0.4 + 0.45/0.5) / 2 = (1.25 + 0.9) / 2 = 1.075; coref: 0.66/0.6 = 1.1
    assert n.held_out_categories == pytest.approx({"nli": 1.075, "coref": 1.1})
    assert n.held_out == pytest.approx(1.0875)
    assert n.per_dataset["qa1"] == pytest.approx(0.75)


def test_only_the_merged_categories_count_as_held_in():
    merged = {"qa1": 0.4, "qa2": 0.25, "sent1": 0.0, "nli1": 0.4, "nli2": 0.5, "coref1": 0.6}
    n = normalise(merged, {"qa": HELD_IN["qa"]}, HELD_OUT, EXPERTS, BASE)
    assert n.held_in == pytest.approx((0.5 + 0.5) / 2) and set(n.held_in_categories) == {"qa"}
    assert n.held_out == pytest.approx(1.0)  # the base itself normalises to 1


def test_zero_reference_is_an_error():
    with pytest.raises(MergebenchError, match="must be > 0"):
        normalise({"nli1": 0.3}, {}, {"nli": ["nli1"]}, {}, {"nli1": 0.0})


def test_cache_key_depends_on_everything_and_not_on_order():
    assert cache_key("expert", {"a": 1, "b": 2}) == cache_key("expert", {"b": 2, "a": 1})
    assert cache_key("expert", {"a": 1}) != cache_key("expert", {"a": 2})
    assert cache_key("expert", {"a": 1}) != cache_key("base", {"a": 1})


def test_cache_builds_once_and_never_keeps_a_partial_entry(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []

    def build(d):
        calls.append(d)
        (d / "weights.bin").write_bytes(b"x" * 10)

    first = cache.get_or_build("base", {"size": "tiny"}, build)
    again = cache.get_or_build("base", {"size": "tiny"}, build)
    assert first == again and len(calls) == 1 and (first / "weights.bin").read_bytes() == b"x" * 10

    def broken(d):
        (d / "half").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build("base", {"size": "small"}, broken)
    assert cache.get("base", {"size": "small"}) is None
    assert [p.name for p in (tmp_path / "base").iterdir() if not p.name.endswith(".lock")] == [first.name]


def _slow_build(root, counter):
    def build(d):
        with open(counter, "a") as fh:
            fh.write("built\n")
        time.sleep(0.5)
        (d / "out").write_text("done")

    ArtifactCache(root).get_or_build("expert", {"k": 1}, build)


def test_two_processes_build_an_entry_once(tmp_path):
    counter = tmp_path / "count.txt"
    procs = [multiprocessing.get_context("spawn").Process(target=_slow_build, args=(tmp_path / "c", counter))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert counter.read_text().count("built") == 1
