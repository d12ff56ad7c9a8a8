"""Meta-steps/s of data-parallel training for 1 and 2 processes (1 thread each) on the CPU,
through ``imaml-train --world-size N`` (see :mod:`imaml_kernels.trainer.distributed`)."""

from imaml_kernels.trainer.distributed import bench
from imaml_kernels.trainer.cli import main as train_main

from .common import markdown_table


def main(args):
    extra = ["--meta-batch", str(args.meta_batch), "--channels", str(args.channels)]
    rates = bench(train_main, tuple(args.worlds), args.steps, extra)
    base = rates[args.worlds[0]]
    rows = [(w, f"{r:.3f}", f"{r / base:.2f}x") for w, r in rates.items()]
    print(f"\n## Data-parallel meta-steps/s: OmniglotConv({args.channels} filters), meta-batch "
          f"{args.meta_batch}, 2 inner steps, 1 thread per process, gloo\n")
    print(markdown_table(("processes", "meta-steps / s", "speed-up"), rows))
    return rows
