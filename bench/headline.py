"""``python -m bench.headline``: the first figures of a GPU window (``bench/gpu_check.sh`` runs
it right after the build): one Omniglot 5-way 1-shot meta-step (T = 32, 16 inner GD steps, 5 CG
iterations, the paper's network), eager and as one CUDA graph, each in its own fresh process
(:mod:`bench.fresh`), with nothing else beside it (no generic path, serial or torchopt row:
those belong to ``python -m bench meta-step``), so that it fits in about a minute with a cold
Triton cache.

Prints the machine, the table and the summary lines ``fused engine: ... s / meta-step`` and
``one CUDA graph: ... ms / meta-step`` (``gpu_check.sh`` reads the target off the second).
Exit status 1 when the eager engine could not be measured.

Example::

    python -m bench.headline                       # on the GPU
    python -m bench.headline --device cpu --tasks 2 --inner-steps 1 --cg-iters 1   # a smoke run
"""

import argparse
import sys

from . import meta_step
from .common import machine_header, markdown_table, set_threads


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.headline", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--inner-steps", type=int, default=16)
    p.add_argument("--cg-iters", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    set_threads()
    print(machine_header())
    table, res = meta_step.run(T=a.tasks, inner_steps=a.inner_steps, cg_iters=a.cg_iters, device=a.device,
                               repeat=a.repeat, serial=False, generic=False, torchopt=False,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"\n## Headline: iMAML meta-step, OmniglotConv(5), T={a.tasks}, 5-way 1-shot, {a.inner_steps} inner "
          f"GD steps, {a.cg_iters} CG iterations, {a.device}\n")
    print(markdown_table(meta_step.HEADER, table))
    print()
    lines = [ln for ln in meta_step.summary(res).splitlines() if ln.startswith(("fused engine", "one CUDA graph"))]
    if "graph" in res.get("failed", {}):
        lines.append(f"one CUDA graph: not measured: {res['failed']['graph']}")
    print("\n".join(lines))
    return 0 if "engine" in res else 1


if __name__ == "__main__":
    sys.exit(main())
