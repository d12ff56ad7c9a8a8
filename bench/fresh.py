"""Every row of a comparison in its own fresh worker process, pyperf's way.

One process's allocator, thread pools and caches skew what runs after it in the same process
(the authors' learner ran 10-35% slower after the engine), so a suite hands :func:`run_rows`
a list of :class:`Row` and never times two implementations in one process:

- a row names a module-level function, ``"package.module:function"``, and JSON keyword
  arguments. In the worker the function builds the model and data and returns what to time:
  a zero-argument callable, a :class:`Prepared`, or a dict (a measurement the function made
  itself, passed back as is; :mod:`bench.memory` uses it);
- for each round and each row, in turn, :func:`run_rows` starts ``python -m
  bench.fresh_worker`` (:mod:`bench.fresh_worker`) with the environment of
  :func:`bench.common.child_env` and the thread count given explicitly (``--threads`` and
  ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``; the rest is inherited: ``python -m bench`` fixes
  ``OMP_WAIT_POLICY`` for itself and its workers, by default unset, see ``--omp-wait-policy``),
  and reads its JSON result from a file. Nothing else runs meanwhile;
- the order alternates: round r runs the rows as given when r is even, reversed when r is
  odd, so no row always follows the same one;
- the worker times the callable with :func:`bench.common.time_fn` (``warmup`` calls, then
  the median of ``repeat`` calls) and watches its memory over all those calls, the warm-up
  included (:class:`bench.common.PeakMemory`: the growth of the process's peak RSS above its
  RSS just before the first call; on CUDA also of ``torch.cuda.max_memory_allocated``);
- per row: the median over rounds and the min-max; a ratio of two rows is the ratio of their
  medians, with the min-max over rounds of the per-round ratios. A worker that fails (an
  exception, a crash, a time-out) makes its row "not measured: <reason>", never an exception.
"""

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .common import ROOT, child_env


@dataclasses.dataclass(frozen=True)
class Row:
    """One implementation to time: ``target(**kwargs)`` runs in each worker (the kwargs must be
    JSON); ``key`` names it in the results, ``label`` in the tables."""

    key: str
    label: str
    target: str
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    warmup: int = 1
    repeat: int = 3
    device: str = "cpu"

    def spec(self):
        return {"target": self.target, "kwargs": self.kwargs, "warmup": self.warmup, "repeat": self.repeat, "device": self.device}


@dataclasses.dataclass
class Prepared:
    """What a row's target returns: ``step`` is timed; ``baseline`` (optional) is timed too and
    its median subtracted (e.g. a reset the step needs between calls); ``info`` (JSON, or a
    callable returning it, called after the timed calls) is passed back with the result."""

    step: Callable[[], Any]
    baseline: Optional[Callable[[], Any]] = None
    info: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Measured:
    """A row's results: ``rounds`` holds each round's worker result (a dict), in round order."""

    row: Row
    rounds: List[dict] = dataclasses.field(default_factory=list)

    @property
    def error(self):
        """Why the row is not measured (the first failed round's reason, naming the round
        when others did not fail the same way), or ``None``."""
        errors = [res.get("error") for res in self.rounds]
        for r, err in enumerate(errors):
            if err is not None:
                return err if len(set(errors)) == 1 else f"{err} (round {r + 1})"
        return None

    @property
    def ok(self):
        return self.error is None and bool(self.rounds)

    def values(self, field):
        """Each round's ``field``; ``"info.KEY"`` reads the round's ``info`` (``None`` where absent)."""
        if field.startswith("info."):
            return [(res.get("info") or {}).get(field[5:]) for res in self.rounds]
        return [res[field] for res in self.rounds]

    def stat(self, field):
        """``(median, min, max)`` of ``field`` over the rounds (``None`` where not measured)."""
        vals = self.values(field) if self.ok else []
        if not vals or any(v is None for v in vals):
            return None
        return statistics.median(vals), min(vals), max(vals)

    @property
    def seconds(self):
        return self.stat("seconds")[0] if self.ok else None

    @property
    def info(self):
        return self.rounds[0].get("info", {}) if self.ok else {}


def ratio(num: Measured, den: Measured, field="seconds"):
    """``(median ratio, min, max)``: ``num``'s median over ``den``'s, and the min-max over rounds of
    the per-round ratios; ``None`` when either row is not measured."""
    a, b = num.stat(field), den.stat(field)
    if a is None or b is None or b[0] <= 0:
        return None
    per_round = [x / y for x, y in zip(num.values(field), den.values(field)) if y > 0]
    return a[0] / b[0], min(per_round), max(per_round)


def ratio_text(r, rounds):
    """``"2.31x"``, with ``" (2.20-2.45)"`` over more than one round; ``"n/a"`` for ``None``."""
    if r is None:
        return "n/a"
    return f"{r[0]:.2f}x" + (f" ({r[1]:.2f}-{r[2]:.2f})" if rounds > 1 else "")


def stat_text(s, scale=1.0, fmt=".3f", rounds=1):
    """``"0.512"`` or, over more than one round, ``"0.512 (0.498-0.530)"``; ``"-"`` for ``None``."""
    if s is None:
        return "-"
    text = f"{s[0] * scale:{fmt}}"
    return text + (f" ({s[1] * scale:{fmt}}-{s[2] * scale:{fmt}})" if rounds > 1 else "")


def method(rounds, what="seconds per call"):
    """The line a report prints under its heading: how its numbers were taken."""
    return (f"Each row ran in its own fresh process per round ({rounds} round{'s' * (rounds > 1)}, "
            "rows in the given order in even rounds and reversed in odd ones); "
            f"{what}: the worker's median after warm-up, then the median over rounds"
            + (" (min-max in brackets); ratios: of the medians, with the min-max of the per-round ratios." if rounds > 1 else "."))


def memory_field(device):
    """The result field a table's "peak MiB" shows: the GPU's on CUDA, the process's RSS else."""
    return "cuda_peak_mib" if str(device).startswith("cuda") else "peak_mib"


def memory_note(device):
    """What "peak MiB" means, for a report's header."""
    if memory_field(device) == "cuda_peak_mib":
        return ("peak MiB: torch.cuda.max_memory_allocated over the worker's calls (warm-up included, after "
                "reset_peak_memory_stats) minus what was allocated just before them (model, data).")
    return ("peak MiB: how far the worker's calls (warm-up included) raised the process's peak resident memory "
            "(getrusage ru_maxrss, its high-water mark reset just before them) above its resident memory just "
            "before them; imports, model and data are not counted, the first call's one-time allocations are.")


def order(rows, r):
    """Round ``r``'s order: as given when ``r`` is even, reversed when odd."""
    return list(rows) if r % 2 == 0 else list(rows)[::-1]


def run_rows(rows, *, rounds=1, threads=None, timeout=None, log=None) -> Dict[str, Measured]:
    """Run every row once per round, each in a fresh worker process (see the module
    docstring); returns ``{row.key: Measured}`` in the rows' order. ``threads``: the workers'
    thread count (default: this process's ``torch.get_num_threads()``); ``timeout``: seconds
    per worker (``None``: no limit); ``log(message)``: progress."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    if len({r.key for r in rows}) != len(rows):
        raise ValueError(f"row keys must be distinct, got {[r.key for r in rows]}")
    out = {r.key: Measured(r) for r in rows}
    for r in range(rounds):
        for row in order(rows, r):
            res = spawn(row, threads=threads, timeout=timeout)
            out[row.key].rounds.append(res)
            if log:
                got = f"not measured: {res['error']}" if "error" in res else f"{res.get('seconds', 0):.4g} s"
                log(f"round {r + 1}/{rounds}: {row.label}: {got}")
    return out


def spawn(row, *, threads, timeout=None, cpus=None):
    """One worker for ``row``: its JSON result, or ``{"error": reason}`` if it gave none.
    ``cpus``: the CPU numbers the worker is pinned to (``os.sched_setaffinity``; default: not
    pinned)."""
    import os

    env = child_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pin = (lambda: os.sched_setaffinity(0, set(cpus))) if cpus else None
    with tempfile.TemporaryDirectory(prefix="bench-fresh-") as tmp:
        path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.fresh_worker", "--threads", str(threads), "--out", str(path), json.dumps(row.spec())]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                                  preexec_fn=pin)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if path.exists():
            return json.loads(path.read_text())
    tail = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
    return {"error": f"worker exited with {proc.returncode}: {tail[-1] if tail else 'no output'}"}


def probe(name, log=None, fail=None, exit_code=None):
    """A row target that checks the driver itself (tests): appends ``name`` to the file ``log``,
    then raises ``RuntimeError(fail)`` or exits with ``exit_code`` when given; else times a no-op
    (its info: ``name`` and the CPUs the worker may run on)."""
    import os

    if log:
        with open(log, "a") as f:
            f.write(f"{name} {os.getpid()}\n")
    if fail:
        raise RuntimeError(fail)
    if exit_code is not None:
        os._exit(exit_code)
    return Prepared(lambda: None, info={"name": name, "cpus": sorted(os.sched_getaffinity(0))})
