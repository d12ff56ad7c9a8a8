"""Execution plans (imaml_kernels/plan.py): every plan computes the same meta-gradient as a
float64 per-task loop; a chunked plan bounds the peak memory (counted from the allocator's own
records, not from wall time or the process's resident size); the plan is decided once and
remembered; a memory budget is respected."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import imaml_kernels as ik
from imaml_kernels import plan as plans

from helpers import peak_bytes, rel_err

DT = torch.float64


class TinyResNet(nn.Module):
    """A residual block with batch-statistics BatchNorm and LeakyReLU, global average pool, head."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)
        self.sc = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.leaky_relu(self.b1(self.c1(x)), 0.1)
        h = F.leaky_relu(self.b2(self.c2(h)) + self.sc(x), 0.1)
        return self.head(F.max_pool2d(h, 2).mean((2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def _models():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT), (1, 3, 4)),
        "resnet": (TinyResNet().to(DT), (3, 4, 4)),
        "transformer": (TinyTransformer().to(DT), (5, 4)),
    }


def _tasks(shape, T=3, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(T, n, *shape, generator=g, dtype=DT), torch.randn(T, n, *shape, generator=g, dtype=DT)
    ys, yq = torch.randint(0, 3, (T, n), generator=g), torch.randint(0, 3, (T, n), generator=g)
    return xs, ys, xq, yq


def _loop(model, theta, tasks, lam, steps, lr, iters):
    """The per-task loop in float64: GD on the proximal objective, then ``iters`` CG iterations
    of ``(I + H/λ) x = ∇φ L_query`` with double-backward HVPs; the tasks' solutions summed."""
    from torch.func import functional_call

    xs, ys, xq, yq = tasks
    names = list(theta)
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(xs.shape[0]):
        p = [theta[k].detach().clone().requires_grad_() for k in names]
        f = lambda ps, x, y: F.cross_entropy(functional_call(model, dict(zip(names, ps)), (x,)), y)  # noqa: E731
        for _ in range(steps):
            g = torch.autograd.grad(f(p, xs[t], ys[t]), p)
            with torch.no_grad():
                for pi, gi, k in zip(p, g, names):
                    pi.sub_(lr * (gi + lam * (pi - theta[k])))
        b = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(f(p, xq[t], yq[t]), p)])
        gs = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(f(p, xs[t], ys[t]), p, create_graph=True)])

        def mv(v):
            return v + torch.cat([h.reshape(-1) for h in torch.autograd.grad(gs, p, v, retain_graph=True)]) / lam

        x, r = torch.zeros_like(b), b.clone()
        d, rr = r.clone(), r @ r
        for _ in range(iters):
            Ad = mv(d)
            a = rr / (d @ Ad)
            x, r = x + a * d, r - a * Ad
            rr, rr_old = r @ r, rr
            d = r + (rr / rr_old) * d
        off = 0
        for k in names:
            n = theta[k].numel()
            total[k] += x[off:off + n].view_as(theta[k])
            off += n
    return total


PLANS = [dict(), dict(chunk=1), dict(chunk=2), dict(chunk=2, hvp_mode="fwdrev"), dict(hvp_mode="revrev"),
         dict(engine=False), dict(engine=False, chunk=1), dict(engine=False, chunk=1, workers=2), dict(engine=False, workers=2)]


@pytest.mark.parametrize("name", ["mlp", "resnet", "transformer"])
def test_every_plan_equals_the_float64_per_task_loop(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, shape = _models()[name]
    tasks = _tasks(shape)
    theta = dict(model.named_parameters())
    with sdpa_kernel([SDPBackend.MATH]):
        want = _loop(model, theta, tasks, 2.0, 3, 0.1, 4)
    for options in PLANS:
        got, info = ik.implicit_meta_grad(model, theta, tasks[:2], tasks[2:], lam=2.0, inner=ik.GD(3, 0.1), cg_iters=4,
                                          **options)
        plan = info["plan"]
        if "chunk" in options:
            assert plan.chunk == options["chunk"]
        if "workers" in options:  # chunks side by side on threads (T = 3: chunks of one task)
            assert (plan.workers, plan.chunk) == (2, 1), plan
        # The ResNet (residual block, functional activations and pools) runs on the engine too.
        assert plan.path == ("engine" if name != "transformer" and options.get("engine") is not False else "generic"), plan
        flat = lambda d: torch.cat([d[k].reshape(-1) for k in theta])  # noqa: E731  (dead biases are ~1e-16 each)
        assert rel_err(flat(got), flat(want)) < 1e-9, (name, options, str(plan))


def test_the_plan_is_decided_once_and_remembered(monkeypatch):
    model, shape = _models()["transformer"]
    theta = dict(model.named_parameters())
    xs, ys, _, _ = _tasks(shape)
    probes = []
    real = plans._probe
    monkeypatch.setattr(plans, "_probe", lambda *a, **k: probes.append(1) or real(*a, **k))
    plans.forget(model)
    first = ik.implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=ik.GD(2, 0.1)).plan
    again = ik.implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=ik.GD(2, 0.1)).plan
    assert again is first and len(probes) == 1
    assert first.probe and [row[0] for row in first.probe] == [1, 2, 3]  # chunk sizes 1, 2, T
    assert "probed" in str(first) and "ms/task" in str(first)
    ik.implicit_adapt(model, theta, (xs[:2], ys[:2]), lam=2.0, inner=ik.GD(2, 0.1))  # other shapes: decided anew
    assert len(probes) == 2
    assert ik.plan_for(model, theta, (xs, ys), lam=2.0, inner=ik.GD(2, 0.1)) is first
    plans.forget(model)
    ik.plan_for(model, theta, (xs, ys), lam=2.0, inner=ik.GD(2, 0.1))
    assert len(probes) == 3
    # Given both the chunk and the HVP mode, nothing is probed.
    p = ik.plan_for(model, theta, (xs, ys), lam=2.0, inner=ik.GD(2, 0.1), chunk=2, hvp_mode="revrev")
    assert (p.chunk, p.hvp, p.probe, len(p.chunks)) == (2, "revrev", (), 2) and len(probes) == 3


def test_a_memory_budget_below_two_tasks_gives_one_task_at_a_time():
    model, shape = _models()["resnet"]
    theta = dict(model.named_parameters())
    xs, ys, _, _ = _tasks(shape, T=4)
    plans.forget(model)
    roomy = ik.plan_for(model, theta, (xs, ys), lam=2.0, inner=ik.GD(2, 0.1), engine=False)
    one = dict((c, b) for c, _, b in roomy.probe)[1]
    tight = ik.plan_for(model, theta, (xs, ys), lam=2.0, inner=ik.GD(2, 0.1), max_memory=one, engine=False)
    assert tight.chunk == 1 and tight.budget == one and roomy.budget > one


def _probe_with(monkeypatch, per_task, held_per_task=0, T=16, budget=2**40):
    """``plans._probe`` over a stand-in measurement: chunk c takes ``per_task(c)`` seconds per
    task and holds ``held_per_task * c`` bytes (P = 1 float32). Returns the chunks run (after
    the warm-up), the chunk chosen and the reason."""
    from types import SimpleNamespace

    runs, again = [], []

    def measure(objective, c, device, repeat=None, modes=None):
        (runs if repeat is None else again).append(c)
        assert modes in (None, ("revrev",))
        return {"revrev": (per_task(c) * c, 0.0, 0.0)}, held_per_task * c

    monkeypatch.setattr(plans, "_probe_chunk", measure)
    objective = SimpleNamespace(batch=(torch.zeros(T, 1),), layout=SimpleNamespace(numel=1), theta_flat=torch.zeros(1))
    chunk, mode, rows, why = plans._probe(objective, ik.GD(1, 0.1), 0, budget, torch.device("cpu"))
    assert [r[0] for r in rows] == runs[1:] and mode == "revrev"
    # the second look: the contenders within the budget, in the first pass's order
    fits = [r for r in rows if r[2] <= budget]
    best = min(r[1] for r in fits)
    assert again == ([r[0] for r in fits if r[1] <= plans.RECHECK * best] if len(fits) > 1 else [])
    return runs[1:], chunk, why


def test_a_burst_during_one_chunks_measurement_does_not_decide_the_plan(monkeypatch):
    """A chunk whose first measurement (its calls back to back) fell in a burst of other load is
    measured again after the other chunks, and its faster time counts: chunk 4, 25% faster a task
    but slowed 1.5x in its first measurement, is chosen; each part keeps its own faster time."""
    from types import SimpleNamespace

    calls = []

    def measure(objective, c, device, repeat=None, modes=None):
        calls.append((c, repeat))
        steady = {1: 1.0, 2: 0.95, 4: 0.75}[c] * c
        burst = 1.5 if (c, repeat) == (4, None) else 1.0  # only chunk 4's first measurement
        # the second look's product is slower than the first's: each part keeps its best
        return {"revrev": (steady * burst, 0.0, 0.5 * c * (2.0 if repeat == 1 else 1.0))}, 0

    monkeypatch.setattr(plans, "_probe_chunk", measure)
    objective = SimpleNamespace(batch=(torch.zeros(4, 1),), layout=SimpleNamespace(numel=1), theta_flat=torch.zeros(1))
    chunk, _, rows, _ = plans._probe(objective, ik.GD(1, 0.1), 1, 2**40, torch.device("cpu"))
    assert calls == [(1, None), (1, None), (2, None), (4, None), (1, 1), (2, 1), (4, 1)]
    assert chunk == 4 and [round(r[1], 6) for r in rows] == [1.5, 1.45, 1.25]


def test_the_probe_stops_doubling_once_batching_stops_paying(monkeypatch):
    """A model where batching does not pay is never probed with all T tasks at once (the
    probe's own memory peak); one where it pays all the way is probed up to T; one slow
    measurement does not stop the probe."""
    runs, chunk, why = _probe_with(monkeypatch, lambda c: 1.0)
    assert (runs, chunk) == ([1, 2, 4], 1) and "stopped after chunk 4" in why
    runs, chunk, _ = _probe_with(monkeypatch, lambda c: 1.0 / c)
    assert (runs, chunk) == ([1, 2, 4, 8, 16], 16)
    runs, chunk, why = _probe_with(monkeypatch, lambda c: 1.0 / min(c, 4), T=64)
    assert (runs, chunk) == ([1, 2, 4, 8, 16], 4) and "stopped after chunk 16" in why
    # Doublings that gain just under 10% each stop the probe; ones that gain more do not.
    runs, _, _ = _probe_with(monkeypatch, lambda c: 1.0 / 1.09 ** (c.bit_length() - 1))
    assert runs == [1, 2, 4]
    runs, _, _ = _probe_with(monkeypatch, lambda c: 1.0 / 1.12 ** (c.bit_length() - 1))
    assert runs == [1, 2, 4, 8, 16]
    # The paper CNN's generic path on a Zen 3: chunk 2's one timed call paid its first-call
    # costs (twice chunk 1's time per task); batching paid from chunk 4 on.
    runs, chunk, _ = _probe_with(monkeypatch, lambda c: {1: 1.0, 2: 2.0}.get(c, 1.0 / c))
    assert (runs, chunk) == ([1, 2, 4, 8, 16], 16)


def test_the_probe_does_not_run_a_chunk_over_the_budget(monkeypatch):
    """Scaled from the last chunk run, a chunk that would hold more than the budget is not run
    at all (before, it ran once and was then refused)."""
    vectors = plans.VECTORS * 4  # bytes of the [c, P] vectors per task at P = 1, float32
    budget = (100 + vectors) * 4
    runs, chunk, why = _probe_with(monkeypatch, lambda c: 1.0 / c, held_per_task=100, budget=budget)
    assert (runs, chunk) == ([1, 2, 4], 4) and "chunk 8 not probed" in why
    runs, chunk, _ = _probe_with(monkeypatch, lambda c: 1.0 / c, held_per_task=100, budget=budget - 1)
    assert (runs, chunk) == ([1, 2], 2)


def test_one_task_at_a_time_bounds_the_peak_memory():
    """A wide MLP (P large beside its activations): with ``chunk=1`` the meta-gradient's peak
    memory, counted from the allocator's records (torch.profiler), stays within 1.25x the
    per-task loop's, and all tasks at once take several times more."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3)).to(DT)
    theta = dict(model.named_parameters())
    T = 8
    g = torch.Generator().manual_seed(2)
    xs, xq = torch.randn(T, 6, 64, generator=g, dtype=DT), torch.randn(T, 6, 64, generator=g, dtype=DT)
    ys, yq = torch.randint(0, 3, (T, 6), generator=g), torch.randint(0, 3, (T, 6), generator=g)
    kw = dict(lam=2.0, inner=ik.GD(3, 0.1), cg_iters=3, engine=False)
    loop = peak_bytes(lambda: _loop(model, theta, (xs, ys, xq, yq), 2.0, 3, 0.1, 3))
    lean = peak_bytes(lambda: ik.implicit_meta_grad(model, theta, (xs, ys), (xq, yq), chunk=1, hvp_mode="revrev", **kw))
    wide = peak_bytes(lambda: ik.implicit_meta_grad(model, theta, (xs, ys), (xq, yq), chunk=T, hvp_mode="revrev", **kw))
    assert lean <= 1.25 * loop, (lean / 2**20, loop / 2**20)
    assert wide >= 3 * lean, (wide / 2**20, lean / 2**20)


def test_the_compiled_path_equals_eager():
    """``compile=True`` (torch.compile of the generic path's gradient and HVP) computes the
    same meta-gradient as eager, and its plan says so."""
    model, shape = _models()["mlp"]
    tasks = _tasks(shape)
    theta = dict(model.named_parameters())
    kw = dict(lam=2.0, inner=ik.GD(3, 0.1), cg_iters=4, engine=False)
    eager, _ = ik.implicit_meta_grad(model, theta, tasks[:2], tasks[2:], **kw)
    compiled, info = ik.implicit_meta_grad(model, theta, tasks[:2], tasks[2:], compile=True, **kw)
    assert info["plan"].compiled and "compiled" in str(info["plan"])
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in theta])  # noqa: E731
    assert rel_err(flat(compiled), flat(eager)) < 1e-10


def test_the_probe_times_forward_over_reverse_only_where_reverse_over_reverse_fails(monkeypatch):
    """Where reverse-over-reverse runs, the probe times no recomputed product (they measured
    slower on every model tried, and torch.func.grad loads torch._dynamo); where it raises (an
    op with no double backward), the plan takes forward-over-reverse."""
    from imaml_kernels.objective import FuncLinearization, FuncObjective

    model, shape = _models()["resnet"]
    theta = dict(model.named_parameters())
    xs, ys, _, _ = _tasks(shape, T=2)
    recomputed = []
    real_hvp = FuncObjective.hvp
    monkeypatch.setattr(FuncObjective, "hvp", lambda self, *a: recomputed.append(a[-1]) or real_hvp(self, *a))
    plans.forget(model)
    p = ik.plan_for(model, theta, (xs, ys), lam=2.0, inner=ik.GD(2, 0.1), engine=False)
    assert p.hvp == "revrev" and p.probe and recomputed == []

    def no_double_backward(self, wrt, v):
        raise RuntimeError("stand-in: an op with no double backward")

    monkeypatch.setattr(FuncLinearization, "_through_graph", no_double_backward)
    plans.forget(model)
    p = ik.plan_for(model, theta, (xs, ys), lam=2.0, inner=ik.GD(2, 0.1), engine=False)
    assert p.hvp == "fwdrev" and p.probe and set(recomputed) == {"fwdrev"}


def _switches():
    b = torch.backends
    return (torch.get_num_threads(), b.mha.get_fastpath_enabled(), b.cuda.flash_sdp_enabled(), b.cuda.math_sdp_enabled(),
            b.cuda.mem_efficient_sdp_enabled())


def test_chunks_side_by_side_equal_the_chunks_in_turn_and_leave_the_process_as_it_was():
    """Chunks on threads (each on its own copy of the model's modules) give the meta-gradient of
    the same chunks in turn (float64, to rounding: at one intra-op thread a reduction may sum in
    another order; the chunks' sum runs in their order); the thread count, attention's backend
    switches and the model's own parameters are as before."""
    model, shape = _models()["transformer"]
    tasks = _tasks(shape, T=4)
    theta = dict(model.named_parameters())
    before, params = _switches(), {k: id(v) for k, v in model.named_parameters()}
    kw = dict(lam=2.0, inner=ik.GD(3, 0.1), cg_iters=4, chunk=1, hvp_mode="revrev")
    turn, info_turn = ik.implicit_meta_grad(model, theta, tasks[:2], tasks[2:], workers=1, **kw)
    side, info_side = ik.implicit_meta_grad(model, theta, tasks[:2], tasks[2:], workers=2, **kw)
    assert (info_turn["plan"].workers, info_side["plan"].workers) == (1, 2)
    assert "2 side by side" in str(info_side["plan"])
    for k in turn:
        assert rel_err(side[k], turn[k]) < 1e-12, k
    assert rel_err(info_side["outer_loss"], info_turn["outer_loss"]) < 1e-13
    assert _switches() == before
    assert {k: id(v) for k, v in model.named_parameters()} == params


def test_workers_run_the_fastest_chunk_side_by_side_and_only_when_asked(monkeypatch):
    """With the probe's measurements stood in for: ``workers=2`` without ``chunk=`` takes the
    fastest chunk side by side (the smallest within 3%); without ``workers=`` (or with random
    draws to arrange) nothing is measured side by side and the chunks run in turn."""
    model, shape = _models()["resnet"]
    tasks = _tasks(shape, T=4)
    theta = dict(model.named_parameters())
    alone = ((1, 1.0, 10), (2, 0.9, 20), (4, 0.8, 40))
    monkeypatch.setattr(plans, "_probe", lambda *a, **k: (4, "revrev", alone, "stand-in"))
    calls = []

    def probe_side(side, T, inner, solve_iters, budget, device, rows, mode):
        calls.append(side[1])
        return ((1, 2, 0.60, 20), (2, 2, 0.59, 40))

    monkeypatch.setattr(plans, "_probe_side", probe_side)
    kw = dict(lam=2.0, inner=ik.GD(1, 0.1), cg_iters=1, engine=False)  # side by side: the generic path's
    try:
        _, info = ik.implicit_meta_grad(model, theta, tasks[:2], tasks[2:], workers=2, **kw)
        assert (info["plan"].chunk, info["plan"].workers) == (1, 2) and calls == [2], info["plan"]
        for extra in (dict(), dict(workers=1), dict(workers=2, randomness="different")):
            plans.forget(model)
            _, info = ik.implicit_meta_grad(model, theta, tasks[:2], tasks[2:], **kw, **extra)
            assert (info["plan"].chunk, info["plan"].workers) == (4, 1), (extra, info["plan"])
        assert calls == [2]
    finally:
        plans.forget(model)


def test_side_by_side_raises_a_jobs_error_after_every_thread_ended():
    def job(w, fail):
        if fail:
            raise KeyError("job failed")
        return torch.get_num_threads()

    prev = torch.get_num_threads()
    assert plans.side_by_side([lambda w: job(w, False)] * 3, 2) == [1, 1, 1]  # one intra-op thread each
    with pytest.raises(KeyError, match="job failed"):
        plans.side_by_side([lambda w: job(w, False), lambda w: job(w, True)], 2)
    assert torch.get_num_threads() == prev


def test_workers_is_checked_and_belongs_to_implicit_meta_grad():
    model, shape = _models()["mlp"]
    xs, ys, _, _ = _tasks(shape)
    theta = dict(model.named_parameters())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be"):
            ik.implicit_meta_grad(model, theta, (xs, ys), (xs, ys), lam=2.0, inner=ik.GD(1, 0.1), workers=bad)
    with pytest.raises(ValueError, match="implicit_meta_grad's"):
        ik.implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=ik.GD(1, 0.1), workers=2)
