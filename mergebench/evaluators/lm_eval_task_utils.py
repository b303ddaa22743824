"""Scoring functions that generated lm-eval task configs reference with ``!function``.

Copied next to the task YAMLs; lm-eval imports it from there. Computing the metrics here keeps them
offline (lm-eval would otherwise fetch unregistered ROUGE variants from the hub).
"""

import re

_SPACE = re.compile(r"\s+")


def _normalise(text):
    return _SPACE.sub(" ", str(text)).strip().lower().rstrip(".")


def process_exact_match(doc, results):
    return {"exact_match": float(_normalise(results[0]) == _normalise(doc["answer"]))}


def process_rouge_l(doc, results):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return {"rouge_l": scorer.score(str(doc["answer"]), str(results[0]))["rougeL"].fmeasure}
