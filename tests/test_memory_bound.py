"""Issue 16, point 3: a merge of a model with many tensors stays within (N + 2) x the largest tensor plus
a fixed overhead (README, "Bounded memory"; engine.py's docstring), measured as peak RSS of a fresh
subprocess, above a baseline subprocess that does the same set-up (imports, plugin manager, opening the
inputs' headers) without merging.

The model is built so that the bound is far below the size of the inputs: N = 3 experts plus a base, each
holding 40 layer tensors and one embedding that is the largest tensor. Keeping every input tensor in RAM
(or never releasing the memory-mapped pages of finished tensors) costs the whole 4 x 44 MiB = 176 MiB and
must fail the test; streaming tensor by tensor must pass it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mergebench
from mergebench.core.hashing import sha256_file

from conftest import write_model

MiB = 1 << 20
N_EXPERTS = 3
LAYERS = {f"model.layers.{i:02d}.weight": (512, 1024) for i in range(40)}  # 1 MiB each in bf16
EMBED = {"model.embed_tokens.weight": (2048, 1024)}  # the largest tensor: 8 MiB as float32
SHAPES = {**EMBED, **LAYERS}
LARGEST_F32 = max(h * w for h, w in SHAPES.values()) * 4  # "(N + 2) float32 copies of the largest tensor"
INPUT_BYTES = (N_EXPERTS + 1) * sum(h * w for h, w in SHAPES.values()) * 2  # bf16 on disk: 176 MiB

# The fixed overhead: what a merge holds whatever the tensor sizes, with one worker thread:
#   (N + 1) float32 chunk buffers of 2**18 elements (engine.CHUNK)                     4 MiB
#   the method's per-chunk temporaries (|tau|, masks, nonzero indices, sign, numerator,
#   denominator: at most ~12 chunk-sized float32/int64 tensors)                     ~ 14 MiB
#   TIES' radix-select histograms (N x (2**15 + 2**16) int64) and bincount scratch  ~ 3 MiB
#   torch kernels' code pages first touched by the merge (file-backed RSS)          ~ 8 MiB
#   allocator slack of the worker and writer threads' malloc arenas                 ~ 8 MiB
# about 37 MiB, rounded up to 48 MiB; measured on this project's 2-core machine, the L-independent part
# (the increment of the same merges on float32 tensors of 1 MiB, minus their 5 x 1 MiB) is 16-25 MiB on one
# thread. The sha256 of the inputs (a 16 MiB read buffer) is computed here beforehand, so that it is cached
# and not part of either run. The README states the bound without a thread count, so the two-worker case
# (the default on 2 cores) gets the same bound: its second set of chunk buffers and temporaries and its
# second tensor in flight (a layer here) must fit in the same allowance. Measured increments on this
# machine (means of 4-10 runs): average 34, ties 58, dare_ties 44 MiB on one thread and ties 85 MiB on two
# (70-94: over the bound about one run in seven) while a tensor's mapped inputs stayed resident until it was
# merged; since the chunked reader lets go of them as it reads: 29, 51, 36 and 74 MiB (69-78) releasing every
# MiB by pages, and ties on two 77 MiB (71-81) releasing whole huge pages every 2 MiB (the engine's choice).
FIXED_OVERHEAD = 48 * MiB
BOUND = (N_EXPERTS + 2) * LARGEST_F32 + FIXED_OVERHEAD  # 88 MiB, half of INPUT_BYTES

CHILD = r"""
import json, sys
from pathlib import Path
import torch
import mergebench
from mergebench.core.plugin_manager import make_plugin_manager

mode, method, threads, root, out = sys.argv[1:6]
root = Path(root)
pm = make_plugin_manager(entry_points=False)
inputs = [root / "base"] + sorted(root.glob("e*"))
sources = [pm.resolve_model(str(p), False) for p in inputs]  # the same header reads as the merge's set-up
if mode == "merge":
    params = {"density": 0.2} if method in ("ties", "dare_ties") else {}
    mergebench.merge(method, base=inputs[0], experts=inputs[1:], output=out, plugin_manager=pm,
                     threads=int(threads), **params)
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest, which
# holds the generated tensors) across exec, while VmHWM belongs to this process's own address space.
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"peak_rss": int(hwm[0]) * 1024}))
"""


@pytest.fixture(scope="module")
def many_tensor_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in SHAPES.items()}
    write_model(root / "base", base)
    for t in range(N_EXPERTS):  # other random values of the same distribution, cheaply: shifted columns
        write_model(root / f"e{t}", {n: torch.roll(b, t + 1, dims=1) for n, b in base.items()})
    on_disk = sum(f.stat().st_size for f in root.glob("*/model.safetensors"))
    assert on_disk >= INPUT_BYTES >= 2 * BOUND
    return root, peak_rss("setup", "average", root, root / "unused")


def peak_rss(mode: str, method: str, root: Path, out: Path, threads: int = 1) -> int:
    """Peak RSS in bytes of a fresh interpreter that sets up (and, for mode 'merge', runs) the merge.

    The baseline ('setup') is the same interpreter with the same imports and input headers, minus the merge.
    """
    package_parent = str(Path(mergebench.__file__).resolve().parents[1])  # the mergebench under test
    env = {**os.environ, "MERGEBENCH_LOAD_PLUGINS": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, method, str(threads), str(root), str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"]


# One worker thread for each method; two for TIES (the heaviest), as on this 2-core machine by default: the
# second worker's tensor in flight must also fit in the fixed overhead and the (N + 2) copies.
@pytest.mark.parametrize("method,threads", [("average", 1), ("ties", 1), ("dare_ties", 1), ("ties", 2)])
def test_peak_rss_of_a_merge_stays_within_n_plus_2_largest_tensors(many_tensor_models, tmp_path, method, threads):
    root, baseline = many_tensor_models
    for f in root.glob("*/model.safetensors"):  # cache the inputs' sha256 (in this test's MERGEBENCH_HOME)
        sha256_file(f)
    merged = peak_rss("merge", method, root, tmp_path / "out", threads)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    increment = merged - baseline
    assert increment <= BOUND, (
        f"{method} on {threads} thread(s): peak RSS rose by {increment / MiB:.1f} MiB during the merge, above the bound "
        f"(N + 2) x {LARGEST_F32 / MiB:.0f} MiB + {FIXED_OVERHEAD / MiB:.0f} MiB = {BOUND / MiB:.0f} MiB "
        f"(the inputs total {INPUT_BYTES / MiB:.0f} MiB)")


def _resident_bytes_of(paths: set[str]) -> int:
    """Resident bytes of this process's mappings of ``paths``, exact to the page (/proc/self/smaps)."""
    total, current = 0, None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's header line: "start-end perms ... path"
            current = head[-1] if len(head) >= 6 else None
        elif head[:1] == ["Rss:"] and current in paths:
            total += int(head[1]) * 1024
    return total


@pytest.mark.parametrize("elementwise", [True, False])
def test_a_merge_lets_go_of_the_input_pages_it_has_read(tmp_path, pm, elementwise):
    """The inputs are read through memory maps. An elementwise merge reads them chunk by chunk and the pages of
    the chunks already read leave the process as the merge goes; a whole-tensor method gets float32 copies, and
    the mapped pages leave before its maths runs. So one tensor's inputs are never resident whole beside the
    merge's own memory (an embedding of 128k x 4096 bf16 is 1 GiB per input). Measured from inside the method."""
    from mergebench.core import engine
    from mergebench.core.registry import MergeMethod

    from conftest import method_plugin

    numel = 64 * engine.CHUNK  # one tensor of 64 chunks: 32 MiB per input in bf16
    g = torch.Generator().manual_seed(1)
    inputs = [write_model(tmp_path / name, {"w": torch.randn(numel, generator=g).to(torch.bfloat16)})
              for name in ("base", "e0", "e1")]
    files = {str(p / "model.safetensors") for p in inputs}
    resident: list[int] = []

    def probe(base, experts, params, ctx):
        resident.append(_resident_bytes_of(files))
        return base + sum(e - base for e in experts)

    pm.register(method_plugin(MergeMethod(name="rss_probe", description="records resident input pages",
                                          merge=probe, elementwise=elementwise)))
    mergebench.merge("rss_probe", base=inputs[0], experts=inputs[1:], output=tmp_path / "out", plugin_manager=pm,
                     threads=1)
    assert len(resident) == (64 if elementwise else 1)
    whole = len(inputs) * numel * 2
    # The reader lets go of whole huge pages every engine.RELEASE_BYTES it has read, and the kernel maps a file's
    # page cache a folio at a time (up to a huge page on ext4, kernel 6.x), so a read may map up to two folios
    # beyond the chunk it asked for, per input.
    pmd = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
    folio = int(pmd.read_text()) if pmd.is_file() else 2 * MiB
    allowed = len(inputs) * (engine.CHUNK * 2 + engine.RELEASE_BYTES + 2 * folio)
    if allowed > whole / 2:  # huge pages of 512 MiB (arm64 with 64 KiB pages): a tensor this size cannot tell
        pytest.skip(f"huge pages of {folio / MiB:.0f} MiB")
    assert max(resident) <= allowed, (
        f"{max(resident) / MiB:.1f} MiB of the inputs resident at once, above {allowed / MiB:.1f} MiB "
        f"(the whole tensor's inputs: {whole / MiB:.0f} MiB)")
