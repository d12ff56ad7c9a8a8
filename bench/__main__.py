"""``python -m bench <suite>``: benchmarks with a machine header and printed ratios."""

import argparse
import os
import sys

import torch

from . import all as all_suite
from . import cg, distributed, hvp, lam_study, launches, memory, meta_step, models, precision, spikes, trajectory
from . import profile as profile_suite
from . import compile as compile_suite
from .common import WAIT_POLICIES, machine_header, set_threads, wait_policy_env


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
    p.add_argument("--bf16", action="store_true", help="add the engine with bf16 GEMMs (gemm_precision='bf16') as a row; "
                   "skipped with a message where the device has no bf16 units")
    p.add_argument("--compiled", action="store_true", help="add the engine's meta-step under torch.compile(fullgraph=True) "
                   "as a row (its first call, the compilation, is the worker's warm-up)")
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


def _add_training(sub):
    """Whole training runs: the released code's trajectory beside the trainer's, and the spike probe."""
    p = sub.add_parser("trajectory", help="a training run of the authors' released code beside this package's trainer step: "
                       "same tasks, same θ₀, per-step query loss/accuracy, meta-test checkpoints, one fresh process per row")
    p.add_argument("--official", metavar="DIR", default=None,
                   help="an unpacked aravindr93/imaml_dev checkout (imported at run time; nothing of it is in this repo)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=250, help="meta-test evaluation every K meta-steps (step 0 and the last too)")
    p.add_argument("--eval-tasks", type=int, default=600, help="meta-test tasks per evaluation (0: none)")
    p.add_argument("--preset", default="omniglot-5w1s-released", help="the preset both codes run")
    p.add_argument("--also", metavar="PRESET", default=None, help="add this package's run of another preset (e.g. omniglot-5w1s)")
    p.add_argument("--twin", action="store_true", help="add this package's run from θ₀ moved by one float32 rounding (the noise floor)")
    p.add_argument("--seed", type=int, default=0, help="seed of θ₀ and of the task stream")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="configuration overrides for every row, e.g. meta_batch=8")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each worker (default 1)")
    p.add_argument("--lanes", type=int, default=1,
                   help="run the rows in this many concurrent lanes, each pinned to --threads CPUs of its own: the "
                        "official row alone in one, the others in turn in the rest (default 1: one after the other)")
    p.add_argument("--state", metavar="DIR", default=None,
                   help="save each row's state there (every 50 steps and where it stops) and go on from it when present: "
                        "a long run in parts")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop every row after this meta-step (with --state: the next run goes on from there)")
    p.add_argument("--window", type=int, default=None, help="meta-steps per row of the curve table (default: steps/10, at most 50)")
    p.add_argument("--out", default="bench/results/trajectory")
    p.set_defaults(func=trajectory.main)
    p = sub.add_parser("spikes", help="train with the trainer's step and measure per step what could make a run spike: "
                       "inner-loop rises, Hessian sharpness at φ, BatchNorm batch statistics, meta-gradient and Adam update norms")
    p.add_argument("--preset", default="omniglot-5w1s-demo")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="configuration overrides, e.g. outer_schedule=constant warmup_steps=0")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--probe-every", type=int, default=10, help="probe every N meta-steps (0: never)")
    p.add_argument("--probe-tasks", type=int, default=4, help="tasks of the meta-batch the probe looks at")
    p.add_argument("--power-iters", type=int, default=10, help="power iterations for the Hessian's largest eigenvalue")
    p.add_argument("--window", type=int, default=50, help="meta-steps per row of the table")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="names the files (default: the preset)")
    p.add_argument("--compare", nargs="+", metavar="NAME", help="no training: the runs steps_<NAME>.jsonl under --out side by side")
    p.add_argument("--out", default="bench/results/spikes")
    p.set_defaults(func=spikes.main)
    p = sub.add_parser("lam-study", help="fixed vs meta-learned λ (scalar, per layer) at the CPU demo's budget: "
                       "three demo runs, each in its own process, evaluated at the λ each learned")
    p.add_argument("--runs", default="runs/lam-study", help="run folders go here (<runs>/fixed, scalar, per-layer)")
    p.add_argument("--out", default="bench/results/lam")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tabulate-only", action="store_true", help="read the run folders, train nothing")
    p.add_argument("extra", nargs="*", help="more trainer flags after --, for every run (e.g. -- --steps 50)")
    p.set_defaults(func=lam_study.main)
    p = sub.add_parser("precision", help="the meta-gradient under bf16 GEMMs against float32 and float64, on real Omniglot tasks")
    p.add_argument("--preset", default="omniglot-5w1s")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="a run folder or checkpoint: its θ instead of the preset's θ₀")
    p.set_defaults(func=precision.main)


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
    parser.add_argument("--omp-wait-policy", choices=list(WAIT_POLICIES), default="default",
                        help="OMP_WAIT_POLICY of the bench and its workers (default: unset, the OpenMP runtime's own; "
                             "PASSIVE slows code of many small ops, the per-task baselines above all)")
    sub = parser.add_subparsers(dest="suite", required=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _add_comparisons(sub, dev)
    _add_training(sub)
    _add_others(sub, dev)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    env = wait_policy_env(args.omp_wait_policy)
    if argv is None and env.get("OMP_WAIT_POLICY") != os.environ.get("OMP_WAIT_POLICY"):
        # OpenMP reads the policy when it starts: run again under the asked one (workers inherit it).
        os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]], env)
    set_threads()
    print(machine_header())
    args.func(args)


if __name__ == "__main__":
    main()
