"""``python -m bench <suite>``: benchmarks with a machine header and printed ratios."""

import argparse

import torch

from . import all as all_suite
from . import cg, distributed, hvp, launches, memory, meta_step, models
from . import profile as profile_suite
from . import compile as compile_suite
from .common import machine_header, set_threads


def _add_comparisons(sub, dev):
    """The suites that time implementations against each other (each row in fresh processes)."""
    p = sub.add_parser("cg", help="one CG iteration's vector work: fused vs eager")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--params", type=int, default=113_221)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per row; order alternates across rounds")
    p.add_argument("--device", default=dev)
    p.set_defaults(func=cg.main)
    p = sub.add_parser("meta-step", help="seconds per iMAML meta-step: fused engine vs generic path vs serial baseline (vs torchopt)")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--query", type=int, default=1)
    p.add_argument("--inner-steps", type=int, default=16)
    p.add_argument("--cg-iters", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-serial", action="store_true", help="skip the serial per-task baseline")
    p.add_argument("--no-generic", action="store_true", help="skip the generic torch.func path")
    p.add_argument("--official", metavar="DIR", default=None,
                   help="an unpacked aravindr93/imaml_dev checkout: adds the authors' released learner as a row (nothing of it is in this repo)")
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per method (one per round, the order alternating); ratios get their min-max over rounds")
    p.add_argument("--device", default=dev)
    p.set_defaults(func=meta_step.main)
    p = sub.add_parser("hvp", help="batched HVP: fused engine vs torch.func vmap path vs per-task double backward")
    p.add_argument("--shapes", nargs="*", choices=list(hvp.SHAPES))
    p.add_argument("--tasks", type=int, default=None, help="override T")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per row; order alternates across rounds")
    p.add_argument("--device", default=dev)
    p.set_defaults(func=hvp.main)
    p = sub.add_parser("models", help="one meta-gradient on user models (ResNet-12, MLP, transformer, paper CNN): package plans vs a per-task loop vs torchopt, each row in fresh processes")
    p.add_argument("--models", nargs="*", choices=list(models.cases()), help="default: all")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per row; order alternates across rounds")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per worker, after one warm-up call")
    p.add_argument("--tiny", action="store_true", help="toy widths and sizes (a smoke run)")
    p.add_argument("--no-torchopt", action="store_true", help="skip the torchopt row")
    p.add_argument("--device", default=dev)
    p.add_argument("--out", default=None, help="also write models.md, models.csv and models.png here")
    p.set_defaults(func=models.main)


def _add_others(sub, dev):
    """Profiles, memory, scaling, counts, compile tables and the all-suites run."""
    p = sub.add_parser("profile", help="where one fused CPU meta-step's time goes: kinds of work, stages, GEMM GFLOP/s")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--inner-steps", type=int, default=16)
    p.add_argument("--cg-iters", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the report here (e.g. bench/results/cpu/profile.md)")
    p.set_defaults(func=profile_suite.main)
    p = sub.add_parser("memory", help="peak memory vs inner steps: iMAML vs unrolled MAML")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=list(memory.STEPS))
    p.add_argument("--device", default=dev)
    p.add_argument("--out", default=None)
    p.set_defaults(func=memory.main)
    p = sub.add_parser("distributed", help="meta-steps/s for 1 and 2 processes (CPU, gloo)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--channels", type=int, default=32)
    p.set_defaults(func=distributed.main)
    p = sub.add_parser("launches", help="kernel launches and host syncs per meta-step on the GPU path (fake CUDA tensors, no GPU needed)")
    p.add_argument("--shapes", nargs="*", default=None, help=f"presets (default: {' '.join(launches.SHAPES)})")
    p.add_argument("--tasks", type=int, default=None, help="override T (default: the preset's)")
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--cg-iters", type=int, default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the per-task baseline")
    p.add_argument("--top", type=int, default=15, help="ops in the breakdown")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--json", default=None, help="write the raw counts (JSON) here")
    p.set_defaults(func=launches.main)
    p = sub.add_parser("all", help="every suite: tables, CSV and PNG plots under --out")
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on a 2-core CPU")
    p.add_argument("--device", default=dev)
    p.add_argument("--out", default=None, help="default: bench/results/<machine>/")
    p.set_defaults(func=all_suite.main)
    p = sub.add_parser("compile", help="Triton kernels compiled at the paper's shapes: registers, spills, occupancy (no GPU)")
    p.add_argument("--configs", nargs="*", choices=list(compile_suite.CONFIGS))
    p.add_argument("--dtypes", nargs="*", choices=list(compile_suite.DTYPES))
    p.add_argument("--arch", type=int, nargs="*", choices=[80, 90], help="default: 90 80")
    p.add_argument("--grid", action="store_true", help="add the grid beyond the paper's shapes (T, support size, width, dtype)")
    p.add_argument("--out", default=None, help="also write the table here (e.g. bench/results/compile.md)")
    p.set_defaults(func=compile_suite.main)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _add_comparisons(sub, dev)
    _add_others(sub, dev)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    set_threads()
    print(machine_header())
    args.func(args)

if __name__ == "__main__":
    main()
