"""The ``t0-paper`` suite: the paper's real 16 held-in and 7 held-out datasets as lm-eval task configs.

Held-in configs ship in ``t0_paper_tasks/`` (one YAML per dataset, T0-style prompts); held-out ones are
lm-eval's own tasks (COPA, HellaSwag, ANLI, RTE, WSC, Winogrande, WiC). ``build`` renders every task's
documents with its own prompt into local JSONL (:mod:`mergebench.evaluators.lm_eval_export`), so experts
train on the same prompts they are scored with, and validation is scored apart from test. The data
comes from the local Hugging Face datasets cache: run once with internet (or copy the cache) first.
"""

from __future__ import annotations

from pathlib import Path

from mergebench.core.hookspecs import hookimpl
from mergebench.core.registry import Param
from mergebench.study.components import DatasetSpec, Suite

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


def build(directory: Path, seed: int, params: dict):
    from mergebench.evaluators.lm_eval_export import export

    specs = [d for group in (HELD_IN, HELD_OUT) for ds in group.values() for d in ds]
    return export(str(TASK_DIR), specs, directory, "t0-paper", seed,
                  {"train": params["train"], "validation": params["validation"], "test": params["test"]})


@hookimpl
def register_suites(register):
    register(Suite(
        name="t0-paper",
        description="The paper's 16 held-in T0 datasets and 7 held-out ones (ANLI as its 3 rounds), from the Hugging Face hub.",
        reference="Yadav et al., What Matters for Model Merging at Scale?, arXiv:2410.03617; Sanh et al., T0, arXiv:2110.08207",
        params=(Param("train", int, 20000, "training examples per held-in dataset (0: all)", min=0),
                Param("validation", int, 200, "validation examples per dataset (hyperparameter choice; 0: all)", min=0),
                Param("test", int, 1000, "test examples per dataset (0: all)", min=0)),
        held_in=HELD_IN, held_out=HELD_OUT, task_dir=str(TASK_DIR), build=build))
