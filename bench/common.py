"""Shared benchmark plumbing: machine header, timing, tables."""

import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository: bench/ and imaml_kernels/


def child_env(**overrides):
    """The environment for a ``python`` subprocess run from :data:`ROOT` that imports this
    checkout's ``bench`` and ``imaml_kernels`` first: ``ROOT`` ahead of ``$PYTHONPATH``."""
    env = dict(os.environ, **overrides)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def machine_header():
    """One line naming the machine and the library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"CPU: {cpu} ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name()}")
        parts.append(f"CUDA {torch.version.cuda}")
    parts.append(f"torch {torch.__version__}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton -")
    parts.append(time.strftime("%Y-%m-%d"))
    return " | ".join(parts)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, *, device="cpu", warmup=3, repeat=20, min_time=0.0):
    """Median and (p20, p80) of ``fn()`` in seconds, after warm-up.

    On CUDA, device events bracket each call; on the CPU ``time.perf_counter``.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def markdown_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def set_threads(n=None):
    n = n or int(os.environ.get("IMAML_BENCH_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def gemm_rate(device="cpu", n=1024, dtype=torch.float32, repeat=10):
    """The machine's measured dense GEMM rate (GFLOP/s): median of ``n×n @ n×n`` products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = time_fn(lambda: a @ b, device=device, warmup=2, repeat=repeat)[0]
    return 2 * n**3 / sec / 1e9
