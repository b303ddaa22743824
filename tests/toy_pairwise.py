"""Test plugin: a merge method that merges exactly two experts (as two-model methods do), for the study's
per-N skipping under ``methods: all`` and explicit method lists."""

from __future__ import annotations

from mergebench import hookimpl
from mergebench.core.errors import ParameterError
from mergebench.core.registry import MergeMethod


def pairwise_mean(base, experts, params, ctx):
    return (experts[0] + experts[1]) / 2


def exactly_two(params, weights):
    if len(weights) != 2:
        raise ParameterError(f"pairwise_mean merges exactly 2 experts, got {len(weights)}")


@hookimpl
def register_merge_methods(register):
    register(MergeMethod(name="pairwise_mean", description="the mean of exactly two experts", merge=pairwise_mean,
                         check=exactly_two, needs_base=False))
