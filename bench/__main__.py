"""``python -m bench <suite>``: benchmarks with a machine header and printed ratios."""

import argparse

import torch

from . import cg
from .common import machine_header, set_threads


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True)
    p = sub.add_parser("cg", help="one CG iteration's vector work: fused vs eager")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--params", type=int, default=113_221)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cg.main)
    args = parser.parse_args(argv)
    set_threads()
    print(machine_header())
    args.func(args)


if __name__ == "__main__":
    main()
