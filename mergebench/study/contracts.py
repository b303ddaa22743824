"""The typed objects study components exchange: built suite data, component choices, model roles, jobs.

Plugins meet these contracts (docs/plugins.md): a suite's ``build`` returns (or writes) a
:class:`SuiteData`; base preparers receive :class:`PrepareInputs`; the runner refers to every
component through a :class:`ComponentChoice` taken from the run config, never by a name fixed in code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

from mergebench.core.errors import InputError

OnStep = Callable[[int, int, float], None]
SUITE_FILE = "suite.json"


@dataclass(frozen=True)
class SuiteData:
    """A built suite on disk: what trainers, preparers and evaluators may read.

    ``files[name][split]`` is an absolute JSONL path for each dataset (JSONL rows: ``query`` plus
    ``choices``/``label`` or ``answer``); a suite may add other named files there too (micro-t0 adds
    ``corpus`` and ``instructions``, which its own preparers read). ``tokenizer`` is a tokenizer directory
    built with the data, or None when models bring their own.
    """

    suite: str
    directory: Path
    files: Mapping[str, Mapping[str, str]]
    tokenizer: Path | None = None
    seed: int | None = None
    version: str = ""

    def file(self, name: str, split: str) -> Path | None:
        """The path of ``name``'s ``split``, or None when the suite has no such file."""
        path = self.files.get(name, {}).get(split)
        return None if path is None else Path(path)

    def require(self, name: str, split: str, who: str) -> Path:
        """Like :meth:`file`, but a missing file is one clear error naming ``who`` needs it."""
        path = self.file(name, split)
        if path is None:
            raise InputError(f"{who} needs the '{split}' split of '{name}', which suite '{self.suite}' does not build "
                             f"(it has: {', '.join(sorted(self.files)) or 'nothing'})")
        return path

    def train_files(self, datasets: Iterable[str], who: str = "training") -> list[Path]:
        return [self.require(d, "train", who) for d in datasets]

    def to_json(self) -> dict[str, Any]:
        """The portable form written as suite.json: paths relative to the suite's directory."""
        return {"suite": self.suite, "seed": self.seed, "version": self.version,
                "files": {n: {s: Path(p).name for s, p in splits.items()} for n, splits in self.files.items()},
                "tokenizer": None if self.tokenizer is None else Path(self.tokenizer).name}

    def write(self) -> None:
        (Path(self.directory) / SUITE_FILE).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, directory: Path) -> SuiteData:
        """The suite data in ``directory`` (its suite.json), with every path rooted at ``directory``."""
        directory = Path(directory).resolve()
        try:
            raw = json.loads((directory / SUITE_FILE).read_text())
            files = {n: {s: str(directory / Path(p).name) for s, p in splits.items()}
                     for n, splits in raw["files"].items()}
        except (OSError, ValueError, KeyError, AttributeError):
            raise InputError(f"{directory}: not a built suite (no readable {SUITE_FILE}); "
                             f"run `mergebench suite build`") from None
        tokenizer = raw.get("tokenizer")
        return cls(suite=raw["suite"], directory=directory, files=files,
                   tokenizer=None if not tokenizer else directory / Path(tokenizer).name,
                   seed=raw.get("seed"), version=str(raw.get("version", "")))

    @classmethod
    def coerce(cls, value: Any, directory: Path, suite: str, seed: int) -> SuiteData:
        """What a suite's ``build`` returned (SuiteData, or a mapping with ``files``) as SuiteData."""
        if isinstance(value, SuiteData):
            return value
        if isinstance(value, Mapping) and "files" in value:
            tok = value.get("tokenizer")
            return cls(suite=value.get("suite", suite), directory=Path(directory), files=value["files"],
                       tokenizer=Path(tok) if tok else None, seed=value.get("seed", seed),
                       version=str(value.get("version", "")))
        if value is None and (Path(directory) / SUITE_FILE).is_file():
            return cls.load(directory)
        raise InputError(f"suite '{suite}': its build function returned {type(value).__name__}; expected SuiteData")


@dataclass(frozen=True)
class ComponentChoice:
    """A registered component chosen by the run config: its name and its (resolved) parameters."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


@dataclass(frozen=True)
class BaseChoice:
    """One base of the study: its size label and kind, the preparer that makes it and its parameters.

    ``source`` names another base kind of the same size whose output this preparer starts from (the
    instruction-tuned base is prepared from the pretrained one). ``studied`` is False for a base built only
    as another's source: it gets no experts and no leaderboard rows.
    """

    size: str
    kind: str
    preparer: ComponentChoice
    source: str | None = None
    studied: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = {"size": self.size, "kind": self.kind, "preparer": self.preparer.name,
               "params": dict(self.preparer.params)}
        if self.source is not None:
            out["from"] = self.source
        if not self.studied:
            out["study"] = False
        return out


@dataclass(frozen=True)
class PrepareInputs:
    """What a base preparer receives besides its parameters and work directory.

    ``data``: the run's built suite. ``source``: the model directory this base starts from (``from:`` in
    the config), or None. ``device``: where to compute ("cpu", "cuda", "cuda:1"). ``on_step(step, total,
    loss)``: progress for a training preparer to report, or None.
    """

    data: SuiteData | None
    source: Path | None = None
    device: str = "cpu"
    on_step: OnStep | None = None


Role = Literal["base", "expert", "multitask", "merge"]


@dataclass(frozen=True)
class ModelRole:
    """What a model is in a study: a base of some kind, the expert of a category, the multitask model, a merge."""

    role: Role
    seed: int
    size: str
    base_kind: str
    category: str | None = None

    def describe(self) -> str:
        what = {"base": f"{self.base_kind} base", "expert": f"{self.category} expert",
                "multitask": "multitask model", "merge": "merge"}[self.role]
        return f"{what} ({self.size}, {self.base_kind}, seed {self.seed})"


@dataclass(frozen=True)
class Resources:
    """What one job asks of the machine that runs it (an executor places it accordingly)."""

    cpus: float = 1
    gpus: float = 0
    memory_bytes: int = 0

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"] + ([f"{self.gpus:g} GPU"] if self.gpus else [])
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes / 2**30:.1f} GiB")
        return ", ".join(parts)


CALIBRATION_SPLITS = ("train", "validation")


@dataclass(frozen=True)
class CalibrationSettings:
    """Where data-aware merge methods (RegMean, Fisher) take their calibration data in a study: each expert
    its own category's datasets' ``split`` (train or validation, never test), as (prompt, completion) pairs,
    ``samples`` of them drawn by ``seed``; ``max_length`` and ``batch_size`` as in
    :class:`mergebench.core.calibration.CalibrationData`."""

    split: str = "train"
    samples: int = 128
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "samples": self.samples, "max_length": self.max_length,
                "batch_size": self.batch_size, "seed": self.seed}

    def data_parameters(self) -> dict[str, int]:
        """The engine's ``calibration`` keys besides ``data``."""
        return {k: v for k, v in self.to_dict().items() if k != "split"}
