"""``python -m bench.compile.sweep``: registers and spills of the BatchNorm stages over tile sizes,
compiled for sm_90a and sm_80 (no GPU), the sweep that chose the tile constants of
:mod:`imaml_kernels.triton.batchnorm` (``BN_*_TILE_BYTES``).

Each stage variant (forward, backward, tangent forward, tangent backward; the backwards also
gathering their cotangent from a stride-1 or stride-2 3x3 convolution's patches) is compiled
at every channel block its plan can choose (16-byte rows up to ``BN_MAX_BLOCK_C``), with the
channel count a multiple of 16 and not (the alignment Triton specialises on), in all three
phases (one launch; row-split partials; their combine), for each tile size given. A line per
(variant, dtype, tile): the most registers and spill bytes over the rest, and which
configuration set them.

Example::

    python -m bench.compile.sweep --variants bwd-gather-s2 --tiles 4096 2048 1024
"""

from __future__ import annotations

import argparse
import contextlib
import itertools

import torch

from .compiling import ARCHS, compile_spec, prefetch, sm
from .recording import record
from .specialisation import specialise

VARIANTS = ("fwd", "tfwd", "bwd", "tbwd", "bwd-gather-s1", "bwd-gather-s2", "tbwd-gather-s1", "tbwd-gather-s2")


@contextlib.contextmanager
def _forced_plan(block_r, block_c, ns):
    from imaml_kernels.triton import batchnorm

    real = batchnorm.plan
    batchnorm.plan = lambda T, R, C, elsize, tile_bytes=None: (block_r, block_c, -(-C // block_c), -(-R // ns), ns)
    try:
        yield
    finally:
        batchnorm.plan = real


def _launch(variant, dtype, C, wrap):
    """One call of ``variant``'s launcher on meta tensors (T = 1, 16 x 16 images of 4)."""
    from imaml_kernels.triton import batchnorm as bn

    m = dict(device="meta", dtype=dtype)
    N, H, W = 4, 16, 16
    x, p = torch.empty(1, N * H * W, C, **m), torch.empty(1, C, **m)
    f, c = (lambda: torch.empty_like(x)), (lambda: torch.empty_like(p))
    stride = 2 if variant.endswith("s2") else 1
    Ho = (H + 2 - 3) // stride + 1
    cols = torch.empty(1, N, Ho, Ho, 3, 3, C, **m)
    if variant == "fwd":
        bn.bn_fwd(x, p, c(), 1e-5, True, f(), f(), c(), wrap=wrap)
    elif variant == "tfwd":
        bn.bn_tfwd(x, f(), p, c(), c(), c(), f(), f(), f(), c(), wrap=wrap)
    elif variant == "bwd":
        bn.bn_bwd(x, f(), p, c(), f(), c(), c(), f(), wrap=wrap)
    elif variant == "tbwd":
        bn.bn_tbwd(x, f(), f(), f(), p, c(), c(), c(), f(), c(), c(), f(), wrap=wrap)
    elif variant.startswith("bwd-gather"):
        bn.col2im_bn_bwd(cols, H, W, stride, 1, 1, x, p, c(), f(), c(), c(), f(), wrap=wrap)
    else:
        bn.col2im_bn_tbwd(x, cols, H, W, stride, 1, 1, f(), f(), p, c(), c(), c(), f(), c(), c(), f(), wrap=wrap)


def specs(variant, dtype, tile_bytes, max_block_c=64):
    """``{(block_c, C, phase): Spec}`` of ``variant`` at tiles of ``tile_bytes``."""
    elsize = torch.empty((), dtype=dtype).element_size()
    out = {}
    block_cs = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if 16 // elsize <= b <= max_block_c]
    for block_c, C, ns in itertools.product(block_cs, (64, 100), (1, 4)):
        with _forced_plan(max(1, tile_bytes // elsize // block_c), block_c, ns):
            for launch in record(lambda wrap: _launch(variant, dtype, C, wrap)):
                out[(block_c, C, launch.kwargs["PHASE"])] = specialise(launch)
    return out


def sweep(variants=VARIANTS, dtypes=("fp32", "fp64"), tiles=(8192, 4096, 2048, 1024), archs=ARCHS):
    """Rows ``(variant, dtype, tile bytes, most registers, most spill bytes, worst configuration)``."""
    dts = {"fp32": torch.float32, "fp64": torch.float64}
    found = {(v, d, t): specs(v, dts[d], t) for v in variants for d in dtypes for t in tiles}
    prefetch(list(dict.fromkeys(s for sp in found.values() for s in sp.values())), archs)
    rows = []
    for (v, d, t), sp in found.items():
        res = [(compile_spec(s, a), key, a) for key, s in sp.items() for a in archs]
        worst = max(res, key=lambda r: (r[0].spills, r[0].regs))
        (bc, C, ph), a = worst[1], worst[2]
        rows.append((v, d, t, max(r[0].regs for r in res), worst[0].spills,
                     f"BLOCK_C={bc} C={C} PHASE={ph} {sm(a)}" + (f" error: {worst[0].error}" if worst[0].error else "")))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compile.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--dtypes", nargs="*", choices=["fp32", "fp64"], default=["fp32", "fp64"])
    p.add_argument("--tiles", nargs="*", type=int, default=[8192, 4096, 2048, 1024], help="tile bytes")
    a = p.parse_args(argv)
    print("| variant | dtype | tile (B) | max regs | max spills (B) | worst at |\n|---|---|---|---|---|---|")
    for row in sweep(a.variants, a.dtypes, a.tiles):
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
