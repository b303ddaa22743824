"""Any lm-eval task as a suite's local data: its documents rendered by the task's own prompt into JSONL.

A suite of hub datasets (``t0-paper``) is defined by lm-eval task configs. To train experts on it and to
score validation apart from test, its ``build`` renders each task's train, validation and test documents
with the task's ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` into the JSONL rows every
mergebench component reads (``query`` + ``answer``, or ``query`` + ``choices`` + ``label``). From then on
the suite is scored like a generated one, through the same lm-eval session, so training and evaluation
see the same prompts. Data comes from the local Hugging Face datasets cache (or the local files a task
config names); nothing is downloaded unless the user turns offline mode off.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable

from mergebench.core.errors import InputError
from mergebench.study.contracts import SuiteData

SPLITS = ("train", "validation", "test")


def _docs(task, split: str) -> list | None:
    has = {"train": task.has_training_docs, "validation": task.has_validation_docs, "test": task.has_test_docs}[split]
    fetch = {"train": task.training_docs, "validation": task.validation_docs, "test": task.test_docs}[split]
    return list(fetch()) if has() else None


def render(task, doc: Any, output_type: str) -> dict[str, Any] | None:
    """One document as a JSONL row, or None when it has no usable label (e.g. GLUE test labels are -1)."""
    query = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if output_type == "multiple_choice":
        choices = [str(c) for c in task.doc_to_choice(doc)]
        if isinstance(target, str):
            target = choices.index(target) if target in choices else -1
        if not isinstance(target, int) or not 0 <= target < len(choices):
            return None
        return {"query": str(query), "choices": [" " + c.lstrip() for c in choices], "label": target}
    if isinstance(target, list):
        target = target[0] if target else ""
    if isinstance(target, int):  # an index into the choices of a generation task
        target = task.doc_to_choice(doc)[target]
    return {"query": str(query), "answer": " " + str(target).lstrip()}


def export(task_dir: str | None, specs: Iterable, directory: Path, suite: str, seed: int,
           max_examples: dict[str, int], include_defaults: bool = True) -> SuiteData:
    """Render ``specs`` (DatasetSpecs naming lm-eval tasks) into ``directory``; returns the SuiteData.

    ``max_examples[split]`` caps each split (0: all), sampled with ``seed`` so replicates differ; a task
    without a validation split gets one carved from its training documents (never from test).
    """
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise InputError("building a suite from lm-eval tasks needs lm-eval: pip install 'mergebench[eval]'") from None
    specs = list(specs)
    manager = TaskManager(include_path=task_dir, include_defaults=include_defaults)
    try:
        tasks = get_task_dict([s.name for s in specs], manager)
    except Exception as exc:  # noqa: BLE001 - lm-eval raises many kinds for missing data
        raise InputError(f"suite '{suite}': cannot load its lm-eval tasks ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); with no internet the datasets must be in "
                         f"the local Hugging Face cache") from None
    files: dict[str, dict[str, str]] = {}
    for spec in specs:
        task = tasks[spec.name]
        docs = {split: _docs(task, split) for split in SPLITS}
        rng = random.Random(f"{suite}-{seed}-{spec.name}")
        if docs["validation"] is None and docs["train"]:
            rng.shuffle(docs["train"])
            cut = max(1, len(docs["train"]) // 10)
            docs["validation"], docs["train"] = docs["train"][:cut], docs["train"][cut:]
        if docs["test"] is None:
            raise InputError(f"suite '{suite}': task '{spec.name}' has no test split")
        for split, split_docs in docs.items():
            if split_docs is None:
                continue
            rows = [r for r in (render(task, d, spec.output_type) for d in split_docs) if r is not None]
            cap = max_examples.get(split, 0)
            if cap and len(rows) > cap:
                rows = random.Random(f"{suite}-{seed}-{spec.name}-{split}").sample(rows, cap)
            path = Path(directory) / f"{spec.name}.{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            files.setdefault(spec.name, {})[split] = str(path)
    return SuiteData(suite, Path(directory), files, seed=seed)
