"""``python -m bench.compile``: the table, or with ``--json`` :func:`bench.compile.results` as
JSON (what :func:`bench.compile.run_isolated` runs in a fresh interpreter)."""

import argparse
import json

from . import ARCHS, CONFIGS, DTYPES, main, results
from . import __doc__ as _SUITE_DOC


def _cli(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=_SUITE_DOC.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS))
    parser.add_argument("--dtypes", nargs="*", choices=list(DTYPES))
    parser.add_argument("--arch", type=int, nargs="*", choices=[80, 90])
    parser.add_argument("--grid", action="store_true", help="add the grid of shapes beyond the paper's (960 shapes)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="write results() as JSON here instead of printing the table")
    a = parser.parse_args(argv)
    if a.json:
        data = results(tuple(a.configs or CONFIGS), tuple(a.dtypes or DTYPES), tuple(a.arch or ARCHS), grid=a.grid)
        with open(a.json, "w") as f:
            json.dump(data, f)
    else:
        main(a)


if __name__ == "__main__":
    _cli()
