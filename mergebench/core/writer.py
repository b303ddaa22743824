"""Writing a merged model: streamed safetensors shards and an output directory that appears atomically."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergebench.core.errors import OutputError, ParameterError
from mergebench.core.memory import start_writeback
from mergebench.core.tensor_io import DTYPE_NAMES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal, as transformers), '2GiB' -> 2 * 2**30, 1000 -> 1000."""
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ParameterError(f"max shard size {value!r} is not a size like 5GB, 500MB or 2GiB")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if size <= 0:
        raise ParameterError(f"max shard size must be positive, got {value!r}")
    return size


@dataclass
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Shard:
    filename: str
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[Shard]:
    """Greedy shards in the given order, each at most ``max_shard_size`` bytes (a larger tensor gets its own).

    Inside a shard, tensors are ordered by element size, largest first, so every tensor starts at an
    offset aligned to its element size (the header is padded to 8 bytes), then by size, largest first: the
    engine merges in this order, so an embedding or an output head does not run last with the other workers idle
    (0.1B: the head's merge, write and fsync were the last 0.4 s of slerp's 0.9). The order of the returned
    tensors is the order in which they must be written; a safetensors reader does not depend on it.
    """
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append(Shard(name, sorted(group, key=lambda t: (-t.dtype.itemsize, -t.nbytes))))
    return shards


class ShardWriter:
    """Writes planned shards tensor by tensor: each header is known up front, so no shard is held in memory."""

    def __init__(self, directory: Path, shards: list[Shard], metadata: dict[str, str] | None = None):
        self.directory = directory
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, t) for i, s in enumerate(shards) for t in s.tensors]
        self._next = 0
        self._file = None
        self._shard_index = -1

    def _close_shard(self) -> None:
        """Flush the open shard to disk before it is closed: the output directory is renamed into place only after
        every shard is durable, not only the last."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _open_shard(self, index: int) -> None:
        self._close_shard()
        shard = self.shards[index]
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for t in shard.tensors:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.directory / shard.filename, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._shard_index = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, expected = self._order[self._next]
        if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(f"writer expected {expected}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if shard_index != self._shard_index:
            self._open_shard(shard_index)
        if tensor.numel():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            # numpy has no bfloat16/float8: write the raw bytes through an integer view of the same width.
            width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.dtype.itemsize]
            self._file.write(memoryview(flat.view(width).numpy()).cast("B"))
            self._file.flush()
            start_writeback(self._file.fileno())  # the fsync at the shard's end then has little left to write
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"writer finished after {self._next} of {len(self._order)} tensors")
        self._close_shard()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicDirectory:
    """A temporary directory beside ``target`` that replaces it only when the work succeeded.

    On any exception (Ctrl-C included) the temporary directory is removed and an existing target
    is left untouched.
    """

    def __init__(self, target: Path, force: bool):
        self.target = target
        self.force = force
        # The pid in the name lets a later run recognise (and remove) what a killed run left behind.
        self.tmp = target.parent / f".{target.name}.mergebench-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _remove_stale(self) -> None:
        """Delete temporary directories for this target left by processes that no longer exist (SIGKILL)."""
        prefix = f".{self.target.name}.mergebench-tmp-"
        if not self.target.parent.is_dir():
            return
        for path in self.target.parent.iterdir():
            if not path.name.startswith(prefix):
                continue
            pid = path.name[len(prefix):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)

    def check(self) -> None:
        if self.target.exists() and not self.force:
            raise OutputError(f"{self.target}: already exists; pass --force to replace it")
        if self.target.exists() and not self.target.is_dir():
            raise OutputError(f"{self.target}: exists and is not a directory")

    def __enter__(self) -> Path:
        self.check()
        self._remove_stale()
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"{self.target}: cannot create the output directory ({exc.strerror or exc})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.mergebench-old-{uuid.uuid4().hex[:8]}"
            os.rename(self.target, old)
        try:
            os.rename(self.tmp, self.target)
        except OSError:
            if old is not None:
                os.rename(old, self.target)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is as readable as any new file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
