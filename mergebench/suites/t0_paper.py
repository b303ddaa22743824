"""The ``t0-paper`` suite: the paper's real 16 held-in and 7 held-out datasets as lm-eval task configs.

Held-in configs ship in ``t0_paper_tasks/`` (one YAML per dataset, T0-style prompts, data from the
Hugging Face hub when the user has internet); held-out ones are lm-eval's own tasks (COPA,
HellaSwag, ANLI, RTE, WSC, Winogrande, WiC). Nothing here downloads until a task is evaluated.
"""

from __future__ import annotations

from pathlib import Path

from mergebench.core.hookspecs import hookimpl
from mergebench.core.registry import DatasetSpec, Suite

TASK_DIR = Path(__file__).with_name("t0_paper_tasks")


def _mc(*names: str) -> tuple[DatasetSpec, ...]:
    return tuple(DatasetSpec(n, "multiple_choice", "acc") for n in names)


def _gen(metric: str, *names: str) -> tuple[DatasetSpec, ...]:
    return tuple(DatasetSpec(n, "generate_until", metric) for n in names)


HELD_IN = {
    "multiple_choice_qa": _mc("t0_dream", "t0_cosmos_qa"),
    "extractive_qa": _gen("exact_match", "t0_adversarial_qa", "t0_ropes"),
    "closed_book_qa": _gen("exact_match", "t0_hotpot_qa") + _mc("t0_wiki_qa"),
    "sentiment": _mc("t0_app_reviews", "t0_imdb"),
    "topic_classification": _mc("t0_ag_news", "t0_dbpedia_14"),
    "structure_to_text": _gen("rouge_l", "t0_common_gen", "t0_wiki_bio"),
    "summarization": _gen("rouge_l", "t0_cnn_dailymail", "t0_xsum"),
    "paraphrase_identification": _mc("t0_mrpc", "t0_qqp"),
}
HELD_OUT = {  # lm-eval's built-in tasks
    "sentence_completion": _mc("copa", "hellaswag"),
    "nli": _mc("anli_r1", "anli_r2", "anli_r3", "rte"),
    "coreference": _mc("wsc", "winogrande"),
    "word_sense_disambiguation": _mc("wic"),
}


@hookimpl
def register_suites(register):
    register(Suite(
        name="t0-paper",
        description="The paper's 16 held-in T0 datasets and 7 held-out ones (ANLI as its 3 rounds), from the Hugging Face hub.",
        reference="Yadav et al., What Matters for Model Merging at Scale?, arXiv:2410.03617; Sanh et al., T0, arXiv:2110.08207",
        held_in=HELD_IN, held_out=HELD_OUT, task_dir=str(TASK_DIR)))
