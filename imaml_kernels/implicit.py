"""The drop-in implicit-gradient op: ``implicit_adapt`` and ``implicit_meta_grad``.

For T tasks with meta-parameters θ (shared) and λ > 0:

- inner: ``φ_t ≈ argmin L̂_t(φ) + (λ_t/2)‖φ − θ‖²`` by any inner solver, without a graph;
- backward: ``∂/∂θ = Σ_t x_t`` with ``((1+c) I + H_t/(λ_t+d)) x_t = g_t``, ``g_t = ∂outer/∂φ_t``
  and ``H_t = ∇²L̂_t(φ_t)``, by a pluggable linear solve (:class:`~imaml_kernels.CG`:
  c = d = 0 is the paper's ``(I + H_t/λ_t)⁻¹ g_t``, c = 1, d = 10 the authors' released code);
- parameters of the model that are meta-learned but not adapted (ψ, e.g. ANIL's body)
  receive the cross term ``−(∂²L̂_t/∂ψ∂φ) x_t/(λ_t+d)`` besides their direct gradient.

Memory does not grow with the number of inner steps: nothing is unrolled.
"""

import contextlib
import difflib
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.func import functional_call, vmap

from .cg import CG, cg_solve
from .engine import BatchedNet, UnsupportedModel, batched_net, functional_logits
from .objective import ProximalObjective, task_loss_fn

__all__ = ["AdaptedParams", "implicit_adapt", "implicit_meta_grad", "select_engine"]


def _host_checks_allowed():
    # Value checks that read tensors back (a sync) are skipped while compiling or capturing.
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def _batch_stats_only(model):
    """BatchNorm layers in training mode with running statistics would update their buffers
    in place inside vmap; batch statistics are what they compute anyway, so the update is
    switched off while the functional calls run (eval-mode layers keep their frozen stats)."""
    changed = []
    if isinstance(model, torch.nn.Module):
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
                m.track_running_stats = False
                changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


class _Diagnostics:
    __slots__ = ("inner_loss", "info")

    def __init__(self, inner_loss=None, info=None):
        self.inner_loss, self.info = inner_loss, info


class AdaptedParams(dict):
    """The adapted ``φ``: a dict ``{name: [T, ...]}`` and a pytree (it goes straight into
    ``torch.func.vmap``, ``functional_call`` and ``torch.utils._pytree.tree_map``; what those
    rebuild shares these diagnostics):

    - ``inner_loss``: ``[T]`` task loss at φ (NaN/inf marks a task whose inner loop failed);
    - ``info``: filled by the backward pass (``None`` before it, without a meta-gradient, and
      under ``torch.compile``): ``{"cg": info of the solve, "dropped": [T] bool}``, where
      ``dropped`` marks tasks whose contribution was zeroed (non-finite outer gradient,
      solution or inner loss). A task whose CG broke down (``info["cg"].breakdown``) keeps
      CG's last good iterate; ``info["cg"].diverged`` flags a residual that grew.
    """

    def __init__(self, *args, _diag=None, **kw):
        super().__init__(*args, **kw)
        object.__setattr__(self, "_diag", _diag if _diag is not None else _Diagnostics())

    @property
    def inner_loss(self) -> torch.Tensor:
        return self._diag.inner_loss

    @property
    def info(self) -> Optional[dict]:
        return self._diag.info

    def __reduce__(self):
        return (dict, (dict(self),))


def _flatten_adapted(d):
    return list(d.values()), (list(d.keys()), d._diag)


def _unflatten_adapted(values, context):
    keys, diag = context
    return AdaptedParams(zip(keys, values), _diag=diag)


pytree.register_pytree_node(
    AdaptedParams, _flatten_adapted, _unflatten_adapted,
    serialized_type_name="imaml_kernels.AdaptedParams",
    flatten_with_keys_fn=lambda d: ([(pytree.MappingKey(k), v) for k, v in d.items()], (list(d.keys()), d._diag)),
)


# ------------------------------------------------------------------------ argument checks


def _as_lam(lam, T, device):
    if isinstance(lam, (list, tuple)):
        try:
            lam = torch.tensor([float(v) for v in lam])
        except (TypeError, ValueError):
            raise TypeError(f"lam must be a number, a [T] tensor or a list of T numbers, got {lam!r}") from None
    if isinstance(lam, torch.Tensor):
        if lam.dim() == 0:
            lam = lam.expand(T)
        if tuple(lam.shape) != (T,):
            raise ValueError(f"lam must be a scalar or a [T] tensor with T={T}, got shape {list(lam.shape)}")
        if not lam.is_floating_point():
            lam = lam.double()
        # Checking values of a device tensor would sync with the host: only CPU tensors are checked.
        if lam.device.type == "cpu" and _host_checks_allowed() and not bool(((lam > 0) & torch.isfinite(lam)).all()):
            raise ValueError("lam must be finite and > 0 for every task")
        return lam.detach().to(device, torch.float64 if lam.dtype == torch.float64 else torch.float32)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a number, a [T] tensor or a list of T numbers, got {type(lam).__name__}")
    lam = float(lam)
    if not 0 < lam < float("inf"):
        raise ValueError(f"lam must be finite and > 0, got {lam}")
    return torch.full((T,), lam, device=device)


def _check_theta(theta):
    if not isinstance(theta, dict) or not theta:
        raise TypeError(f"theta must be a non-empty dict {{name: tensor}} of meta-parameters, got {type(theta).__name__}")
    for k, v in theta.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"theta[{k!r}] must be a tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"theta[{k!r}] must be a floating-point tensor, got {v.dtype}")


def _check_support(support, name="support"):
    if not isinstance(support, (tuple, list)) or len(support) != 2 or not all(isinstance(t, torch.Tensor) for t in support):
        raise TypeError(f"{name} must be a pair (x, y) of tensors with a leading task dim T, got {type(support).__name__}")
    x, y = support
    for which, t in (("x", x), ("y", y)):
        if t.dim() < 2:
            raise ValueError(
                f"{name} {which} must be [T, N, ...] (tasks, examples, ...), got shape {list(t.shape)}; "
                f"for one task add the task dim: {which}[None]"
            )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name} x has T={x.shape[0]} tasks but y has T={y.shape[0]}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{name} x has N={x.shape[1]} examples per task but y has N={y.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no tasks (T=0)")
    return x.shape[0]


def _check_model_params(model, theta):
    """θ's names against the model's parameters; returns ψ: the model's parameters that
    require grad and are not in θ (meta-learned, not adapted)."""
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable f(params, x), got {type(model).__name__}")
        return {}
    named = dict(model.named_parameters())
    for k, v in theta.items():
        if k not in named:
            close = difflib.get_close_matches(k, list(named), n=3, cutoff=0.3)
            hint = f"; close matches: {close}" if close else f"; the model has {list(named)[:6]}"
            raise ValueError(f"theta[{k!r}] is not a parameter of the model (names as in model.named_parameters()){hint}")
        if tuple(v.shape) != tuple(named[k].shape):
            raise ValueError(f"theta[{k!r}] has shape {list(v.shape)} but the model's parameter has {list(named[k].shape)}")
    return {k: p for k, p in named.items() if k not in theta and p.requires_grad}


def _check_dtypes(model, theta, x):
    if isinstance(model, torch.nn.Module) and x.is_floating_point():
        dtypes = {v.dtype for v in theta.values()}
        if len(dtypes) == 1 and x.dtype not in dtypes:
            (dt,) = dtypes
            raise TypeError(f"support x is {x.dtype} but the parameters are {dt}: cast one to the other (e.g. x.to({dt}))")


def _check_labels(model, theta, x, y, loss):
    """Class labels of the default cross-entropy in range (CPU labels only: no sync)."""
    if loss is not None or y.is_floating_point() or y.device.type != "cpu" or not _host_checks_allowed():
        return
    if y.dtype == torch.bool or y.numel() == 0:
        raise TypeError(f"support y must hold integer class labels for the default cross-entropy, got {y.dtype}")
    with torch.no_grad():
        params = {k: v.detach() for k, v in theta.items()}
        out = functional_call(model, params, (x[0, :1],)) if isinstance(model, torch.nn.Module) else model(params, x[0, :1])
    classes = out.shape[-1]
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise ValueError(f"support y holds labels in [{lo}, {hi}] but the model has {classes} outputs (labels must be in [0, {classes - 1}])")


def _check_inner(inner):
    if isinstance(inner, type):
        raise TypeError(f"inner must be a solver instance such as GD(16, 0.1), got the class {inner.__name__}")
    if not callable(inner):
        raise TypeError(f"inner must be a solver callable(objective, phi0) -> phi, got {type(inner).__name__}")


def _resolve_solve(solve, cg_iters, cg_tol, backend, first_order):
    if solve is not None and (cg_iters is not None or cg_tol is not None):
        raise ValueError("give either solve=CG(iters, tol, ...) or the shorthands cg_iters/cg_tol, not both")
    if solve is None:
        solve = CG(iters=5 if cg_iters is None else cg_iters, tol=0.0 if cg_tol is None else cg_tol, backend=backend)
    if isinstance(solve, type):
        raise TypeError(f"solve must be a solver instance such as CG(5), got the class {solve.__name__}")
    if not callable(solve):
        raise TypeError(f"solve must be CG(...) or a callable solve(matvec, b) -> (x, info), got {type(solve).__name__}")
    if isinstance(solve, CG) and solve.iters == 0 and not first_order:
        raise ValueError("cg_iters=0 solves nothing (the meta-gradient would be zero): use first_order=True to skip the solve")
    return solve


def _check_phi(phi, theta, T):
    names = list(theta)
    if not isinstance(phi, dict) or set(phi) != set(names):
        got = sorted(phi) if isinstance(phi, dict) else type(phi).__name__
        raise TypeError(f"the inner solver must return a dict with the keys of theta {names}, got {got}")
    for k in names:
        want = (T, *theta[k].shape)
        if not isinstance(phi[k], torch.Tensor) or tuple(phi[k].shape) != want:
            got = list(phi[k].shape) if isinstance(phi[k], torch.Tensor) else type(phi[k]).__name__
            raise ValueError(f"the inner solver returned phi[{k!r}] of shape {got}, expected {list(want)} (T={T} tasks)")


def select_engine(model, theta, x, loss=None, engine=None, backend=None) -> Optional[BatchedNet]:
    """The fused engine for this call, or ``None`` for the generic ``torch.func`` path.

    ``engine``: ``None`` (automatic: used when ``model`` is a supported ``nn.Sequential``,
    the loss is the default cross-entropy, θ is ``model``'s float32/float64 parameters in
    order and the inputs fit), ``False`` (never), ``True`` (required: raises with the reason
    when it cannot run) or a :class:`~imaml_kernels.engine.BatchedNet`. ``backend`` steers the
    engine's stages (:func:`imaml_kernels.dispatch.kernels`); the net is parsed once per model
    and reused (:func:`~imaml_kernels.engine.batched_net`)."""
    if engine is False:
        return None
    if isinstance(engine, BatchedNet):
        return engine
    if engine not in (None, True):
        raise TypeError(f"engine must be None, True, False or a BatchedNet, got {type(engine).__name__}")
    try:
        if loss is not None:
            raise UnsupportedModel("a custom loss was given (the engine implements cross-entropy)")
        if not isinstance(model, torch.nn.Module):
            raise UnsupportedModel(f"model is a {type(model).__name__}, not an nn.Module")
        dtypes = {v.dtype for v in theta.values()}
        if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
            raise UnsupportedModel(f"theta dtypes {sorted(map(str, dtypes))}: the engine needs one of float32/float64")
        net = batched_net(model, tuple(x.shape[2:]), backend=backend)
        names = list(theta)
        if names != net.layout.names or any(tuple(theta[k].shape) != tuple(net.layout.shapes[k]) for k in names):
            raise UnsupportedModel("theta is not the model's named_parameters() in order")
        return net
    except UnsupportedModel as e:
        if engine is True:
            raise ValueError(f"engine=True but the fused engine cannot run this model: {e}") from None
        return None


def _rows_finite(t):
    """``isfinite(t).all(1)`` in two passes: ``0·t`` is 0 where ``t`` is finite and NaN where
    it is not, and a sum of zeros is exactly 0 (``isfinite`` makes four passes, then ``all``)."""
    return t.mul(0).sum(1) == 0


class _ImplicitGrad(torch.autograd.Function):
    """Outputs φ (a copy); its backward solves for θ's and ψ's gradients. The backward
    mutates nothing outside ``ctx`` while tracing, so ``torch.compile`` can take it."""

    @staticmethod
    def forward(ctx, state, *leaves):
        ctx.state = state
        # A copy: an autograd op must never return an alias of a saved buffer. One buffer,
        # returned as views (one launch, not one per tensor).
        layout = state["objective"].layout
        out = layout.unflatten(layout.as_flat(state["phi"]).clone())
        return tuple(out[k] for k in state["names"])

    @staticmethod
    def backward(ctx, *grads):
        st = ctx.state
        eager = not torch.compiler.is_compiling()
        obj = st["objective"]
        layout = obj.layout
        phi = st["phi"]
        g = layout.flatten({k: (gr if gr is not None else torch.zeros_like(phi[k])) for k, gr in zip(st["names"], grads)})
        finite_g = _rows_finite(g)
        g = g.masked_fill(~finite_g[:, None], 0.0)
        solve = st["solve"]
        c, d = float(getattr(solve, "damping", 0.0)), float(getattr(solve, "lam_damping", 0.0))
        # λ + d: a Python number when λ was one (no launch), else [T, 1].
        lam_d = st["lam_number"] + d if st["lam_number"] is not None else (obj.lam.to(g.dtype) + d)[:, None]
        phi_flat = layout.as_flat(phi)
        if st["first_order"]:
            x, info = g, None
            bad = ~finite_g
        else:
            with _batch_stats_only(st["model"]):
                lin = (st.pop("lin", None) if eager else st.get("lin")) or obj.linearize(phi_flat)
                if isinstance(solve, CG):
                    # ((1+c) I + H/(λ+d)) x = g  <=>  (I + H/λ') x = g/(1+c), λ' = (1+c)(λ+d):
                    # the same system with a one-pass matvec. CG is elementwise in the
                    # coordinates, so it runs in the HVP's own order.
                    lam_p = lam_d * (1.0 + c)

                    def matvec(v):
                        if isinstance(lam_p, float):
                            return torch.add(v, lin.task_hvp_work(v), alpha=1.0 / lam_p)
                        return torch.addcdiv(v, lin.task_hvp_work(v), lam_p)

                    b = g / (1.0 + c) if c else g
                    x, info = cg_solve(matvec, lin.to_work(b), iters=solve.iters, tol=solve.tol, backend=solve.backend)
                else:

                    def matvec(v):
                        vs = v * (1.0 + c) if c else v
                        if isinstance(lam_d, float):
                            return torch.add(vs, lin.task_hvp_work(v), alpha=1.0 / lam_d)
                        return torch.addcdiv(vs, lin.task_hvp_work(v), lam_d)

                    out = solve(matvec, lin.to_work(g))
                    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor) and out[0].shape == g.shape):
                        raise TypeError(f"solve(matvec, b) must return (x, info) with x of shape {list(g.shape)}")
                    x, info = out
                    x = x.to(g.dtype)
                x = lin.from_work(x)
            # A breakdown (I + H/λ indefinite for a non-convex task) keeps CG's last good
            # iterate, a usable partial solve; it is reported in info["cg"].breakdown.
            bad = ~finite_g | ~_rows_finite(x)
        bad = bad | ~torch.isfinite(st["inner_loss"])
        x = x.masked_fill(bad[:, None], 0.0)
        if eager:
            st["diag"].info = {"cg": info, "dropped": bad}
        total = layout.unflatten(x.sum(0, keepdim=True))  # one reduction over the tasks
        out = [total[k][0].to(st["theta_dtypes"][k]) for k in st["names"]]
        psi = st["psi"]
        if psi:
            if st["first_order"]:
                out += [None] * len(psi)
            else:
                # dφ*/dψ = −(H + λ'I)⁻¹ ∂²L̂/∂φ∂ψ, and (H + λ'I)⁻¹ g = x/(λ+d).
                with _batch_stats_only(st["model"]):
                    cross = obj.task.cross_vjp(phi_flat, x / lam_d)
                out += [-cross[k].to(p.dtype) for k, p in psi.items()]
        return (None, *out)


def implicit_adapt(
    model: Union[torch.nn.Module, Callable],
    theta: Dict[str, torch.Tensor],
    support,
    *,
    lam,
    inner: Callable,
    solve: Optional[Callable] = None,
    cg_iters: Optional[int] = None,
    cg_tol: Optional[float] = None,
    first_order: bool = False,
    loss: Optional[Callable] = None,
    hvp_chunk: Optional[int] = None,
    hvp_mode: str = "auto",
    backend: Optional[str] = None,
    engine=None,
) -> AdaptedParams:
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
        solve: the linear solve of the backward: :class:`~imaml_kernels.CG` (default
            ``CG(iters=5)``; ``CG(damping=1.0, lam_damping=10.0)`` is the authors' damped
            system) or any ``solve(matvec, b) -> (x, info)``, ``matvec`` applying
            ``((1+damping) I + H/(λ+lam_damping))`` to ``[T, P]`` (damping and lam_damping
            read from the solve's attributes, 0 when it has none).
        cg_iters, cg_tol: shorthands for ``solve=CG(cg_iters, cg_tol)``; 0 iterations
            need ``first_order=True``.
        first_order: skip the solve (the gradient at φ passes straight to θ).
        loss: ``loss(out, y) -> scalar`` of one task; default cross-entropy.
        hvp_chunk: tasks per HVP group (memory bound, generic path).
        hvp_mode: the generic path's HVPs: ``"fwdrev"`` (forward-over-reverse),
            ``"revrev"`` (reverse-over-reverse) or ``"auto"`` (the first, falling back to the
            second where an op has no forward-mode derivative, e.g. ``F.mse_loss``).
        backend: the backend of every kernel: the CG solve and the engine's stages
            (:func:`imaml_kernels.dispatch.kernels`; ``None``: automatic).
        engine: the fused network engine (:func:`select_engine`): ``None`` uses it whenever
            the model is supported (OmniglotConv, MiniImagenetConv, MLP, ...), ``False``
            forces the generic ``torch.func`` path, ``True`` requires the engine.

    Returns:
        :class:`AdaptedParams`: ``{name: [T, *theta[name].shape]}`` connected to θ, so that
        ``outer_loss(phi).backward()`` accumulates into ``theta[k].grad`` the sum over tasks of
        the solve's ``x_t``, and into each non-adapted parameter ψ of the model that
        requires grad its cross term (the direct term comes from ``outer_loss`` itself).

    Example::

        >>> theta = dict(model.named_parameters())
        >>> phi = implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=GD(16, 0.1))
        >>> logits = torch.func.vmap(lambda p, x: torch.func.functional_call(model, p, (x,)))(phi, xq)
        >>> F.cross_entropy(logits.flatten(0, 1), yq.flatten()).backward()
    """
    _check_theta(theta)
    T = _check_support(support)
    x, y = support
    psi = _check_model_params(model, theta)
    _check_inner(inner)
    solve = _resolve_solve(solve, cg_iters, cg_tol, backend, first_order)
    _check_dtypes(model, theta, x)
    meta = torch.is_grad_enabled() and (any(v.requires_grad for v in theta.values()) or bool(psi))
    device = next(iter(theta.values())).device
    lam_t = _as_lam(lam, T, device)
    task_loss = task_loss_fn(model, loss)
    names = list(theta)
    with _batch_stats_only(model):
        net = None if psi else select_engine(model, theta, x, loss, engine, backend)
        if psi and engine is True:
            raise ValueError(f"engine=True but the fused engine adapts every parameter; these are not in theta: {list(psi)}")
        if net is None:  # the engine checks its labels itself (once per support set)
            _check_labels(model, theta, x, y, loss)
        objective = ProximalObjective(task_loss, theta, lam_t, (x, y), hvp_chunk=hvp_chunk, engine=net, hvp_mode=hvp_mode,
                                      key=(model, loss), psi={k: p.detach() for k, p in psi.items()})
        with torch.no_grad():
            if len({v.dtype for v in theta.values()}) == 1:
                # One copy of θ per task, as views of one [T, P] buffer (one launch, not one per tensor).
                phi0 = objective.layout.unflatten(objective.theta_flat.detach().expand(T, -1).clone())
            else:
                phi0 = {k: v.detach().unsqueeze(0).expand(T, *v.shape).clone() for k, v in theta.items()}
            phi = inner(objective, phi0)
            _check_phi(phi, theta, T)
            phi = {k: phi[k].detach() for k in names}
            lin = None
            if meta and objective.engine is not None and not first_order:
                # The backward's linearisation, made now: its loss is the inner loss, so the
                # support set's forward pass runs once instead of twice.
                lin = objective.linearize(objective.layout.as_flat(phi))
                inner_loss = lin.task_loss
            else:
                inner_loss = objective.task_value(phi)
    diag = _Diagnostics(inner_loss)
    if not meta:
        return AdaptedParams(phi, _diag=diag)
    state = {
        "objective": objective,
        "phi": phi,
        "names": names,
        "first_order": first_order,
        "solve": solve,
        "inner_loss": inner_loss,
        "lin": lin,
        "diag": diag,
        "theta_dtypes": {k: v.dtype for k, v in theta.items()},
        "model": model,
        "psi": psi,
        "lam_number": float(lam) if isinstance(lam, (int, float)) and not isinstance(lam, bool) else None,
    }
    outs = _ImplicitGrad.apply(state, *(theta[k] for k in names), *psi.values())
    return AdaptedParams(zip(names, outs), _diag=diag)


def implicit_meta_grad(
    model,
    theta,
    support,
    query,
    *,
    lam,
    inner,
    solve: Optional[Callable] = None,
    cg_iters: Optional[int] = None,
    cg_tol: Optional[float] = None,
    first_order: bool = False,
    loss: Optional[Callable] = None,
    hvp_chunk: Optional[int] = None,
    hvp_mode: str = "auto",
    backend: Optional[str] = None,
    engine=None,
):
    """The same computation as a plain function, for users with their own training loop.

    Args: as :func:`implicit_adapt`, plus ``query = (x [T, M, ...], y [T, M, ...])``.

    Returns:
        ``(meta_grad, info)``: ``meta_grad`` a dict shaped like θ holding the sum over tasks of
        the implicit gradients of ``L_t(query)`` (plus, for an ``nn.Module``, an entry per
        parameter that requires grad and is not in θ: its direct + cross term); ``info`` a
        dict with ``outer_loss`` ``[T]``, ``inner_loss`` ``[T]``, ``cg`` and ``dropped`` ``[T]``.

    Example::

        >>> g, info = implicit_meta_grad(model, theta, (xs, ys), (xq, yq), lam=2.0, inner=GD(16, 0.1))
        >>> for k, p in theta.items(): p.grad = g[k] / xs.shape[0]
    """
    _check_theta(theta)
    T = _check_support(support)
    if _check_support(query, "query") != T:
        raise ValueError(f"query has T={query[0].shape[0]} tasks but support has T={T}")
    task_loss = task_loss_fn(model, loss)
    xq, yq = query
    leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in theta.items()}
    psi = _check_model_params(model, leaves)
    with torch.enable_grad():
        phi = implicit_adapt(
            model, leaves, support, lam=lam, inner=inner, solve=solve, cg_iters=cg_iters, cg_tol=cg_tol,
            first_order=first_order, loss=loss, hvp_chunk=hvp_chunk, hvp_mode=hvp_mode, backend=backend, engine=engine,
        )
        net = None if psi else select_engine(model, theta, xq, loss, engine, backend)
        with _batch_stats_only(model):
            if net is not None:
                logits = functional_logits(net, dict(phi), xq)
                outer = F.cross_entropy(logits.flatten(0, 1), yq.flatten(), reduction="none").view(yq.shape).mean(1)
            else:
                outer = vmap(task_loss)(dict(phi), xq, yq)
        wrt = [leaves[k] for k in theta] + list(psi.values())
        grads = torch.autograd.grad(outer.sum(), wrt, allow_unused=True)
    meta = {k: (g if g is not None else torch.zeros_like(t)) for k, t, g in zip([*theta, *psi], wrt, grads)}
    info = {"outer_loss": outer.detach(), "inner_loss": phi.inner_loss, **(phi.info or {})}
    return meta, info
