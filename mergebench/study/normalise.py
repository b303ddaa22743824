"""The paper's normalised scores (Yadav et al., 2024, "What Matters for Model Merging at Scale?").

- Held-in: a model's score on a dataset divided by the score of the expert trained on that dataset's
  category.
- Held-out: a model's score on a dataset divided by the base model's zero-shot score.
- Both are averaged over the datasets of a category, then over categories (so every category weighs
  the same whatever its number of datasets).

The same function scores merged models and the multitask baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from mergebench.core.errors import MergebenchError


@dataclass
class NormalisedScores:
    """A model's normalised scores: overall, per category and per dataset."""

    held_in: float | None
    held_out: float | None
    held_in_categories: dict[str, float] = field(default_factory=dict)
    held_out_categories: dict[str, float] = field(default_factory=dict)
    per_dataset: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # datasets whose reference scored 0 (on_zero="skip")


def _ratio(score: float, reference: float, what: str) -> float:
    if reference <= 0:
        raise MergebenchError(f"cannot normalise by {what}: its score is {reference}; a reference must be > 0")
    return score / reference


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def normalise(
    scores: Mapping[str, float],
    held_in: Mapping[str, list[str]],
    held_out: Mapping[str, list[str]],
    expert_scores: Mapping[str, Mapping[str, float]],
    base_scores: Mapping[str, float],
    on_zero: str = "error",
) -> NormalisedScores:
    """Normalise raw per-dataset ``scores``.

    ``held_in`` / ``held_out`` map category -> dataset names to include (for a merge of N experts,
    pass only the N merged categories as held-in). ``expert_scores[category][dataset]`` is the score
    of the category's expert on its own datasets; ``base_scores[dataset]`` the base's zero-shot score.
    A reference that scored 0 cannot normalise anything: ``on_zero="error"`` raises, ``"skip"`` leaves
    the dataset out of the means and lists it in ``skipped`` (a category with no dataset left is
    left out too).
    """
    skipped: list[str] = []

    def ratio(d: str, reference: float, what: str) -> float | None:
        if reference <= 0 and on_zero == "skip":
            skipped.append(d)
            return None
        return _ratio(scores[d], reference, what)

    per_dataset: dict[str, float] = {}
    in_categories: dict[str, float] = {}
    for category, datasets in held_in.items():
        if category not in expert_scores:
            raise MergebenchError(f"no expert score for held-in category '{category}'")
        ratios = []
        for d in datasets:
            r = ratio(d, expert_scores[category][d], f"the '{category}' expert on '{d}'")
            if r is not None:
                per_dataset[d] = r
                ratios.append(r)
        if ratios:
            in_categories[category] = _mean(ratios)
    out_categories: dict[str, float] = {}
    for category, datasets in held_out.items():
        ratios = []
        for d in datasets:
            r = ratio(d, base_scores[d], f"the base on '{d}'")
            if r is not None:
                per_dataset[d] = r
                ratios.append(r)
        if ratios:
            out_categories[category] = _mean(ratios)
    return NormalisedScores(
        held_in=_mean(list(in_categories.values())) if in_categories else None,
        held_out=_mean(list(out_categories.values())) if out_categories else None,
        held_in_categories=in_categories,
        held_out_categories=out_categories,
        per_dataset=per_dataset,
        skipped=skipped,
    )
