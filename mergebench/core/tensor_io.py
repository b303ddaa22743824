"""Reading model weights: metadata first, tensors lazily, one at a time, from memory maps.

Everything a safetensors header can tell (names, dtypes, shapes, byte ranges against the file size)
is checked when a source is opened, so a truncated or corrupt file fails in milliseconds, not after
minutes of merging. Tensors are then read zero-copy from a private memory map.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from mergebench.core.errors import InputError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from metadata alone."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset in ``file`` (safetensors only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading any tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise InputError(
                    f"{path}: corrupt or truncated safetensors file (header claims {header_len} bytes, file has {size})"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" \x00"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: corrupt safetensors header ({exc})") from None
    data_start = 8 + header_len
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: corrupt safetensors entry for tensor '{name}': {entry!r}") from None
        info = TensorInfo(name, dtype, shape, path, data_start + begin)
        if any(d < 0 for d in shape) or end - begin != info.nbytes or begin < 0:
            raise InputError(
                f"{path}: corrupt safetensors entry for tensor '{name}': {end - begin} bytes for shape "
                f"{list(shape)} of {entry['dtype']}"
            )
        if end > data_len:
            raise InputError(
                f"{path}: truncated safetensors file: tensor '{name}' needs bytes up to {data_start + end}, "
                f"the file has {size}"
            )
        infos[name] = info
    return infos


HUGE_PAGE = 2 << 20  # the largest folio the kernel maps a file's page cache with on x86-64 (a PMD)


class ModelSource:
    """One input model: its tensors' metadata, its config, and lazy zero-copy tensor reads."""

    def __init__(self, reference: str, root: Path | None, tensors: dict[str, TensorInfo], files: list[Path]):
        self.reference = reference
        self.root = root  # the directory holding config/tokenizer files, or None for a bare weights file
        self.tensors = tensors
        self.files = files
        self._maps: dict[Path, mmap.mmap] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reference!r})"

    @property
    def config(self) -> dict | None:
        if self.root is None or not (self.root / "config.json").is_file():
            return None
        try:
            return json.loads((self.root / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.root / 'config.json'}: unreadable config ({exc})") from None

    def ordered_names(self) -> list[str]:
        """Tensor names in storage order (file, then offset) for sequential reads."""
        order = {f: i for i, f in enumerate(self.files)}
        return sorted(self.tensors, key=lambda n: (order[self.tensors[n].file], self.tensors[n].offset, n))

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as fh:
                # ACCESS_COPY: a private mapping, so tensors are writable views and the file is never modified.
                self._maps[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[path]

    def load(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, backed by the memory map (no copy when aligned)."""
        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        buf = self._map(info.file)
        if info.offset % info.dtype.itemsize == 0:
            flat = torch.frombuffer(buf, dtype=info.dtype, count=info.numel, offset=info.offset)
        else:  # unaligned data (allowed by the format): copy the bytes out first
            flat = torch.frombuffer(buf, dtype=torch.uint8, count=info.nbytes, offset=info.offset).clone()
            flat = flat.view(info.dtype)
        return flat.view(info.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes (no memory is allocated)."""
        info = self.tensors[name]
        if hasattr(os, "posix_fadvise") and info.nbytes:
            try:
                fd = os.open(info.file, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except OSError:
                pass

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop a tensor's pages from this process's memory map (they stay in the page cache): all of them, or,
        so that a chunked reader can let go of what it has read, those of bytes [start, stop) of the tensor in
        whole blocks of HUGE_PAGE bytes of the file (a block that ``stop`` cuts stays, and goes with the next
        call, whose ``start`` is this ``stop``). Dropping part of a huge page that the kernel mapped whole
        splits its mapping, which measured costlier than the pages themselves.

        Keeps resident memory flat while streaming through models larger than RAM. Safe because
        mapped pages are only ever read: a later access simply faults them in again (pages of a neighbouring
        tensor in the same block included).
        """
        info = self.tensors[name]
        m = self._maps.get(info.file)
        if m is None or not info.nbytes or not hasattr(m, "madvise"):
            return
        page = mmap.PAGESIZE
        # from the block a previous partial release stopped at (its cut block included), or the tensor's first page
        begin = (info.offset + start) // HUGE_PAGE * HUGE_PAGE if start else info.offset // page * page
        if stop is None or stop >= info.nbytes:  # to the end of the tensor, its last partial page included
            end = min(len(m), -(-(info.offset + info.nbytes) // page) * page)
        else:
            end = (info.offset + stop) // HUGE_PAGE * HUGE_PAGE
        if end <= begin:
            return
        try:
            m.madvise(mmap.MADV_DONTNEED, begin, end - begin)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it; the map is released with that tensor
                pass
        self._maps.clear()


class PickleSource(ModelSource):
    """A pickled PyTorch checkpoint, loaded with ``torch.load(weights_only=True)`` (only with --allow-pickle)."""

    def __init__(self, reference: str, root: Path | None, files: list[Path]):
        tensors: dict[str, TensorInfo] = {}
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        for f in files:
            for name, t in self._state_dict(f).items():
                tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), f)
        super().__init__(reference, root, tensors, files)

    def _state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._loaded:
            try:
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - torch raises many kinds for bad pickles
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InputError(f"{path}: cannot load checkpoint with weights_only=True ({first})") from None
            for key in ("state_dict", "model", "module"):
                if isinstance(obj, dict) and set(obj) == {key} and isinstance(obj[key], dict):
                    obj = obj[key]
            if not isinstance(obj, dict):
                raise InputError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict of tensors")
            self._loaded[path] = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        return self._loaded[path]

    def load(self, name: str) -> torch.Tensor:
        return self._state_dict(self.tensors[name].file)[name]

    def prefetch(self, name: str) -> None:
        pass

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        pass


def _weights_in_directory(directory: Path) -> tuple[list[Path], bool]:
    """The weight files of a model directory and whether they are pickles."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return _files_from_index(index), False
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"], False
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        return safetensors, False
    pickled_index = directory / "pytorch_model.bin.index.json"
    if pickled_index.is_file():
        return _files_from_index(pickled_index), True
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        return pickles, True
    raise InputError(f"{directory}: no model weights found (expected model.safetensors or a sharded index)")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{index}: corrupt shard index ({exc})") from None
    paths = [index.parent / f for f in files]
    for p in paths:
        if not p.is_file():
            raise InputError(f"{index}: lists shard '{p.name}', which does not exist")
    return paths


def open_local(reference: str, path: Path, allow_pickle: bool) -> ModelSource:
    """Open a local model directory or weights file, validating all metadata."""
    if path.is_dir():
        files, pickled = _weights_in_directory(path)
        root: Path | None = path
    elif path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise InputError(f"{path}: not a weights file (expected .safetensors, or a model directory)")
        files, pickled, root = [path], path.suffix in PICKLE_SUFFIXES, None
    else:
        raise InputError(f"{reference}: no such file or directory")
    if pickled:
        if not allow_pickle:
            raise InputError(
                f"{files[0]}: pickled PyTorch checkpoint refused: unpickling can run arbitrary code. Convert it "
                f"to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
            )
        return PickleSource(reference, root, files)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name in tensors:
                raise InputError(f"{reference}: tensor '{name}' appears in both {tensors[name].file.name} and {f.name}")
            tensors[name] = info
    index = path / "model.safetensors.index.json" if path.is_dir() else None
    if index is not None and index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].file.name != shard:
                raise InputError(f"{index}: says tensor '{name}' is in {shard}, but that shard does not hold it")
    if not tensors:
        raise InputError(f"{reference}: the weights files hold no tensors")
    return ModelSource(reference, root, tensors, files)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def open_hub_cached(reference: str, allow_pickle: bool) -> ModelSource | None:
    """Resolve ``org/name[@revision]`` through the local Hugging Face cache only (never the network)."""
    if not _HUB_ID.match(reference) or "/" not in reference:
        return None
    repo_id, _, revision = reference.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    try:
        local = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        raise InputError(
            f"{reference}: no such local path, and the hub model '{repo_id}' is not in the local Hugging Face "
            f"cache ({HF_HUB_CACHE}); download it first (`hf download {repo_id}`) where there is internet"
        ) from None
    return open_local(reference, Path(local), allow_pickle)


def iter_config_files(root: Path) -> Iterator[Path]:
    """Non-weight files of a model directory worth copying into a merge (config, tokenizer, ...)."""
    skip = {"README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json", "mergebench.json"}
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix not in WEIGHT_SUFFIXES and p.name not in skip:
            yield p
