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


# How OpenMP's idle threads wait between parallel regions (``OMP_WAIT_POLICY``). It moves the
# ratios: code of many small ops (a per-task loop, the authors' learner) pays a thread wake-up per
# op when the threads sleep. On a Zen 5 (2 threads, 2026-12-07) PASSIVE made the authors' learner
# 2.6x slower (5.50 against 2.11 s) and the fused engine 1.3x (0.74 against 0.56 s). ``python -m
# bench`` runs under the runtime's default unless ``--omp-wait-policy`` says otherwise.
WAIT_POLICIES = {"default": None, "passive": "PASSIVE", "active": "ACTIVE"}


def wait_policy_env(policy, env=None):
    """``env`` (default: this process's) with ``OMP_WAIT_POLICY`` as ``policy`` (a key of
    :data:`WAIT_POLICIES`; ``"default"``: unset, the OpenMP runtime's own behaviour)."""
    env = dict(os.environ if env is None else env)
    value = WAIT_POLICIES[policy]
    if value is None:
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = value
    return env


def wait_policy_text():
    """How this process's OpenMP threads wait, as the header states it."""
    value = os.environ.get("OMP_WAIT_POLICY")
    return f"OMP_WAIT_POLICY={value}" if value else "OMP_WAIT_POLICY unset (the OpenMP runtime's default)"


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones the CPU GEMMs' speed turns on


def cpu_model_and_flags():
    """``(model name, {flag: present})`` from ``/proc/cpuinfo`` (what ``lscpu`` reads), for
    :data:`CPU_FLAGS`; the platform's processor name and no flags where it is unreadable."""
    cpu, flags = None, {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu is None:
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = {k: k in value.split() for k in CPU_FLAGS}
                if cpu is not None and flags:
                    break
    except OSError:
        pass
    return cpu or platform.processor() or platform.machine(), flags


def machine_header():
    """One line naming the machine (CPU model, threads, the CPU flags of :data:`CPU_FLAGS`), the
    library versions and the date."""
    cpu, flags = cpu_model_and_flags()
    have = " ".join(k for k, v in flags.items() if v) or "none of " + "/".join(CPU_FLAGS)
    lack = " ".join(k for k, v in flags.items() if not v)
    parts = [f"CPU: {cpu} ({torch.get_num_threads()} threads; {have}{f'; no {lack}' if lack else ''}; {wait_policy_text()})"]
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


def rss_bytes():
    """The process's resident memory now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """``with PeakMemory(device) as m: calls()`` then ``m.rss_mib`` (and ``m.cuda_mib`` on CUDA).

    ``rss_mib``: the process's peak resident memory at the end of the block
    (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its resident memory at the start
    (``/proc/self/statm``), in MiB: how far the block raised the high-water mark above where
    the process stood. The high-water mark is reset on entry (``/proc/self/clear_refs``,
    Linux >= 4.0), so a transient peak before the block does not count; where the reset is
    refused, such a peak can only make the number larger. ``cuda_mib``:
    ``torch.cuda.max_memory_allocated()`` over the block (after ``reset_peak_memory_stats``)
    minus what was allocated at its start; ``None`` off CUDA.
    """

    def __init__(self, device="cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.rss_mib = self.cuda_mib = None

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
        except OSError:
            pass
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda0 = torch.cuda.memory_allocated()
        self._rss0 = rss_bytes()
        return self

    def __exit__(self, *exc):
        import resource

        if self.cuda:
            torch.cuda.synchronize()
            self.cuda_mib = max(torch.cuda.max_memory_allocated() - self._cuda0, 0) / 2**20
        self.rss_mib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._rss0, 0) / 2**20
        return False


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


def write_csv(path, header, rows):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


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
