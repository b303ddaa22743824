"""The arithmetic floor of RegMean's statistics pass, as a multiple of one plain forward pass.

    python benchmarks/gram_floor.py                                  # the 0.1B benchmark model, Llama-3.2-3B, -3.1-8B
    python benchmarks/gram_floor.py path/to/config.json ...          # any Llama-style config (hidden/intermediate sizes)

Per token, a plain forward pass of a Llama-style model multiplies and adds, in its linear layers, 2 d^2 + 2 d kv
(q, o; k, v) + 3 d f (gate, up, down) per layer, and d V in the output head. The statistics pass
(``core/calibration.py``) skips the head's logits but adds, per layer, the Gram matrix X^T X of each distinct input
a linear layer reads (q/k/v share one, gate/up share one): three of d x d and one of f x f, plus the head's input
(d x d) where the head is not tied. A Gram is symmetric, so at best half of each product is needed (n (n + 1) / 2
entries); ``calibration._add_lower_gram_`` computes the lower triangle by blocks of ``GRAM_BLOCK`` columns, a little
more than half. Attention's score products (a few % at these lengths) and the elementwise work are left out of both.

The ratio printed is (forward without the head + Gram products) / (forward with the head): the least the statistics
pass can cost relative to one forward pass when both run at the same speed per multiply-add, as they do on a CPU
(both are float32 matrix products near the BLAS peak). It depends on the shapes only, not on the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergebench.core.calibration import GRAM_BLOCK  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_width: int  # key/value heads x head dimension
    tied: bool = False

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        d = config["hidden_size"]
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or d // heads
        return cls(d, config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"],
                   config.get("num_key_value_heads", heads) * head_dim, bool(config.get("tie_word_embeddings", False)))


# public configs (hidden, intermediate, layers, vocabulary, 8 key/value heads of 128)
PRESETS = {
    "Llama-3.2-3B": Shape(3072, 8192, 28, 128256, 1024, tied=True),
    "Llama-3.1-8B": Shape(4096, 14336, 32, 128256, 1024),
}


def blocked(n: int, block: int = GRAM_BLOCK) -> int:
    """Entries of an n x n Gram that ``_add_lower_gram_`` computes: columns [s, s + b) against [0, s + b)."""
    return sum((min(s + block, n) - s) * min(s + block, n) for s in range(0, n, block))


def floor(shape: Shape) -> dict:
    d, f = shape.hidden, shape.intermediate
    body = shape.layers * (2 * d * d + 2 * d * shape.kv_width + 3 * d * f)
    head = d * shape.vocab
    widths = [d, d, d, f] * shape.layers + ([] if shape.tied else [d])  # a tied head gets no Gram
    gram_blocks = sum(blocked(n) for n in widths)
    gram_half = sum(n * (n + 1) // 2 for n in widths)
    return {"forward": body + head, "head_share": head / (body + head), "gram_blocks": gram_blocks,
            "gram_half": gram_half, "floor_blocks": (body + gram_blocks) / (body + head),
            "floor_half": (body + gram_half) / (body + head)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="config.json files (default: the 0.1B benchmark model and presets)")
    args = parser.parse_args(argv)
    shapes = {}
    paths = args.configs or [str(Path(__file__).resolve().parent / ".work" / "models" / "0.1B" / "base" /
                                 "config.json")]
    for p in paths:
        if Path(p).is_file():
            shapes[p] = Shape.from_config(json.loads(Path(p).read_text()))
        else:
            print(f"{p}: not found (the 0.1B model is built by benchmarks/merge_speed.py)", file=sys.stderr)
    if not args.configs:
        shapes.update(PRESETS)
    print("| model | forward MACs/token | head share | Gram MACs/token (blocks of %d; exact half) | floor: pass / "
          "forward (blocks; exact half) |" % GRAM_BLOCK)
    print("|---|---|---|---|---|")
    for name, shape in shapes.items():
        r = floor(shape)
        print(f"| {name} | {r['forward'] / 1e6:,.1f}M | {r['head_share']:.0%} | {r['gram_blocks'] / 1e6:,.1f}M; "
              f"{r['gram_half'] / 1e6:,.1f}M | {r['floor_blocks']:.3f}; {r['floor_half']:.3f} |")


if __name__ == "__main__":
    main()
