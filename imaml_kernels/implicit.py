"""The drop-in implicit-gradient op: ``implicit_adapt`` and ``implicit_meta_grad``.

For T tasks with meta-parameters θ (shared) and λ > 0:

- inner: ``φ_t ≈ argmin L̂_t(φ) + (λ_t/2)‖φ − θ‖²`` by any inner solver, without a graph;
- backward: ``∂/∂θ = Σ_t x_t`` with ``((1+c) I + H_t/(λ_t+d)) x_t = g_t``, ``g_t = ∂outer/∂φ_t``
  and ``H_t = ∇²L̂_t(φ_t)``, by a pluggable linear solve (:class:`~imaml_kernels.CG`:
  c = d = 0 is the paper's ``(I + H_t/λ_t)⁻¹ g_t``, c = 1, d = 10 the authors' released code);
- parameters of the model that are meta-learned but not adapted (ψ, e.g. ANIL's body)
  receive the cross term ``−(∂²L̂_t/∂ψ∂φ) x_t/(λ_t+d)`` besides their direct gradient.

Memory does not grow with the number of inner steps: nothing is unrolled. Argument checks
and the options live in :mod:`~imaml_kernels.arguments`, φ's type in :mod:`~imaml_kernels.adapted`.
"""

import contextlib
import copy
import dataclasses
import functools
import itertools
from typing import Any, Callable, Dict, Union

import torch
import torch.nn.functional as F
from torch.func import vmap

from . import arguments as args
from . import lam as lam_mod
from . import parallel
from . import plan as plans
from .adapted import AdaptedParams, Diagnostics
from .cg import CG, CGInfo
from .engine import functional_logits, select_engine
from .inner import GD, SGDThenPullBack
from .lam import Lam, PerCoordinate
from .layout import ParamLayout
from .objective import (ProximalObjective, batch_stats_only, differentiable_attention, lam_like, one_task_loss,
                        randomness_checked,
                        task_loss_fn)

__all__ = ["implicit_adapt", "implicit_meta_grad", "plan_for"]


def _rows_finite(t):
    """``isfinite(t).all(1)`` in two passes: ``0·t`` is 0 where ``t`` is finite and NaN where
    it is not, and a sum of zeros is exactly 0 (``isfinite`` makes four passes, then ``all``)."""
    return t.mul(0).sum(1) == 0


@dataclasses.dataclass(frozen=True)
class _Saved:
    """What the backward needs. ``chunks``: the task ranges solved one after the other (the
    plan's); ``lin`` holds the linearisation made with the inner loss, on a GPU when the engine
    runs one chunk (the backward takes it; on the CPU the backward makes it, so that its
    activations are never alive beside the query loss's); ``lam``: λ resolved
    (:class:`~imaml_kernels.lam.Lam`: its sources get gradients)."""

    objective: ProximalObjective
    phi: list  # [φ as a dict]: the forward takes it out and saves it with save_for_backward
    opts: args.Options
    inner_loss: torch.Tensor
    diag: Diagnostics
    model: Any
    psi: Dict[str, torch.Tensor]
    theta_dtypes: Dict[str, torch.dtype]
    chunks: tuple
    lin: list
    lam: Lam
    group: Any = None  # a DDP model's process group: the gradients are averaged across it


def _damping(solve):
    return float(getattr(solve, "damping", 0.0)), float(getattr(solve, "lam_damping", 0.0))


def _matvec(lin, solve, scale, inner):
    """The operator handed to the solve, one pass beyond the HVP: ``v + H v / λ'`` (``scale``
    ``λ'``, uniform per task), or per coordinate ``v + s ⊙ H (s ⊙ v)`` (``inner`` ``s``). For
    CG, buffers reused by every call (it consumes a result before it asks for the next one; any
    other solve may keep results; fresh ones under compile too): on the CPU one, the product
    and then the result in it (one ``[T, P]`` less); elsewhere two, so that the engine's
    product keeps the zeros it does not write and re-zeroes nothing (launches)."""
    hv = res = None
    reuse = isinstance(solve, CG) and not torch.compiler.is_compiling()

    def matvec(v):
        nonlocal hv, res
        hv = lin.hvp(v * inner if inner is not None else v, out=hv if reuse else None)
        into = (hv if v.device.type == "cpu" else res) if reuse else None
        if inner is not None:
            res = torch.addcmul(v, hv, inner, out=into)
        elif isinstance(scale, float):
            res = torch.add(v, hv, alpha=1.0 / scale, out=into)
        else:
            res = torch.addcdiv(v, hv, scale, out=into)
        return res

    return matvec


def _solve(lin, solve, g, lam):
    """``y = (H + Λ')⁻¹ g`` and θ's rows ``x = (Λ + d) y``, ``Λ' = (1+c)(Λ + d)`` (the damped
    system ``((1+c) I + H/(λ+d)) x = g``; c, d: the solve's damping), handed to the solve in the
    linearisation's work order -> ``(x, y, info)``.

    λ uniform per task: ``(I + H/λ') x = g/(1+c)``, the same solution with a one-pass matvec
    (CG is elementwise in the coordinates). λ per coordinate: the symmetric
    ``(I + s H s) z = s g`` with ``s = Λ'^(-1/2)``, ``y = s z``."""
    c, d = _damping(solve)
    if g.dtype not in (torch.float32, torch.float64):
        # A bfloat16/float16 model: its HVPs run in its dtype, the solve and its reductions in
        # float32 (the linearisation casts a product's input down and its result up).
        g = g.float()
    lam_d = lam_like(lam, g) + d
    lam_p = lam_d * (1.0 + c) if c else lam_d
    if isinstance(lam, PerCoordinate):
        s = lam_p.rsqrt()
        s_work = lin.to_work(s.expand_as(g))
        out = solve(_matvec(lin, solve, None, s_work), lin.to_work(g * s))
    else:
        b = lin.to_work(g / (1.0 + c) if c else g)  # this backward's own buffer (g is, too)
        matvec = _matvec(lin, solve, lam_p, None)
        out = solve(matvec, b, overwrite_b=True) if isinstance(solve, CG) else solve(matvec, b)
        del b  # CG's residual, when it took it
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor) and out[0].shape == g.shape):
        raise TypeError(f"solve(matvec, b) must return (x, info) with x of shape {list(g.shape)}")
    z = lin.from_work(out[0].to(g.dtype))
    if isinstance(lam, PerCoordinate):
        y = z * s
        return y * lam_d, y, out[1]
    return z, None, out[1]


def _chunk_backward(s, obj, phi, g, inner_loss, eager):
    """One chunk of tasks: ``(x, info, dropped, cross, lam_sensitivity)`` for the flat
    gradient ``g [c, P]``; the last: ``dL/dλ`` per task ``[c]`` or per coordinate ``[P]``
    summed over the chunk's tasks (``None`` when λ needs no gradient)."""
    keep = _rows_finite(g)
    g.masked_fill_(~keep[:, None], 0.0)  # g is this backward's own buffer
    x, y, info, cross, sens = g, None, None, {}, None
    if not s.opts.first_order:
        with batch_stats_only(s.model):
            lin = (s.lin.pop() if eager and s.lin else None) or obj.linearize(phi)
            release = getattr(lin, "release_grad", None)
            if release is not None and not (s.psi or s.lam.sources):
                release()  # the support gradient: no use in the solve (8 MB on the ResNet-12 at T = 4)
            x, y, info = _solve(lin, s.opts.solve, g, obj.lam)
        # A breakdown (I + H/λ indefinite for a non-convex task) keeps CG's last good
        # iterate, a usable partial solve; it is reported in info["cg"].breakdown.
        keep = keep & _rows_finite(x)
    bad = ~keep | ~torch.isfinite(inner_loss)
    x = x.masked_fill_(bad[:, None], 0.0)  # x: g, or the solve's own result
    if not s.opts.first_order and (s.psi or s.lam.sources):
        # (H + Λ')⁻¹ g: y, or x/(λ+d) where λ is uniform per task.
        y = y.masked_fill_(bad[:, None], 0.0) if y is not None else x / (lam_like(obj.lam, x) + _damping(s.opts.solve)[1])
        if s.psi:  # dφ*/dψ = −(H + Λ')⁻¹ ∂²L̂/∂φ∂ψ
            with batch_stats_only(s.model):
                cross = lin.cross_vjp(y)
        if s.lam.sources:  # dL/dλ_g = −Σ_{i ∈ g} y_i (φ − θ)_i
            prod = y * (phi - obj.theta_flat.to(phi.dtype))
            sens = -(prod.sum(1) if s.lam.kind == "task" else prod.sum(0))
    return x, info, bad, cross, sens


def _joined(infos):
    """The chunks' solve infos as one: a :class:`CGInfo` of ``[T]`` fields, else the list."""
    if len(infos) == 1 or all(i is None for i in infos):
        return infos[0]
    if all(isinstance(i, CGInfo) for i in infos):
        return CGInfo(*(torch.cat(f) for f in zip(*infos)))
    return infos


class _ImplicitGrad(torch.autograd.Function):
    """Outputs φ (a copy); its backward solves for θ's and ψ's gradients, like jaxopt's
    ``root_vjp``, chunk by chunk of tasks as the plan says. It mutates nothing outside ``ctx``
    while tracing, so ``torch.compile`` can take it."""

    @staticmethod
    def forward(ctx, saved, *leaves):
        # φ itself, no copy of [T, P]: saved as the op's outputs (no reference cycle through
        # ctx, and autograd refuses a backward after φ was modified in place).
        phi = saved.phi.pop()
        ctx.saved, ctx.names = saved, list(phi)
        ctx.save_for_backward(*phi.values())
        return tuple(phi.values())

    @staticmethod
    def backward(ctx, *grads):
        s = ctx.saved
        obj, eager = s.objective, not torch.compiler.is_compiling()
        phi = dict(zip(ctx.names, ctx.saved_tensors))
        grads = {k: (gr if gr is not None else torch.zeros_like(phi[k])) for k, gr in zip(phi, grads)}
        phi = obj.layout.as_flat(phi)
        total, cross, infos, bad, sens = None, {}, [], [], []
        for lo, hi in s.chunks:
            sub = obj if len(s.chunks) == 1 else obj.subset(lo, hi)
            g = obj.layout.flatten({k: gr[lo:hi] for k, gr in grads.items()})
            x, info, dropped, cr, sn = _chunk_backward(s, sub, phi[lo:hi], g, s.inner_loss[lo:hi], eager)
            part = x.sum(0, keepdim=True)  # one reduction over the chunk's tasks
            total = part if total is None else total.add_(part)
            cross = cr if not cross else {k: cross[k] + cr[k] for k in cross}
            infos.append(info)
            bad.append(dropped)
            sens.append(sn)
        if eager:
            s.diag.info = {"cg": _joined(infos), "dropped": torch.cat(bad)}
        total = obj.layout.unflatten(total)
        out = [total[k][0].to(s.theta_dtypes[k]) for k in ctx.names]
        if s.psi:
            out += [None] * len(s.psi) if s.opts.first_order else [-cross[k].to(p.dtype) for k, p in s.psi.items()]
        if s.lam.sources:
            if s.opts.first_order:
                out += [None] * len(s.lam.sources)
            elif s.lam.kind == "task":
                out += s.lam.grads(torch.cat(sens), None)
            else:
                out += s.lam.grads(None, functools.reduce(torch.add, sens))
        if s.group is not None:  # as DDP's reducer: the mean over the ranks
            out = parallel.all_reduce_mean(out, s.group)
        return (None, *out)


def _lam(lam, theta, T, device):
    """λ resolved (:func:`imaml_kernels.lam.resolve`) against θ's layout and dtype."""
    layout = ParamLayout.from_params(theta, batched=False)
    dtype = next(iter(theta.values())).dtype
    return lam_mod.resolve(lam, T, device, layout, dtype if dtype in (torch.float32, torch.float64) else torch.float32,
                           args.host_checks_allowed())


def _objective(model, theta, support, lam, opts, psi):
    """The call's :class:`ProximalObjective` (on the fused engine where it runs); ``lam``: its
    one form (a float, a ``[T]`` tensor or per coordinate)."""
    x, y = support
    net = None if psi else select_engine(model, theta, x, opts.loss, opts.engine, opts.backend)
    if psi and opts.engine is True:
        raise ValueError(f"engine=True but the fused engine adapts every parameter; these are not in theta: {list(psi)}")
    if net is None:  # the engine checks its labels itself (once per support set)
        args.check_labels(model, theta, x, y, opts.loss)
    return ProximalObjective(task_loss_fn(model, opts.loss), theta, lam, (x, y),
                             engine=net, hvp_mode=opts.hvp_mode, key=(model, opts.loss), psi={k: p.detach() for k, p in psi.items()},
                             compiled=opts.compile and net is None, randomness=opts.randomness,
                             lean=opts.chunk is not None)  # a chunk given: memory bounded


def _planned(model, objective, inner, opts, side=None):
    """The plan (:mod:`imaml_kernels.plan`), its HVP mode set on a generic objective."""
    plan = plans.decide(model, objective, inner, opts, int(getattr(opts.solve, "iters", 5)), side)
    if plan.path == "generic":
        objective.task.hvp_mode = plan.hvp
    return plan


def _adapt(model, theta, support, lam, inner, opts, psi):
    """The inner solve, chunk by chunk of tasks as the plan says: ``(objective, phi, inner_loss,
    plan, lin, meta, report)`` (``lin``: the backward's linearisation, made now on a GPU when
    the engine runs one chunk and no ``chunk=`` was given: its loss is the inner loss, so the
    support set's forward pass runs once, not twice; on the CPU not kept beside the query pass;
    ``report``: what the inner solver left in ``objective.report``);
    ``lam``: resolved (:class:`~imaml_kernels.lam.Lam`)."""
    T = support[0].shape[0]
    meta = torch.is_grad_enabled() and (any(v.requires_grad for v in theta.values()) or bool(psi) or bool(lam.sources))
    with batch_stats_only(model):
        objective = _objective(model, theta, support, lam.value, opts, psi)
        plan = _planned(model, objective, inner, opts)
        with torch.no_grad():
            if len(plan.chunks) == 1:
                phi = _inner_solve(objective, theta, inner, T)
                report = getattr(objective, "report", None)
                if (meta and objective.engine is not None and not opts.first_order and opts.chunk is None
                        and support[0].device.type != "cpu"):
                    lin = objective.linearize(objective.layout.as_flat(phi))
                    return objective, phi, lin.loss, plan, [lin], meta, report
                return objective, phi, objective.task_value(phi), plan, [], meta, report
            flat = torch.empty(T, objective.layout.numel, dtype=objective.theta_flat.dtype, device=support[0].device)
            losses, reports = [], []
            for lo, hi in plan.chunks:
                sub = objective.subset(lo, hi)
                part = _inner_solve(sub, theta, inner, hi - lo)
                flat[lo:hi] = objective.layout.flatten(part)
                losses.append(sub.task_value(part))
                reports.append(getattr(sub, "report", None))
            return objective, objective.layout.unflatten(flat), torch.cat(losses), plan, [], meta, _reports(reports)


def plan_for(model, theta, support, *, lam, inner, **options) -> plans.Plan:
    """The :class:`~imaml_kernels.plan.Plan` :func:`implicit_adapt` runs for these arguments,
    decided now if it is new (the generic path's probe runs once) and remembered.

    Example::

        >>> print(ik.plan_for(model, theta, (xs, ys), lam=2.0, inner=ik.GD(10, 0.1)))
    """
    opts = args.Options.make(**options)
    args.check_theta(theta)
    args.check_support(support)
    psi = args.check_model_params(model, theta)
    lam = _lam(lam, theta, support[0].shape[0], support[0].device)
    with batch_stats_only(model), torch.no_grad():
        return _planned(model, _objective(model, theta, support, lam.value, opts, psi), inner, opts)


def shallow_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules sharing its parameters and buffers: a thread's own module
    for ``functional_call``, which swaps a module's attributes while it runs."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _side(model, theta, support, lam, opts, psi, objective):
    """Where :func:`implicit_meta_grad`'s chunks run side by side on threads: ``(make, workers,
    around)`` for :func:`imaml_kernels.plan.decide` (``make(lo, hi)``: tasks ``lo:hi``'s
    objective on a thread's own copy of the model), else ``None``: ``workers=`` 2 or more, the
    generic path on the CPU, an ``nn.Module``, no random draws to arrange, nothing compiled."""
    T = support[0].shape[0]
    most = opts.workers or 1
    if (objective.engine is not None or support[0].device.type != "cpu" or most < 2 or T < 2
            or opts.randomness != "error" or opts.compile or not isinstance(model, torch.nn.Module)
            or torch.compiler.is_compiling()):
        return None

    @contextlib.contextmanager
    def make(lo, hi):
        m = shallow_copy(model)
        with batch_stats_only(m), torch.no_grad():
            yield _objective(m, theta, support, lam.value, opts, psi).subset(lo, hi)

    return make, most, differentiable_attention


def _reports(parts):
    """The chunks' inner-solver reports as one (``None`` when the solver reported nothing)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _inner_solve(objective, theta, inner, T):
    if len({v.dtype for v in theta.values()}) == 1:
        # θ for every task, as views of one [T, P] buffer: GD and the released procedure never
        # write it (their fused loops copy it once), so they get θ expanded, with no copy;
        # any other solver a copy (one launch, not one per tensor).
        start = objective.theta_flat.detach().expand(T, -1)
        phi0 = objective.layout.unflatten(start if isinstance(inner, (GD, SGDThenPullBack)) else start.clone())
    else:
        phi0 = {k: v.detach().unsqueeze(0).expand(T, *v.shape).clone() for k, v in theta.items()}
    phi = inner(objective, phi0)
    args.check_phi(phi, theta, T)
    return {k: phi[k].detach() for k in theta}


def implicit_adapt(model: Union[torch.nn.Module, Callable], theta: Dict[str, torch.Tensor], support, *, lam, inner: Callable,
                   **options) -> AdaptedParams:
    """Adapt θ to T tasks with the proximal inner problem; the result carries implicit gradients.

    Args:
        model: an ``nn.Module`` (called through ``torch.func.functional_call`` with its
            buffers; BatchNorm in batch-statistics or eval mode) or ``f(params, x) -> out``.
        theta: dict of meta-parameters, unbatched, named as in ``model.named_parameters()``
            (any subset: the adapted ones). θ that needs no gradient (``requires_grad=False``,
            or a call under ``torch.no_grad()``) only runs the inner solve.
        support: ``(x [T, N, ...], y [T, N, ...])``.
        lam: λ > 0: a number, a ``[T]`` tensor or a list of T numbers.
        inner: a solver instance: ``GD(steps, lr)``, ``SGD``, ``Adam``, ``NewtonCG`` or any
            ``solver(objective, phi0) -> phi``.

    Options (keywords; :class:`~imaml_kernels.arguments.Options`):
        solve: the linear solve of the backward: :class:`~imaml_kernels.CG` (default
            ``CG(iters=5)``; ``CG(damping=1.0, lam_damping=10.0)`` is the authors' damped
            system) or any ``solve(matvec, b) -> (x, info)``. The system
            ``((1+c) I + H/(λ+d)) x = g`` (c, d: the solve's ``damping``/``lam_damping``
            attributes, 0 when it has none) is handed over divided by ``1+c``: ``matvec``
            applies ``I + H/((1+c)(λ+d))`` to ``[T, P]`` and ``b = g/(1+c)``; same solution.
        cg_iters, cg_tol: shorthands for ``solve=CG(cg_iters, cg_tol)``; 0 iterations
            need ``first_order=True``.
        first_order: skip the solve (the gradient at φ passes straight to θ).
        loss: ``loss(out, y) -> scalar`` of one task; default cross-entropy.
        chunk: tasks adapted and solved together (the rest wait their turn): a memory bound;
            ``None``: all at once. ``implicit_meta_grad`` runs the query loss chunk by chunk too.
        workers: :func:`implicit_meta_grad` only, generic path on the CPU: chunks run side by
            side on this many threads, one intra-op thread each (``torch.set_num_threads(1)``
            for the call; each thread on its own copy of the model's modules, sharing their
            tensors); ``chunk=`` given, or probed side by side. ``None`` or 1: in turn. On 2 cores
            the ResNet-12 of ``bench models`` ran 2 chunks of one task side by side in 0.55-0.58 s
            against 0.65 s for its 4 tasks at once, holding two tasks' graphs instead of four;
            the small transformer ran 7% slower side by side than all at once. Not chosen by
            the plan: its probe could not tell the two apart reliably.
        hvp_mode: the generic path's HVPs: ``"fwdrev"`` (forward-over-reverse),
            ``"revrev"`` (reverse-over-reverse) or ``"auto"`` (the first, falling back to the
            second where an op has no forward-mode derivative, e.g. ``F.mse_loss``).
        backend: the backend of every kernel: the CG solve and the engine's stages
            (:func:`imaml_kernels.dispatch.kernels`; ``None``: automatic).
        compile: the generic path's inner gradient and HVP through ``torch.compile`` (Inductor:
            C++ on the CPU, Triton on a GPU), compiled once per model, loss and shape (tens of
            seconds on the CPU); products are then recomputed, not taken on a kept graph. It pays
            where per-op overhead dominates (small models, many steps); the fused engine is not
            compiled (its stages are fused already). A whole engine meta-step does trace under
            ``torch.compile(fullgraph=True)``, but leave the engine out of your compiled region:
            compiled it ran 0.90x eager (1.34 against 1.20 s, Omniglot 5w1s, T = 32, CPU) with
            158 MiB more peak, after a compilation of tens of seconds
            (``python -m bench meta-step --compiled``): the stages are already fused kernels and
            a CG solve's HVPs reuse one linearisation, which leaves Inductor nothing to fuse.
        randomness: how random ops (dropout in training mode) draw across the tasks under vmap:
            ``"error"`` (default, torch's: a model that draws is refused in one line),
            ``"different"`` (each task its own draws) or ``"same"``; the inner loop draws anew
            each step, a backward solve's products all see one draw (its linearisation's), so
            its operator stays symmetric. Use the same choice in the query forward
            (:func:`~imaml_kernels.query_logits`).
        engine: the fused network engine (:func:`~imaml_kernels.engine.select_engine`):
            ``None`` uses it whenever the model is supported (OmniglotConv, MiniImagenetConv,
            MLP, ...), ``False`` forces the generic ``torch.func`` path, ``True`` requires it.

    Returns:
        :class:`AdaptedParams`: ``{name: [T, *theta[name].shape]}`` connected to θ, so that
        ``outer_loss(phi).backward()`` accumulates into ``theta[k].grad`` the sum over tasks of
        the solve's ``x_t``, and into each non-adapted parameter ψ of the model that
        requires grad its cross term (the direct term comes from ``outer_loss`` itself).

    Example::

        >>> theta = dict(model.named_parameters())
        >>> phi = implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=GD(16, 0.1))
        >>> logits = ik.query_logits(model, phi, xq)                 # [T, M, classes]
        >>> F.cross_entropy(logits.flatten(0, 1), yq.flatten()).backward()
    """
    opts = args.Options.make(**options)
    if opts.workers not in (None, 1):
        raise ValueError("workers= is implicit_meta_grad's (its chunks run end to end, side by side); implicit_adapt runs "
                         "its chunks in turn")
    args.check_theta(theta)
    args.check_support(support)
    names = list(theta)
    model, group = parallel.unwrap(model)  # DDP: the wrapped module, its meta-gradients averaged (imaml_kernels/parallel.py)
    if group is not None:
        theta = {parallel.strip(k): v for k, v in theta.items()}
    psi = args.check_model_params(model, theta)
    args.check_inner(inner)
    args.check_dtypes(model, theta, support[0])
    lam = _lam(lam, theta, support[0].shape[0], support[0].device)
    objective, phi, inner_loss, plan, lin, meta, report = randomness_checked(
        lambda: _adapt(model, theta, support, lam, inner, opts, psi))
    diag = Diagnostics(inner_loss, plan=plan, inner=report)
    if not meta:
        return AdaptedParams(zip(names, phi.values()), _diag=diag)
    saved = _Saved(objective, [phi], opts, inner_loss, diag, model, psi, {k: v.dtype for k, v in theta.items()}, plan.chunks,
                   lin, lam, group)
    outs = _ImplicitGrad.apply(saved, *theta.values(), *psi.values(), *lam.sources)
    return AdaptedParams(zip(names, outs), _diag=diag)


def implicit_meta_grad(model, theta, support, query, *, lam, inner, **options):
    """The same computation as a plain function, for users with their own training loop.

    Args: as :func:`implicit_adapt` (the same options), plus ``query = (x [T, M, ...], y [T, M, ...])``.

    Returns:
        ``(meta_grad, info)``: ``meta_grad`` a dict shaped like θ holding the sum over tasks of
        the implicit gradients of ``L_t(query)`` (plus, for an ``nn.Module``, an entry per
        parameter that requires grad and is not in θ: its direct + cross term); ``info`` a
        dict with ``outer_loss`` ``[T]``, ``inner_loss`` ``[T]``, ``cg`` and ``dropped`` ``[T]``,
        and ``plan`` (:class:`~imaml_kernels.plan.Plan`: how the tasks ran).

    Example::

        >>> g, info = implicit_meta_grad(model, theta, (xs, ys), (xq, yq), lam=2.0, inner=GD(16, 0.1))
        >>> for k, p in theta.items(): p.grad = g[k] / xs.shape[0]
    """
    opts = args.Options.make(**options)
    args.check_theta(theta)
    T = args.check_support(support)
    if args.check_support(query, "query") != T:
        raise ValueError(f"query has T={query[0].shape[0]} tasks but support has T={T}")
    model, group = parallel.unwrap(model)  # DDP: the wrapped module; the meta-gradient averaged once at the end
    keys = list(theta)
    if group is not None:
        theta = {parallel.strip(k): v for k, v in theta.items()}
    leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in theta.items()}
    psi = args.check_model_params(model, leaves)
    if isinstance(lam, (list, tuple)):
        lam = torch.tensor([float(v) for v in lam])
    resolved = _lam(lam, leaves, T, support[0].device)
    with batch_stats_only(model), torch.no_grad():
        objective = _objective(model, leaves, support, resolved.value, opts, psi)
        plan = _planned(model, objective, inner, opts, _side(model, leaves, support, resolved, opts, psi, objective))
    # Each chunk's tasks end to end (adapt, query loss, backward): nothing [T, P] is kept.
    fixed = ({**options, "chunk": plan.chunk, "hvp_mode": plan.hvp, "workers": 1} if plan.path == "generic"
             else {**options, "chunk": None if opts.chunk is None else plan.chunk})

    def chunk_grad(m, lo, hi):
        part = lam[lo:hi] if isinstance(lam, torch.Tensor) and lam.dim() else lam
        return _meta_grad(m, leaves, psi, [t[lo:hi] for t in support], [t[lo:hi] for t in query], part, inner, fixed, opts)

    if plan.workers > 1:
        # Chunks side by side, each thread on its own copy of the model's modules (sharing its
        # tensors); attention's math backend set here, so that no thread's exit restores another.
        copies = [shallow_copy(model) for _ in range(plan.workers)]
        with differentiable_attention():
            parts = plans.side_by_side([lambda w, lo=lo, hi=hi: chunk_grad(copies[w], lo, hi) for lo, hi in plan.chunks],
                                       plan.workers)
    else:  # in turn, each chunk's gradient added as it comes (no T/chunk of them alive at once)
        parts = (chunk_grad(model, lo, hi) for lo, hi in plan.chunks)
    meta, infos = None, []
    for g, info in parts:  # summed in the chunks' order, however they ran
        meta = g if meta is None else {k: meta[k].add_(g[k]) for k in meta}
        infos.append(info)
    if group is not None:
        named = list(meta)
        meta = dict(zip([*keys, *named[len(keys):]], parallel.all_reduce_mean(list(meta.values()), group)))
    if len(infos) == 1:
        return meta, {**infos[0], "plan": plan}
    info = {k: torch.cat([i[k] for i in infos]) for k in ("outer_loss", "inner_loss", "dropped") if k in infos[0]}
    if "cg" in infos[0]:
        info["cg"] = _joined([i["cg"] for i in infos])
    return meta, {**info, "plan": plan}


def _meta_grad(model, leaves, psi, support, query, lam, inner, options, opts):
    """:func:`implicit_meta_grad` on one chunk of tasks."""
    xq, yq = query
    with torch.enable_grad():
        phi = implicit_adapt(model, leaves, support, lam=lam, inner=inner, **options)
        net = None if psi else select_engine(model, leaves, xq, opts.loss, opts.engine, opts.backend)
        with batch_stats_only(model), differentiable_attention():
            if net is not None:
                logits = functional_logits(net, dict(phi), xq)
                outer = F.cross_entropy(logits.flatten(0, 1), yq.flatten(), reduction="none").view(yq.shape).mean(1)
            else:
                f = task_loss_fn(model, opts.loss)
                if xq.shape[0] == 1 and opts.randomness == "error":  # one task: its own call (no vmap)
                    outer = randomness_checked(lambda: one_task_loss(f, {k: v[0] for k, v in phi.items()}, (xq, yq)))
                else:
                    outer = randomness_checked(lambda: vmap(f, randomness=opts.randomness)(dict(phi), xq, yq))
        wrt = [*leaves.values(), *psi.values()]
        grads = torch.autograd.grad(outer.sum(), wrt, allow_unused=True)
    meta = {k: (g if g is not None else torch.zeros_like(t)) for k, t, g in zip([*leaves, *psi], wrt, grads)}
    info = {"outer_loss": outer.detach(), "inner_loss": phi.inner_loss, **(phi.info or {})}
    return meta, info
