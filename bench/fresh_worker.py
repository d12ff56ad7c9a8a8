"""One row of a comparison, in a process of its own: ``python -m bench.fresh_worker --threads N
--out FILE SPEC`` (started by :func:`bench.fresh.run_rows`; SPEC is a :class:`bench.fresh.Row`'s
JSON spec). Writes to FILE a JSON object: ``seconds`` (the median of ``repeat`` calls after
``warmup``, less the baseline's median when the target gives one), ``p20``/``p80``,
``peak_mib`` and ``cuda_peak_mib`` (:class:`bench.common.PeakMemory` over the warm-up and timed
calls), ``info``, ``pid``; or ``error`` (the exception's type and message) and ``pid``.
"""

import argparse
import importlib
import json
import os
import sys
import traceback


def resolve(target):
    """``"package.module:function"`` -> the function."""
    module, _, name = target.partition(":")
    if not name:
        raise ValueError(f"a row's target is 'module:function', got {target!r}")
    return getattr(importlib.import_module(module), name)


def measure(spec):
    """Build the row, time it, watch its memory: the result dict (see the module docstring)."""
    from .common import PeakMemory, time_fn
    from .fresh import Prepared

    prepared = resolve(spec["target"])(**spec.get("kwargs", {}))
    if isinstance(prepared, dict):  # the target measured itself
        return {"custom": prepared}
    if not isinstance(prepared, Prepared):
        prepared = Prepared(prepared)
    device, warmup, repeat = spec.get("device", "cpu"), spec.get("warmup", 1), spec.get("repeat", 3)
    base = time_fn(prepared.baseline, device=device, warmup=warmup, repeat=repeat)[0] if prepared.baseline else 0.0
    with PeakMemory(device) as mem:
        med, p20, p80 = time_fn(prepared.step, device=device, warmup=warmup, repeat=repeat)
    return {"seconds": max(med - base, 1e-9), "p20": p20 - base, "p80": p80 - base, "baseline": base,
            "peak_mib": mem.rss_mib, "cuda_peak_mib": mem.cuda_mib,
            "info": prepared.info() if callable(prepared.info) else prepared.info}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.fresh_worker", description=__doc__)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    parser.add_argument("spec", help="the row's JSON spec")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        result = measure(json.loads(args.spec))
    except Exception as e:  # the row is reported as not measured, with this reason
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")}
    result["pid"] = os.getpid()
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
