"""The drop-in implicit-gradient op: ``implicit_adapt`` and ``implicit_meta_grad``.

For T tasks with meta-parameters θ (shared) and λ > 0:

- inner: ``φ_t ≈ argmin L̂_t(φ) + (λ_t/2)‖φ − θ‖²`` by any inner solver, without a graph;
- backward: ``∂/∂θ = Σ_t (I + H_t/λ_t)⁻¹ g_t`` with ``g_t = ∂outer/∂φ_t`` and ``H_t = ∇²L̂_t(φ_t)``,
  solved by :func:`imaml_kernels.cg_solve` with :func:`imaml_kernels.batched_hvp`.

Memory does not grow with the number of inner steps: nothing is unrolled.
"""

import contextlib
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from .cg import cg_solve
from .hvp import batched_hvp
from .layout import ParamLayout


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


def _task_loss_fn(model, loss):
    """``f(params_t, x_t, y_t) -> scalar`` for one task."""
    loss = loss or F.cross_entropy
    if isinstance(model, torch.nn.Module):
        buffers = dict(model.named_buffers())

        def f(params, x, y):
            return loss(functional_call(model, (params, buffers), (x,)), y)

    elif callable(model):

        def f(params, x, y):
            return loss(model(params, x), y)

    else:
        raise TypeError(f"model must be an nn.Module or a callable f(params, x), got {type(model).__name__}")
    return f


class ProximalObjective:
    """``L̂_t(φ_t) + (λ_t/2)‖φ_t − θ‖²`` for all T tasks; what inner solvers minimise.

    Args:
        task_loss: ``f(params_t, *batch_t) -> scalar`` for one task.
        theta: dict of shared meta-parameters (unbatched; detached here).
        lam: ``[T]`` tensor of λ_t > 0.
        batch: tensors with leading T (the support set).

    Methods take and return dicts of ``[T, ...]`` tensors; values are ``[T]``.
    """

    def __init__(self, task_loss, theta, lam, batch, hvp_chunk=None):
        self.task_loss = task_loss
        self.theta = {k: v.detach() for k, v in theta.items()}
        self.lam = lam
        self.batch = batch
        self.hvp_chunk = hvp_chunk
        self.layout = ParamLayout.from_params(self.theta, batched=False)
        self._grad_value = vmap(grad_and_value(task_loss))
        self._grad = vmap(grad(task_loss))
        self._value = vmap(task_loss)

    def _lam(self, like):
        return self.lam.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def _prox(self, phi):
        sq = sum(((phi[k] - self.theta[k]) ** 2).reshape(phi[k].shape[0], -1).sum(1) for k in phi)
        return 0.5 * self.lam.to(sq.dtype) * sq

    def task_value(self, phi):
        """``L̂_t(φ_t)`` ``[T]``."""
        return self._value(phi, *self.batch)

    def value(self, phi):
        """Proximal objective ``[T]``."""
        return self.task_value(phi) + self._prox(phi)

    def grad(self, phi):
        g = self._grad(phi, *self.batch)
        return {k: g[k] + self._lam(phi[k]) * (phi[k] - self.theta[k]) for k in phi}

    def value_and_grad(self, phi):
        g, v = self._grad_value(phi, *self.batch)
        g = {k: g[k] + self._lam(phi[k]) * (phi[k] - self.theta[k]) for k in phi}
        return v + self._prox(phi), g

    def task_hvp(self, phi, v):
        """``H_t v_t`` with ``H_t = ∇²L̂_t(φ_t)`` (no proximal term)."""
        return batched_hvp(self.task_loss, phi, v, *self.batch, chunk=self.hvp_chunk)

    def hvp(self, phi, v):
        """``(H_t + λ_t I) v_t``: the Hessian of the proximal objective."""
        hv = self.task_hvp(phi, v)
        return {k: hv[k] + self._lam(v[k]) * v[k] for k in v}


class AdaptedParams(dict):
    """The adapted ``φ`` (dict of ``[T, ...]`` tensors) with diagnostics:

    - ``inner_loss``: ``[T]`` task loss at φ (NaN/inf marks a task whose inner loop failed);
    - ``info``: filled by the backward pass: ``{"cg": CGInfo, "dropped": [T] bool}``, where
      ``dropped`` marks tasks whose contribution was zeroed (non-finite outer gradient or
      non-finite inner loss). A task whose CG broke down (``info["cg"].breakdown``) keeps
      CG's last good iterate.
    """

    inner_loss: torch.Tensor
    info: Optional[dict] = None


def _as_lam(lam, T, device):
    if isinstance(lam, torch.Tensor):
        if lam.dim() == 0:
            lam = lam.expand(T)
        if tuple(lam.shape) != (T,):
            raise ValueError(f"lam must be a scalar or a [T] tensor with T={T}, got shape {list(lam.shape)}")
        # Checking values of a device tensor would sync with the host: only CPU tensors are checked.
        if lam.device.type == "cpu" and _host_checks_allowed() and not bool((lam > 0).all()):
            raise ValueError("lam must be > 0 for every task")
        return lam.detach().to(device, torch.float64 if lam.dtype == torch.float64 else torch.float32)
    lam = float(lam)
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    return torch.full((T,), lam, device=device)


def _check_inputs(theta, support):
    if not isinstance(theta, dict) or not theta:
        raise TypeError("theta must be a non-empty dict {name: tensor} of meta-parameters")
    for k, v in theta.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"theta[{k!r}] must be a tensor, got {type(v).__name__}")
        if not v.requires_grad:
            raise ValueError(
                f"theta[{k!r}] does not require grad: its meta-gradient would be lost "
                "(use tensors with requires_grad=True, e.g. dict(model.named_parameters()))"
            )
    if not isinstance(support, (tuple, list)) or len(support) != 2:
        raise TypeError("support must be a pair (x, y) of tensors with a leading task dim T")
    x, y = support
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"support x has T={x.shape[0]} tasks but y has T={y.shape[0]}")
    return x.shape[0]


class _ImplicitGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, *theta_leaves):
        ctx.state = state
        # Clones: an autograd op must never return an alias of a saved buffer.
        return tuple(state["phi"][k].clone() for k in state["names"])

    @staticmethod
    def backward(ctx, *grads):
        st = ctx.state
        obj = st["objective"]
        layout = obj.layout
        phi = st["phi"]
        g = layout.flatten({k: (gr if gr is not None else torch.zeros_like(phi[k])) for k, gr in zip(st["names"], grads)})
        finite_g = torch.isfinite(g).all(1)
        g = torch.where(finite_g[:, None], g, torch.zeros_like(g))
        if st["first_order"]:
            x, info = g, None
            bad = ~finite_g
        else:
            lam = obj.lam.to(g.dtype)[:, None]

            def matvec(v):
                return v + layout.flatten(obj.task_hvp(phi, layout.unflatten(v))) / lam

            with _batch_stats_only(st["model"]):
                x, info = cg_solve(matvec, g, iters=st["cg_iters"], tol=st["cg_tol"], backend=st["backend"])
            # A breakdown (I + H/λ indefinite for a non-convex task) keeps CG's last good
            # iterate, a usable partial solve; it is reported in info["cg"].breakdown.
            bad = ~finite_g | ~torch.isfinite(x).all(1)
        bad = bad | ~torch.isfinite(st["inner_loss"])
        x = torch.where(bad[:, None], torch.zeros_like(x), x)
        st["result"].info = {"cg": info, "dropped": bad}
        total = layout.unflatten(x)
        return (None, *(total[k].sum(0).to(st["theta_dtypes"][k]) for k in st["names"]))


def implicit_adapt(
    model: Union[torch.nn.Module, Callable],
    theta: Dict[str, torch.Tensor],
    support,
    *,
    lam,
    inner: Callable,
    cg_iters: int = 5,
    cg_tol: float = 0.0,
    first_order: bool = False,
    loss: Optional[Callable] = None,
    hvp_chunk: Optional[int] = None,
    backend: Optional[str] = None,
) -> AdaptedParams:
    """Adapt θ to T tasks with the proximal inner problem; the result carries implicit gradients.

    Args:
        model: an ``nn.Module`` (called through ``torch.func.functional_call`` with its
            buffers; BatchNorm in batch-statistics or eval mode) or ``f(params, x) -> logits``.
        theta: dict of meta-parameters (leaf tensors with ``requires_grad``), unbatched.
        support: ``(x [T, N, ...], y [T, N])``.
        lam: λ > 0, a scalar or a per-task ``[T]`` tensor.
        inner: ``GD(steps, lr)``, ``SGD``, ``Adam``, ``NewtonCG`` or any
            ``solver(objective, phi0) -> phi``.
        cg_iters, cg_tol: the CG solve of ``(I + H/λ) x = g`` in the backward pass.
        first_order: skip the solve (the gradient at φ passes straight to θ).
        loss: ``loss(logits, y) -> scalar``; default cross-entropy.
        hvp_chunk: tasks per HVP group (memory bound); backend: CG backend.

    Returns:
        :class:`AdaptedParams`: dict ``{name: [T, *theta[name].shape]}`` connected to θ, so that
        ``outer_loss(phi).backward()`` accumulates into ``theta[k].grad`` the sum over tasks of
        ``(I + H_t/λ_t)⁻¹ ∂outer/∂φ_t``.

    Example::

        >>> theta = dict(model.named_parameters())
        >>> phi = implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=GD(16, 0.1))
        >>> logits = torch.func.vmap(lambda p, x: torch.func.functional_call(model, p, (x,)))(phi, xq)
        >>> F.cross_entropy(logits.flatten(0, 1), yq.flatten()).backward()
    """
    T = _check_inputs(theta, support)
    x, y = support
    device = next(iter(theta.values())).device
    lam_t = _as_lam(lam, T, device)
    task_loss = _task_loss_fn(model, loss)
    names = list(theta)
    with _batch_stats_only(model):
        objective = ProximalObjective(task_loss, theta, lam_t, (x, y), hvp_chunk=hvp_chunk)
        with torch.no_grad():
            phi0 = {k: v.detach().unsqueeze(0).expand(T, *v.shape).clone() for k, v in theta.items()}
            phi = inner(objective, phi0)
            if not isinstance(phi, dict) or set(phi) != set(names):
                raise TypeError(f"the inner solver must return a dict with keys {names}")
            phi = {k: phi[k].detach() for k in names}
            inner_loss = objective.task_value(phi)
    result = AdaptedParams()
    state = {
        "objective": objective,
        "phi": phi,
        "names": names,
        "first_order": first_order,
        "cg_iters": cg_iters,
        "cg_tol": cg_tol,
        "backend": backend,
        "inner_loss": inner_loss,
        "result": result,
        "theta_dtypes": {k: v.dtype for k, v in theta.items()},
        "model": model,
    }
    outs = _ImplicitGrad.apply(state, *(theta[k] for k in names))
    result.update(zip(names, outs))
    result.inner_loss = inner_loss
    return result


def implicit_meta_grad(
    model,
    theta,
    support,
    query,
    *,
    lam,
    inner,
    cg_iters: int = 5,
    cg_tol: float = 0.0,
    first_order: bool = False,
    loss: Optional[Callable] = None,
    hvp_chunk: Optional[int] = None,
    backend: Optional[str] = None,
):
    """The same computation as a plain function, for users with their own training loop.

    Args: as :func:`implicit_adapt`, plus ``query = (x [T, M, ...], y [T, M])``.

    Returns:
        ``(meta_grad, info)``: ``meta_grad`` a dict shaped like θ holding the sum over tasks of
        ``(I + H_t/λ_t)⁻¹ ∇φ L_t(query)``; ``info`` a dict with ``outer_loss`` ``[T]``,
        ``inner_loss`` ``[T]``, ``cg`` (:class:`CGInfo`) and ``dropped`` ``[T]``.

    Example::

        >>> g, info = implicit_meta_grad(model, theta, (xs, ys), (xq, yq), lam=2.0, inner=GD(16, 0.1))
        >>> for k, p in theta.items(): p.grad = g[k] / xs.shape[0]
    """
    task_loss = _task_loss_fn(model, loss)
    xq, yq = query
    leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in theta.items()}
    with torch.enable_grad():
        phi = implicit_adapt(
            model, leaves, support, lam=lam, inner=inner, cg_iters=cg_iters, cg_tol=cg_tol,
            first_order=first_order, loss=loss, hvp_chunk=hvp_chunk, backend=backend,
        )
        if xq.shape[0] != support[0].shape[0]:
            raise ValueError(f"query has T={xq.shape[0]} tasks but support has T={support[0].shape[0]}")
        with _batch_stats_only(model):
            outer = vmap(task_loss)(dict(phi), xq, yq)
        grads = torch.autograd.grad(outer.sum(), [leaves[k] for k in theta], allow_unused=True)
    meta = {k: (g if g is not None else torch.zeros_like(theta[k])) for k, g in zip(theta, grads)}
    info = {"outer_loss": outer.detach(), "inner_loss": phi.inner_loss, **(phi.info or {})}
    return meta, info
