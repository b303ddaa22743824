"""Hub suites (t0-paper) become local data by rendering each lm-eval task's documents with its own prompt;
checked on task configs backed by local JSON files, through the same lm-eval task loading."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mergebench.evaluators.lm_eval_export import export
from mergebench.study.components import DatasetSpec


def write_task(directory: Path, name: str, rows: dict[str, list[dict]], **config) -> None:
    files = {}
    for split, split_rows in rows.items():
        path = directory / f"{name}-{split}.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in split_rows))
        files[split] = str(path)
    base = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}}
    base.update({k: v for k, v in {"training_split": "train" if "train" in rows else None,
                                   "validation_split": "validation" if "validation" in rows else None,
                                   "test_split": "test"}.items() if v})
    (directory / f"{name}.yaml").write_text(yaml.safe_dump({**base, **config}, sort_keys=False))


def test_tasks_render_with_their_own_prompts(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    pairs = [{"s1": f"a{i}", "s2": f"b{i}", "label": i % 2} for i in range(10)]
    write_task(tasks, "para", {"train": pairs, "validation": pairs[:3], "test": pairs[:2] + [{"s1": "x", "s2": "y", "label": -1}]},
               output_type="multiple_choice", doc_to_text="S1: {{s1}}\nS2: {{s2}}\nSame?", doc_to_choice=["no", "yes"],
               doc_to_target="label", metric_list=[{"metric": "acc"}])
    qa = [{"q": f"What is {i}+1?", "a": str(i + 1)} for i in range(20)]
    write_task(tasks, "add", {"train": qa, "test": qa[:4]}, output_type="generate_until",
               doc_to_text="Q: {{q}}\nA:", doc_to_target="{{a}}", metric_list=[{"metric": "exact_match"}])
    out = tmp_path / "out"
    out.mkdir()
    data = export(str(tasks), [DatasetSpec("para", "multiple_choice", "acc"), DatasetSpec("add", "generate_until", "exact_match")],
                  out, "mine", 3, {"train": 0, "validation": 0, "test": 0}, include_defaults=False)
    assert data.suite == "mine" and data.seed == 3

    def read(name, split):
        return [json.loads(line) for line in data.file(name, split).read_text().splitlines()]

    assert read("para", "train")[1] == {"query": "S1: a1\nS2: b1\nSame?", "choices": [" no", " yes"], "label": 1}
    assert len(read("para", "test")) == 2  # the unlabelled (-1) test row cannot be scored: left out
    assert read("add", "test")[0] == {"query": "Q: What is 0+1?\nA:", "answer": " 1"}
    # no validation split: carved from train (a tenth), never from test, and disjoint from what is trained on
    val, train = read("add", "validation"), read("add", "train")
    assert len(val) == 2 and len(train) == 18 and not {r["query"] for r in val} & {r["query"] for r in train}
    capped = export(str(tasks), [DatasetSpec("add", "generate_until", "exact_match")], tmp_path, "mine", 3,
                    {"train": 5, "validation": 0, "test": 0}, include_defaults=False)
    assert len(capped.file("add", "train").read_text().splitlines()) == 5
