"""Execution plans of the implicit op: how its T tasks run (all at once, or chunk by chunk) and
how the generic path takes its Hessian-vector products. A plan is decided once per (model,
loss, shapes, device, dtype, options) and remembered, as ``torch.backends.cudnn.benchmark``
remembers an algorithm.

- The fused engine runs every task at once (``chunk=`` still splits them).
- The generic path, when neither ``chunk=`` nor ``hvp_mode=`` fixes the choice, *probes* on
  its first call: at chunk sizes 1, 2, 4, … T it times one gradient of the task loss, the
  linearisation (the kept gradient graph) and one product (reverse-over-reverse;
  forward-over-reverse where the model has no double backward), and reads the memory the
  linearisation holds, each the better of two calls; then it times the contenders once more,
  in the same order, so that no chunk's calls all fall in one burst of the machine's other
  load, and keeps each part's faster time. The plan takes the fastest chunk per task
  (the smallest within 3% of it: timing noise) among the chunks whose memory fits the budget
  (``max_memory=``, default: a quarter of the available memory on the CPU, half of the free
  memory on a GPU). Batching tasks pays where per-op overhead dominates (small models) and
  costs memory where it does not (large layers): the probe sees which. The probe itself stays
  lean: it does not run a chunk whose memory, scaled from the last one, would exceed the budget,
  and it stops doubling once two doublings in a row gained under 10% per task over the best
  before them, so a model where batching does not pay is not run with all T tasks at once.
- ``workers=N`` (:func:`~imaml_kernels.implicit_meta_grad`, generic path, CPU): chunks run
  *side by side* on N threads, each at one intra-op thread on its own copy of the model's
  modules; without ``chunk=`` the probe measures each chunk side by side (N threads, each a
  chunk of its own tasks) and takes the fastest. On 2 cores small per-task ops scale poorly
  across intra-op threads (the ResNet-12 of ``bench models``: 1.14x from 1 to 2 threads) and
  well across tasks. The plan does not choose it by itself: on the small transformer of ``bench
  models`` its probe found side by side 8% faster a task, and the meta-gradient ran 7% slower
  (threads share the interpreter lock; the probe leaves out per-chunk work such as the solve's
  vectors and the query loss), and in fresh processes its choice for the ResNet-12 went both ways.

Example::

    >>> phi = ik.implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=ik.GD(10, 0.1))
    >>> print(phi.plan)
    generic path: 8 tasks in chunks of 2; HVPs reverse-over-reverse on one kept graph; ...
    >>> ik.implicit_adapt(..., chunk=1)            # the lean plan: one task at a time
    >>> ik.implicit_adapt(..., max_memory=2**30)   # a 1 GiB budget for the probe's choice
"""

import contextlib
import dataclasses
import functools
import os
import threading
import time
import weakref
from typing import Optional, Tuple

import torch

__all__ = ["Plan", "decide"]

TOLERANCE = 1.10  # the probe stops doubling after two doublings that gained less than 10% a task each
CHOICE = 1.03  # the plan: the smallest chunk within 3% of the best time per task (timing noise)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call runs.

    Attributes:
        path: ``"engine"`` (the fused engine) or ``"generic"`` (``torch.func``).
        tasks: T; chunk: tasks adapted and solved together.
        hvp: ``"engine"``, ``"revrev"`` (one kept gradient graph, a backward pass per product)
            or ``"fwdrev"`` (each product recomputed forward-over-reverse).
        compiled: the generic path's gradient and products run through ``torch.compile``.
        budget: the memory bound (bytes) the choice respected, ``None`` when nothing was probed.
        probe: ``((chunk, seconds per task, bytes held), ...)`` measured, empty when not probed.
        why: how the choice was made, in words.
        workers: chunks run side by side on this many threads, one intra-op thread each
            (:func:`~imaml_kernels.implicit_meta_grad` on the generic path, CPU); 1: one after
            the other.
        side_probe: ``((chunk, workers, seconds per task, bytes held), ...)`` measured side by side.
    """

    path: str
    tasks: int
    chunk: int
    hvp: str
    compiled: bool = False
    budget: Optional[int] = None
    probe: Tuple[Tuple[int, float, int], ...] = ()
    why: str = ""
    workers: int = 1
    side_probe: Tuple[Tuple[int, int, float, int], ...] = ()

    @property
    def chunks(self):
        """The task ranges ``(lo, hi)`` in the order they run."""
        return tuple((lo, min(lo + self.chunk, self.tasks)) for lo in range(0, self.tasks, self.chunk))

    def __str__(self):
        hvp = {"engine": "HVPs by the fused engine", "revrev": "HVPs reverse-over-reverse on one kept graph",
               "fwdrev": "HVPs recomputed forward-over-reverse"}[self.hvp]
        split = "all at once" if self.chunk >= self.tasks else f"in chunks of {self.chunk}"
        if self.workers > 1:
            split += f", {self.workers} side by side (a thread each, one intra-op thread)"
        if self.compiled:
            hvp = "HVPs recomputed reverse-over-reverse, gradient and HVP compiled (torch.compile)"
        text = f"{self.path} path: {self.tasks} tasks {split}; {hvp}"
        if self.budget is not None:
            text += f"; memory budget {self.budget / 2**20:.0f} MiB"
        if self.probe:
            text += "; probed " + ", ".join(f"chunk {c}: {1e3 * s:.1f} ms/task, {b / 2**20:.0f} MiB" for c, s, b in self.probe)
        if self.side_probe:
            text += "; side by side " + ", ".join(f"{w} x chunk {c}: {1e3 * s:.1f} ms/task, {b / 2**20:.0f} MiB"
                                                  for c, w, s, b in self.side_probe)
        return text + (f" ({self.why})" if self.why else "")


# {model (weakly): {call key: Plan}}; callables that cannot be weakly referenced go by id.
_PLANS = weakref.WeakKeyDictionary()
_PLANS_BY_ID = {}


def _store(model):
    try:
        return _PLANS.setdefault(model, {})
    except TypeError:
        return _PLANS_BY_ID.setdefault(id(model), {})


def forget(model=None):
    """Drop the remembered plans (of ``model``, or all): the next call decides again."""
    if model is None:
        _PLANS.clear()
        _PLANS_BY_ID.clear()
        return
    _store(model).clear()


def default_budget(device) -> int:
    """A quarter of the available memory on the CPU, half of the free memory on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 4 * 2**30


def _in_use(device) -> Optional[int]:
    """Bytes in use now: the CUDA caching allocator's count, or the process's resident memory."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _release(device):
    """Hand freed memory back (so that the resident memory shows what a buffer held)."""
    if device.type == "cuda":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _timed(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, out


def _inner_products(inner):
    """``(gradients, linearisations, HVPs)`` the inner solver makes per task (its cost model)."""
    steps = int(getattr(inner, "steps", 1))
    if hasattr(inner, "cg_iters"):  # Newton-CG: a linearisation and cg_iters products per step
        return 0, steps, steps * int(inner.cg_iters)
    return steps, 0, 0


def _cost(inner, solve_iters):
    """Seconds per chunk of a whole solve from a probe measurement ``(gradient, linearisation,
    product)``: the inner solver's products (:func:`_inner_products`), then one linearisation
    and ``solve_iters`` products for the implicit solve."""
    grads, lins, prods = _inner_products(inner)
    return lambda t: grads * t[0] + (lins + 1) * t[1] + (prods + solve_iters) * t[2]


def _held(device, alive):
    """Bytes freed since ``alive`` was read (what the objects just dropped held)."""
    _release(device)
    return max(0, (alive or 0) - (_in_use(device) or 0))


def _probe_chunk(objective, c, device, repeat=None, modes=None):
    """One measurement at chunk ``c``: ``{mode: (seconds of a gradient, of the linearisation,
    of one product)}`` and the bytes a linearisation holds, each the fastest of ``repeat``
    calls (default :data:`REPEAT`); ``modes``: the modes to try (default: all). The engine's mode; else
    reverse-over-reverse, and forward-over-reverse only where that does not run (an op with no
    double backward), as the ``"auto"`` mode falls back at run time. Forward-over-reverse
    recomputes the primal forward and backward for every product: on the two models of ``bench
    models`` that take the generic path it measured 1.4-1.6x (ResNet-12) and 2.6-2.8x
    (transformer) slower a product at every chunk (Zen 5), and timing it cost the first call
    about a second and 72 MiB resident (``torch.func.grad`` imports ``torch._dynamo``).
    ``hvp_mode="fwdrev"`` still asks for it."""
    sub = objective.subset(0, c)
    task = sub.task
    phi = sub.theta_flat.detach().expand(c, -1).clone()
    # Each time the better of two calls: a chunk's first call pays its shapes' one-time costs
    # (oneDNN primitives: the ResNet-12's chunk 4 timed 216 ms a task once, 162 in steady state).
    # A gradient as the inner loop takes it: one proximal step, its parameter updates included
    # (per-parameter ops that threads side by side run under one interpreter lock).
    repeat = REPEAT if repeat is None else repeat
    t_grad = min(_timed(device, lambda: sub.descend(sub.layout.unflatten(phi), 1, 0.0))[0] for _ in range(repeat))
    # Its own generator: the global one's state is how a chunk of one task detects random draws
    # (objective.one_task_loss), and chunks probed side by side must not see each other's.
    v = torch.randn(phi.shape, generator=torch.Generator(phi.device).manual_seed(0), dtype=phi.dtype, device=phi.device)
    modes, held = {}, 0
    for mode in modes or (("engine",) if sub.engine is not None else ("revrev", "fwdrev")):
        if mode != "engine":
            task.hvp_mode = mode
        try:
            t_lin = t_hvp = float("inf")
            for _ in range(repeat):
                t, lin = _timed(device, functools.partial(task.linearize, phi))
                w = lin.to_work(v)
                t_lin, t_hvp = min(t_lin, t), min(t_hvp, _timed(device, functools.partial(lin.hvp, w))[0])
                alive = _in_use(device)
                del lin, w
                held = max(held, _held(device, alive))
        except (RuntimeError, NotImplementedError):
            continue
        if mode == "fwdrev":  # nothing is kept: the "linearisation" costs a gradient at most
            t_lin = 0.0
        modes[mode] = (t_grad, t_lin, t_hvp)
        break
    return modes, held


REPEAT = 2  # timed calls per measurement of the probe (the fastest counts)
RECHECK = 2.0  # chunks within this factor of the best time per task are measured a second time

# Besides what a linearisation holds, a chunk keeps about this many [chunk, P] vectors alive
# (φ, its gradient, the solve's right-hand side and CG's four vectors, the product).
VECTORS = 8


def _gained(rows, i):
    """Whether probe row ``i`` was faster per task than every row before it by the tolerance."""
    return min(r[2] for r in rows[:i]) > TOLERANCE * rows[i][2]


def _probe(objective, inner, solve_iters, budget, device):
    """``(chunk, hvp, probe rows, why)`` from measurements at chunks 1, 2, 4, …, T."""
    T = objective.batch[0].shape[0]
    P, size = objective.layout.numel, objective.theta_flat.element_size()
    sizes = sorted({min(T, 2**i) for i in range(T.bit_length() + 1)})
    _probe_chunk(objective, 1, device)  # warm-up: first-call allocations and lazy initialisation
    cost = _cost(inner, solve_iters)
    rows, times, stop = [], {}, ""
    for c in sizes:
        if rows:
            last_c, _, _, last_need = rows[-1]
            if last_need * c / last_c > budget:  # what a chunk holds grows with it: not run at all
                stop = f"; chunk {c} not probed: about {last_need * c / last_c / 2**20:.0f} MiB, over the budget"
                break
            if len(rows) >= 3 and not _gained(rows, -1) and not _gained(rows, -2):
                # Two doublings in a row gained less than the tolerance: batching has stopped
                # paying, and a larger chunk would only hold more memory (the probe's own peak
                # included). One is not enough: a chunk's timed calls can still pay its shape's
                # first-call costs (once timed once, the paper CNN's generic path: chunk 2 slower
                # per task than chunk 1, chunk 32 three times faster).
                stop = f"; stopped after chunk {last_c}: two doublings gained under {round(100 * (TOLERANCE - 1))}%"
                break
        modes, held = _probe_chunk(objective, c, device)
        if not modes:
            raise RuntimeError("no HVP mode runs on this model (no double backward and no forward-mode derivative)")
        costs = {m: cost(t) for m, t in modes.items()}
        mode = min(costs, key=costs.get)
        need = held + VECTORS * c * P * size
        rows.append((c, mode, costs[mode] / c, need))
        times[c] = modes[mode]
        if need > budget:
            break  # larger chunks need more
    rows = _second_look(objective, rows, times, cost, budget, device)
    fits = [r for r in rows if r[3] <= budget] or rows[:1]
    best = min(r[2] for r in fits)
    c, mode, _, _ = next(r for r in fits if r[2] <= CHOICE * best)
    why = f"probed: the fastest chunk per task (the smallest within {round(100 * (CHOICE - 1))}%) that fits the budget"
    return c, mode, tuple((r[0], r[2], r[3]) for r in rows), why + stop


def _second_look(objective, rows, times, cost, budget, device):
    """The probe's rows after a second measurement of each contender (a chunk within the budget
    and within :data:`RECHECK` of the best time per task), in the order of the first, so that a
    chunk's two measurements lie the other chunks' measurements apart: each component (gradient,
    linearisation, product) keeps the faster of its two. A first measurement's calls run back
    to back, and a burst of the machine's other load can slow both: on a 2-core VM one such
    burst made the ResNet-12 of ``bench models`` probe chunk 4 slower than chunk 1 in one of
    three fresh processes (0.74x the per-task loop that round, 1.8x in another)."""
    fits = [r for r in rows if r[3] <= budget]
    if len(fits) < 2:
        return rows
    best = min(r[2] for r in fits)
    out = []
    for c, mode, per_task, need in rows:
        if need <= budget and per_task <= RECHECK * best:
            again = _probe_chunk(objective, c, device, repeat=1, modes=(mode,))[0].get(mode)
            if again is not None:  # each part's faster time (the cost grows with each part)
                per_task = cost(tuple(min(a, b) for a, b in zip(times[c], again))) / c
        out.append((c, mode, per_task, need))
    return out


@contextlib.contextmanager
def one_intraop_thread():
    """Intra-op threads set to 1 for the block (threads started in it inherit that), then back."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def side_by_side(jobs, workers):
    """Run ``jobs`` (callables of a worker index) on ``workers`` threads at one intra-op thread
    each, job ``i`` on thread ``i % workers``; their results in job order. An exception in a
    job is raised here, after every thread has ended."""
    out, errors = [None] * len(jobs), []

    def work(w):
        try:
            for i in range(w, len(jobs), workers):
                out[i] = jobs[i](w)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)

    with one_intraop_thread():
        threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(min(workers, len(jobs)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return out


def _probe_side(side, T, inner, solve_iters, budget, device, rows, mode):
    """Side-by-side rows ``((chunk, workers, seconds per task, bytes), ...)``: for each probed
    chunk that two threads or more can share, ``workers`` threads each
    measure a chunk of their own tasks at one intra-op thread (the slowest thread counts).
    ``side = (make, workers, around)``: ``make(lo, hi)`` a context giving tasks ``lo:hi``'s
    objective on the thread's own copy of the model; ``around()`` the context to hold in the
    calling thread while they run (attention's backend switches are process-wide: a thread's
    exit must not restore what another thread still needs)."""
    make, most, around = side
    cost = _cost(inner, solve_iters)
    out = []
    for c, _, need in rows:
        w = min(most, T // c)
        if w < 2 or w * need > budget:
            continue

        def measure(worker, i, c):
            with make(i * c, (i + 1) * c) as obj:
                return _probe_chunk(obj, c, device)[0]

        with around():  # process-wide switches the threads' objectives set: set here, once
            measured = side_by_side([functools.partial(measure, i=i, c=c) for i in range(w)], w)
        if any(mode not in m for m in measured):
            continue
        slowest = max(cost(m[mode]) for m in measured)
        out.append((c, w, slowest / (w * c), w * need))
    return tuple(out)


# The fused engine probes only when one [T, P] vector is this large: below it every task at
# once is both fastest and small (the paper's networks: 14 MiB at T = 32).
ENGINE_PROBE_BYTES = 32 * 2**20


def _no_probe(x) -> Optional[str]:
    """Why nothing may be timed now (tracing, capturing, data-less tensors), or ``None``."""
    if torch.compiler.is_compiling():
        return "traced"
    from torch._guards import detect_fake_mode

    if detect_fake_mode(x) is not None or x.device.type == "meta":
        return "data-less tensors"
    if x.device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "captured in a CUDA graph"
    return None


def decide(model, objective, inner, opts, solve_iters: int, side=None) -> Plan:
    """The plan of this call (remembered; see the module docstring). ``objective``: the call's
    :class:`~imaml_kernels.ProximalObjective`; ``side``: ``(make, workers, around)`` where chunks may
    run side by side on threads (see :func:`_probe_side`), else ``None``."""
    x = objective.batch[0]
    T = x.shape[0]
    engine = objective.engine is not None
    fixed_chunk = None if opts.chunk is None else max(1, min(int(opts.chunk), T))
    fixed_mode = "engine" if engine else (opts.hvp_mode if opts.hvp_mode != "auto" else None)
    if opts.compile and not engine:
        # Compiling a shape costs tens of seconds: no probe over chunk sizes.
        return Plan("generic", T, fixed_chunk or T, "revrev", compiled=True, why="compiled: no probe")
    reason = _no_probe(x) or ("first order: no solve to plan" if opts.first_order else None)
    if reason is not None:
        return Plan("engine" if engine else "generic", T, fixed_chunk or T, fixed_mode or "revrev", why=f"{reason}; no probe")
    if engine and fixed_chunk is None and T * objective.layout.numel * x.element_size() <= ENGINE_PROBE_BYTES:
        return Plan("engine", T, T, "engine", why="the fused engine batches every task")
    key = (opts.loss, engine, tuple(tuple(b.shape) for b in objective.batch), x.dtype, str(x.device), opts.chunk,
           opts.max_memory, opts.hvp_mode, repr(inner), solve_iters, opts.workers, side is not None, torch.get_num_threads())
    plans = _store(model)
    plan = plans.get(key)
    if plan is None:
        path = "engine" if engine else "generic"
        # workers= given (2 or more) where chunks may run side by side: that many threads.
        forced = side[1] if side is not None and opts.workers is not None else None
        if fixed_chunk is not None and fixed_mode is not None:
            plan = Plan(path, T, fixed_chunk, fixed_mode, why="chunk and HVP mode given",
                        workers=min(forced or 1, -(-T // fixed_chunk)))
        else:
            budget = opts.max_memory if opts.max_memory is not None else default_budget(x.device)
            probed = objective if fixed_chunk is None else objective.subset(0, fixed_chunk)
            chunk, mode, rows, why = _probe(probed, inner, solve_iters, budget, x.device)
            workers, side_rows = 1, ()
            if fixed_chunk is not None:
                chunk, why = fixed_chunk, "chunk given; HVP mode probed"
                workers = min(forced or 1, -(-T // chunk))
            elif side is not None:  # workers= given: the fastest chunk side by side
                side_rows = _probe_side(side, T, inner, solve_iters, budget, x.device, rows, mode)
                if side_rows:
                    best = min(r[2] for r in side_rows)
                    chunk, workers, _, _ = next(r for r in side_rows if r[2] <= CHOICE * best)
                    why += f"; workers={forced} given: the fastest chunk side by side"
            plan = Plan(path, T, chunk, fixed_mode or mode, budget=budget, probe=rows, why=why, workers=workers,
                        side_probe=side_rows)
        plans[key] = plan
    return plan
