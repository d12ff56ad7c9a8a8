"""Counting a meta-step: :func:`count_step` runs one under :class:`LaunchCounter` on fake CUDA
tensors; :func:`measure` counts a list of specs, in this process when it can run a backward
pass on fake ``cuda`` tensors (:func:`cuda_ready`), else in one subprocess that loads the
stand-in CUDA runtime (:mod:`bench.launches.fake_cuda`) before torch is imported."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from ..common import ROOT, child_env
from .counter import LaunchCounter
from .fake_cuda import cuda_ready, fake_cuda_library
from .steps import STEPS, preset_config

SHAPES = ("omniglot-5w1s", "omniglot-20w1s")


def count_step(make_step, *, warmup: int = 1, sites: bool = True) -> dict:
    """Build ``make_step()`` on fake CUDA tensors, run ``warmup`` steps, count the next one.

    Needs a torch on which fake ``cuda`` tensors can go through autograd (a CUDA build, or
    this process started with the stand-in runtime: :func:`cuda_ready`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    with FakeTensorMode():
        step = make_step()
        for _ in range(warmup):
            with LaunchCounter(sites=False):  # answers host reads with dummies; discarded
                step()
        counter = LaunchCounter(sites=sites)
        with counter.triton_hook(), counter.explicit_syncs(), counter:
            step()
    out = counter.result()
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def backends() -> dict:
    """The backends the GPU path dispatches to for CUDA float32: CG kernels and engine stages."""
    from imaml_kernels import dispatch

    k = dispatch.kernels("cuda", torch.float32)
    return {"cg": k.backend, "engine": k.engine_backend}


_MARK = "@@bench.launches@@"
_CHILD = (
    "import ctypes, sys; ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)\n"
    "from bench.launches.counting import _child_main; _child_main()\n"
)


def _child_main():
    specs = json.loads(sys.stdin.read())
    out = [count_spec(s) for s in specs]
    sys.stdout.write(_MARK + json.dumps(out) + "\n")


def _resolve(target):
    import importlib

    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def _linear(r1, r2, T):
    """The count at ``T`` tasks from the counts at 1 and 2 tasks (``a + b T``): exact for the
    per-task baseline, whose loop body is the same for every task."""
    def ext(a, b):
        return a + (T - 1) * (b - a)

    out = dict(r2)
    out["launches"], out["ops"] = ext(r1["launches"], r2["launches"]), ext(r1["ops"], r2["ops"])
    out["sync_count"] = ext(r1["sync_count"], r2["sync_count"])
    keys = dict.fromkeys([*r2["by_op"], *r1["by_op"]])
    out["by_op"] = {k: [ext(*(r.get(k, [0, 0])[j] for r in (r1["by_op"], r2["by_op"]))) for j in (0, 1)] for k in keys}
    out["by_op"] = dict(sorted(out["by_op"].items(), key=lambda kv: -kv[1][1]))
    s1 = {(x["op"], x["detail"], x["site"]): x["count"] for x in r1["syncs"]}
    out["syncs"] = [{**x, "count": ext(s1.get((x["op"], x["detail"], x["site"]), 0), x["count"])} for x in r2["syncs"]]
    out["h2d"] = [[site, ext(0, n)] for site, n in r2["h2d"]] if r2["h2d"] else []
    out["sites"], out["phases"] = {}, {}
    out["seconds"] = round(r1["seconds"] + r2["seconds"], 2)
    out["extrapolated_from"] = [1, 2]
    return out


def count_spec(spec) -> dict:
    """Count one spec (see :func:`measure`) in this process (needs :func:`cuda_ready`)."""
    kind = spec["kind"]
    cfg = preset_config(spec.get("shape", "omniglot-5w1s"), **spec.get("overrides", {}))
    make = _resolve(spec["target"]) if kind == "custom" else STEPS[kind]
    T = cfg["meta_batch"]
    sites = spec.get("sites", kind != "baseline")
    if kind == "baseline" and spec.get("extrapolate", True) and T > 2:
        r1, r2 = (count_step(lambda c=dict(cfg, meta_batch=t): make(c), sites=False) for t in (1, 2))
        res = _linear(r1, r2, T)
    else:
        res = count_step(lambda: make(cfg), warmup=spec.get("warmup", 1), sites=sites)
    res.update(kind=kind, shape=cfg["preset"], backends=backends(),
               config={k: cfg[k] for k in ("way", "shot", "query", "meta_batch", "inner_steps", "inner_lr", "lam",
                                           "cg_iters", "cg_damping", "lam_damping")})
    return res


def measure(specs, timeout: float = 1800) -> list:
    """Count each spec: ``{"kind": "fused" | "baseline" | "custom", "shape": preset name,
    "overrides": {config key: value}, "sites": bool, "extrapolate": bool, "target":
    "module:function"}`` (``custom``: ``function(cfg)`` returns the ``step()`` to count,
    built on fake CUDA tensors). The baseline is counted at 1 and 2 tasks and extrapolated
    (:func:`_linear`) unless ``extrapolate`` is False.

    Runs in this process when :func:`cuda_ready`, else in one subprocess that loads the
    stand-in CUDA runtime first. Returns one :meth:`LaunchCounter.result` dict per spec, plus
    ``kind``, ``shape``, ``config``, ``backends`` and ``seconds``."""
    if cuda_ready():
        return [count_spec(s) for s in specs]
    env = child_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(fake_cuda_library())], input=json.dumps(specs), capture_output=True,
        text=True, cwd=str(ROOT), env=env, timeout=timeout, check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench.launches: the counting subprocess failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len(_MARK):])


def run(shapes=SHAPES, baseline=True, overrides=None):
    """Fused (and baseline) counts for each preset in ``shapes``."""
    specs = []
    for shape in shapes:
        specs.append({"kind": "fused", "shape": shape, "overrides": overrides or {}})
        if baseline:
            specs.append({"kind": "baseline", "shape": shape, "overrides": overrides or {}})
    return measure(specs)
