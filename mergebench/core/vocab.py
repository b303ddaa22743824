"""Merging models whose vocabularies differ: embedding and output-head rows aligned by token.

``tokenizer_source`` (recipe key, ``--tokenizer-source``, mergekit's key of the same name) chooses the
output vocabulary: ``base`` (the base's tokenizer, else the first expert's), ``union`` (the base's
tokens, then every other model's tokens it lacks, in model order, as mergekit builds it) or the path of
one input model. Every input's vocabulary tensors (names with ``embed``, ``lm_head``, ``wte``,
``word_embeddings`` or ``embed_out`` whose first dimension is the model's ``vocab_size``) are permuted
into the output vocabulary by token string before the merge method sees them; rows beyond a model's
tokenizer (padding rows) are dropped. A token some inputs of a tensor lack gets, in those inputs,
mergekit 0.1.5's default row (``mergekit/tokenizer/embed.py``): the row of the one input that has it;
else the base's row when the base has it; else the mean of the inputs that have it; zeros when none
has it. Tokens every input has keep each input's own row. The output gets the chosen tokenizer's files
and ``vocab_size``; tied embeddings need nothing more (there is no separate head tensor).

Everything here reads tokenizer files and tensor metadata only; the permutations are built before any
tensor is read, and a vocabulary mismatch without a ``tokenizer_source`` is one error naming both sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergebench.core.errors import InputError, ParameterError

_VOCAB_NAMES = ("embed", "lm_head", "wte", "word_embeddings", "embed_out")
SETTINGS = ("base", "union")


def vocab_size(source) -> int | None:
    config = source.config or {}
    size = config.get("vocab_size")
    if size is None and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("vocab_size")
    return int(size) if size is not None else None


def is_vocab_tensor(name: str, shape: tuple[int, ...], size: int | None) -> bool:
    """A tensor indexed by token along its first dimension."""
    return size is not None and len(shape) >= 1 and shape[0] == size and any(k in name for k in _VOCAB_NAMES)


def _tokenizer(source, what: str):
    from transformers import AutoTokenizer

    if source.root is None:
        raise InputError(f"{what} ({source.reference}) is a bare weights file: aligning vocabularies needs its tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(source.root), use_fast=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a missing or broken tokenizer
        raise InputError(f"{what} ({source.reference}): cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def _usable_vocab(tokenizer, size: int | None) -> dict[str, int]:
    """Token -> row, without tokens whose id is beyond the model's embedding rows."""
    vocab = tokenizer.get_vocab()
    return {t: i for t, i in vocab.items() if size is None or i < size}


@dataclass
class VocabAlignment:
    """The output vocabulary and, per input source, the source row of every output token (-1: absent)."""

    setting: str
    size: int
    rows: list[torch.Tensor]
    tokenizer: Any  # the output tokenizer (transformers), saved beside the merged weights
    base_source: int | None  # which source is the base, for the default-row rule

    def align(self, sources: list[int], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` (one per source in ``sources``) permuted into the output vocabulary, float32."""
        present = torch.stack([self.rows[s] >= 0 for s in sources])  # [inputs, size]
        count = present.sum(0)
        aligned = []
        for s, x in zip(sources, tensors):
            index = self.rows[s].clamp(min=0)
            aligned.append(x.to(torch.float32).index_select(0, index))
        incomplete = count < len(sources)
        if not bool(incomplete.any()):
            return aligned
        # default rows, mergekit's rule: mean over the inputs that have the token (a single holder's own row,
        # zeros when none), the base's row instead when the base has it and at least two inputs do
        default = torch.zeros_like(aligned[0])
        for k, x in enumerate(aligned):
            default[present[k]] += x[present[k]]
        shape = (-1,) + (1,) * (default.dim() - 1)
        default /= count.clamp(min=1).to(torch.float32).view(shape)
        if self.base_source in sources:
            k = sources.index(self.base_source)
            use_base = present[k] & (count >= 2)
            default[use_base] = aligned[k][use_base]
        for k, x in enumerate(aligned):
            missing = ~present[k]
            x[missing] = default[missing]
        return aligned


def build(setting: str, sources: list, has_base: bool, references: dict[str, int]) -> VocabAlignment:
    """The alignment for ``setting`` (``base``, ``union`` or an input's path in ``references``)."""
    if setting not in SETTINGS and setting not in references:
        raise ParameterError(f"tokenizer_source '{setting}' is neither 'base', 'union' nor one of the input models")
    names = ["the base" if has_base and i == 0 else f"expert {i + 1 - has_base}" for i in range(len(sources))]
    sizes = [vocab_size(s) for s in sources]
    tokenizers = [_tokenizer(s, n) for s, n in zip(sources, names)]
    vocabs = [_usable_vocab(t, n) for t, n in zip(tokenizers, sizes)]
    if setting == "base":
        out = tokenizers[0]
    elif setting == "union":
        out = _union(tokenizers[0], vocabs)
    else:
        out = tokenizers[references[setting]]
    out_vocab = out.get_vocab()
    size = max(out_vocab.values()) + 1
    rows = []
    for vocab in vocabs:
        index = torch.full((size,), -1, dtype=torch.long)
        for token, i in out_vocab.items():
            j = vocab.get(token)
            if j is not None:
                index[i] = j
        rows.append(index)
    return VocabAlignment(setting, size, rows, out, 0 if has_base else None)


def _union(first, vocabs: list[dict[str, int]]):
    """The first model's tokenizer plus every other model's tokens it lacks, in model order."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # a copy, so the loaded tokenizer is not changed
        first.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    have = set(out.get_vocab())
    extra = []
    for vocab in vocabs[1:]:
        for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            if token not in have:
                have.add(token)
                extra.append(token)
    if extra:
        out.add_tokens(extra)
    return out


def mismatch_error(name: str, size_a: int, role_a: str, size_b: int, role_b: str) -> InputError:
    return InputError(
        f"vocabularies differ: tensor '{name}' has {size_b} rows in {role_b} but {size_a} in {role_a}; set "
        f"tokenizer_source (recipe or mergekit config) or --tokenizer-source to base, union or one model's path "
        f"to align them by token"
    )


def write_tokenizer(alignment: VocabAlignment, directory: Path) -> None:
    alignment.tokenizer.save_pretrained(str(directory))
