"""A whole study as a plugin: a suite, two base preparers, an expert trainer and an evaluator.

Everything is small and exact, so a study runs in seconds and every score can be computed by hand:

- suite ``toy-study``: 4 held-in categories and 2 held-out ones, one dataset each. Dataset ``d`` owns
  block ``d`` of a model's weight vector ``w``; its JSONL splits hold one row ``{"block", "target"}``.
  Validation targets are the training targets; test targets are 0.6 times them, so the
  hyperparameters that are best on validation are not the best on test.
- base preparer ``toy_init``: ``w`` = seeded noise; ``toy_shift``: a source base plus a constant (the
  "instruction-tuned" variant).
- expert trainer ``toy_finetune``: moves each trained dataset's block of ``w`` a ``rate`` of the way
  to its training target, and adds seeded noise everywhere (experts interfere, as real ones do).
- evaluator ``toy_score``: each entry of a dataset's block is one test example, scored
  ``1 / (1 + sharpness * (w[block][i] - target[i])^2)``; the dataset's score is the mean over its entries,
  and the per-example values are returned too (:class:`mergebench.study.components.Scores`), as lm-eval's
  per-sample results are.

Model directories hold ``config.json`` and ``model.safetensors`` (``w``: float32, ``steps``: int64),
the layout mergebench's merge engine reads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergebench import hookimpl
from mergebench.core.registry import Param
from mergebench.study.components import BasePreparer, DatasetSpec, Evaluator, ExpertTrainer, Scores, Suite
from mergebench.study.contracts import PrepareInputs, SuiteData

SUITE = "toy-study"
HELD_IN = ("alpha", "beta", "gamma", "delta")
HELD_OUT = ("x", "y")
TEST_SHRINK = 0.6


def dataset_name(category: str) -> str:
    return f"toy_{category}"


def _block_targets(seed: int, dim: int) -> dict[str, tuple[int, list[float]]]:
    """dataset -> (block index, training target)."""
    out = {}
    for block, category in enumerate(HELD_IN + HELD_OUT):
        rng = random.Random(f"{SUITE}-{seed}-{category}")
        out[dataset_name(category)] = (block, [rng.choice((-1, 1)) * rng.uniform(0.5, 1.5) for _ in range(dim)])
    return out


def build(directory: Path, seed: int, params: dict) -> SuiteData:
    files: dict[str, dict[str, str]] = {}
    for name, (block, target) in _block_targets(seed, params["dim"]).items():
        splits = {"validation": target, "test": [TEST_SHRINK * t for t in target]}
        if name.removeprefix("toy_") in HELD_IN:
            splits["train"] = target
        for split, values in splits.items():
            path = Path(directory) / f"{name}.{split}.jsonl"
            path.write_text(json.dumps({"block": block, "target": values}) + "\n")
            files.setdefault(name, {})[split] = str(path)
    return SuiteData(SUITE, Path(directory), files, seed=seed, version="1")


# ---- models ------------------------------------------------------------------------------------------

def read_model(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / "model.safetensors")


def write_model(directory: Path, tensors: dict[str, torch.Tensor], dim: int) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "toy-study", "dim": dim}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    return directory


def toy_init(params: dict, workdir: Path, inputs: PrepareInputs) -> Path:
    blocks = len(HELD_IN) + len(HELD_OUT)
    g = torch.Generator().manual_seed(params["seed"])
    w = params["noise"] * torch.randn(blocks * params["dim"], generator=g)
    return write_model(workdir, {"w": w, "steps": torch.zeros(1, dtype=torch.int64)}, params["dim"])


def toy_shift(params: dict, workdir: Path, inputs: PrepareInputs) -> Path:
    if inputs.source is None:
        raise ValueError("toy_shift starts from another base (from: in the config)")
    tensors = read_model(inputs.source)
    tensors["w"] = tensors["w"] + params["amount"]
    dim = json.loads((Path(inputs.source) / "config.json").read_text())["dim"]
    return write_model(workdir, tensors, dim)


def toy_finetune(base: Path, data: list[Path], params: dict, workdir: Path, on_step=None, device: str = "cpu") -> Path:
    tensors = read_model(base)
    dim = json.loads((Path(base) / "config.json").read_text())["dim"]
    w = tensors["w"].clone()
    names = []
    for path in data:
        row = json.loads(Path(path).read_text().splitlines()[0])
        block, target = row["block"], torch.tensor(row["target"])
        part = w[block * dim:(block + 1) * dim]
        part += params["rate"] * (target - part)
        names.append(Path(path).name)
    g = torch.Generator().manual_seed(params["seed"] * 1000 + sum(map(ord, "".join(sorted(names)))))
    w += params["noise"] * torch.randn(w.shape, generator=g)
    if on_step:
        on_step(1, 1, 0.0)
    return write_model(workdir, {"w": w, "steps": tensors["steps"] + 1}, dim)


# ---- evaluation -----------------------------------------------------------------------------------------

def example_scores(w: torch.Tensor, block: int, target: list[float], sharpness: float) -> list[float]:
    """Each entry of the block as one example: 1 / (1 + sharpness * its squared distance to the target)."""
    dim = len(target)
    error = (w[block * dim:(block + 1) * dim].double() - torch.tensor(target, dtype=torch.float64)).pow(2)
    return (1.0 / (1.0 + sharpness * error)).tolist()


def score(w: torch.Tensor, block: int, target: list[float], sharpness: float) -> float:
    values = example_scores(w, block, target, sharpness)
    return sum(values) / len(values)


class ToySession:
    """Scores any state dict on the chosen datasets of one split (what sweeps use to swap weights in)."""

    def __init__(self, model_dir: Path, data: SuiteData, datasets: list[str], params: dict):
        self.model_dir, self.params = Path(model_dir), params
        self.rows = {d: json.loads(data.require(d, params["split"], "toy_score").read_text().splitlines()[0])
                     for d in datasets}

    def evaluate(self, state_dict=None) -> Scores:
        w = (state_dict if state_dict is not None else read_model(self.model_dir))["w"].float()
        examples = {d: example_scores(w, r["block"], r["target"], self.params["sharpness"]) for d, r in self.rows.items()}
        return Scores({d: sum(v) / len(v) for d, v in examples.items()}, examples)


def toy_session(model_dir, suite, data, datasets, params) -> ToySession:
    return ToySession(Path(model_dir), data, list(datasets), params)


def toy_evaluate(models, suite, data, datasets, params) -> list[Scores]:
    return [ToySession(Path(m), data, list(datasets), params).evaluate() for m in models]


# ---- registration -------------------------------------------------------------------------------------

@hookimpl
def register_suites(register):
    register(Suite(
        name=SUITE, description="A toy suite whose scores are exact functions of the weights (for tests and demos).",
        params=(Param("dim", int, 8, "entries of w per dataset", min=1),),
        held_in={c: (DatasetSpec(dataset_name(c), "multiple_choice", "acc"),) for c in HELD_IN},
        held_out={c: (DatasetSpec(dataset_name(c), "multiple_choice", "acc"),) for c in HELD_OUT},
        build=build, version="1"))


@hookimpl
def register_base_preparers(register):
    register(BasePreparer(
        name="toy_init", description="A toy base: seeded noise.",
        params=(Param("dim", int, 8, "entries of w per dataset (the suite's dim)", min=1),
                Param("noise", float, 0.05, "standard deviation of the initial weights", min=0.0),
                Param("seed", int, 0, "seed of the initial weights")),
        prepare=toy_init))
    register(BasePreparer(
        name="toy_shift", description="Another base plus a constant (a toy 'instruction-tuned' variant).",
        params=(Param("amount", float, 0.1, "added to every weight"),),
        prepare=toy_shift, needs_source=True))


@hookimpl
def register_expert_trainers(register):
    register(ExpertTrainer(
        name="toy_finetune", description="Moves each trained dataset's block of w towards its target, plus noise.",
        params=(Param("rate", float, 1.0, "fraction of the way to the target", min=0.0, max=1.0),
                Param("noise", float, 0.05, "seeded noise added to every weight", min=0.0),
                Param("seed", int, 0, "seed of the noise")),
        train=toy_finetune))


@hookimpl
def register_evaluators(register):
    register(Evaluator(
        name="toy_score", description="Mean over a dataset's block of 1 / (1 + sharpness * squared distance to the target).",
        params=(Param("split", str, "test", "which split's targets", choices=("validation", "test")),
                Param("sharpness", float, 4.0, "how fast the score falls with the distance", min=0.0)),
        evaluate=toy_evaluate, session=toy_session))
