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
from .engine import BatchedNet, UnsupportedModel, batched_net, functional_logits
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
        engine: a :class:`~imaml_kernels.engine.BatchedNet` computing the same ``task_loss``
            (cross-entropy of the network): values, gradients and HVPs then run through the
            fused engine instead of ``torch.func`` under ``vmap``.

    Methods take and return dicts of ``[T, ...]`` tensors; values are ``[T]``.
    :meth:`linearize` works on flat ``[T, P]`` buffers.
    """

    def __init__(self, task_loss, theta, lam, batch, hvp_chunk=None, engine: Optional[BatchedNet] = None):
        self.task_loss = task_loss
        self.theta = {k: v.detach() for k, v in theta.items()}
        self.lam = lam
        self.batch = batch
        self.hvp_chunk = hvp_chunk
        self.layout = ParamLayout.from_params(self.theta, batched=False)
        if engine is not None and (engine.layout.names != self.layout.names or engine.layout.shapes != self.layout.shapes):
            raise ValueError("the engine's parameter layout differs from theta's (names, order or shapes)")
        self.engine = engine
        self._grad_value = vmap(grad_and_value(task_loss))
        self._grad = vmap(grad(task_loss))
        self._value = vmap(task_loss)

    @property
    def theta_flat(self) -> torch.Tensor:
        """θ as one ``[P]`` vector (made once while θ is unchanged: keyed by the tensors' versions)."""
        key = tuple((id(v), v._version) for v in self.theta.values())
        if getattr(self, "_theta_flat_key", None) != key or torch.compiler.is_compiling():
            self._theta_flat = self.layout.flatten({k: v.unsqueeze(0) for k, v in self.theta.items()})[0]
            self._theta_flat_key = key
        return self._theta_flat

    def with_lam(self, lam):
        """The same objective with another ``[T]`` λ (θ's flat copy is shared)."""
        other = ProximalObjective(self.task_loss, self.theta, lam, self.batch, hvp_chunk=self.hvp_chunk, engine=self.engine)
        if getattr(self, "_theta_flat_key", None) is not None:
            other._theta_flat, other._theta_flat_key = self._theta_flat, self._theta_flat_key
        return other

    def _lam(self, like):
        return self.lam.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def _prox(self, phi):
        sq = sum(((phi[k] - self.theta[k]) ** 2).reshape(phi[k].shape[0], -1).sum(1) for k in phi)
        return 0.5 * self.lam.to(sq.dtype) * sq

    def task_value(self, phi):
        """``L̂_t(φ_t)`` ``[T]``."""
        if self.engine is not None:
            return self.engine.loss(self.layout.as_flat(phi), *self.batch)
        return self._value(phi, *self.batch)

    def value(self, phi):
        """Proximal objective ``[T]``."""
        return self.task_value(phi) + self._prox(phi)

    def grad(self, phi):
        return self.value_and_grad(phi)[1] if self.engine is not None else self._add_prox_grad(phi, self._grad(phi, *self.batch))

    def _add_prox_grad(self, phi, g):
        return {k: g[k] + self._lam(phi[k]) * (phi[k] - self.theta[k]) for k in phi}

    def value_and_grad(self, phi):
        if self.engine is not None:
            v, g = self.engine.loss_and_grad(self.layout.as_flat(phi), *self.batch)
            g = self.layout.unflatten(g)
        else:
            g, v = self._grad_value(phi, *self.batch)
        return v + self._prox(phi), self._add_prox_grad(phi, g)

    def task_hvp(self, phi, v):
        """``H_t v_t`` with ``H_t = ∇²L̂_t(φ_t)`` (no proximal term)."""
        if self.engine is not None:
            flat = self.layout.flatten
            return self.layout.unflatten(self.engine.hvp(flat(phi), flat(v), *self.batch))
        return batched_hvp(self.task_loss, phi, v, *self.batch, chunk=self.hvp_chunk)

    def hvp(self, phi, v):
        """``(H_t + λ_t I) v_t``: the Hessian of the proximal objective."""
        hv = self.task_hvp(phi, v)
        return {k: hv[k] + self._lam(v[k]) * v[k] for k in v}

    def linearize(self, phi: torch.Tensor) -> "ObjectiveLinearization":
        """The objective at a flat ``phi [T, P]``: ``value``/``grad`` (proximal term included)
        and HVPs that, with the engine, reuse one primal pass for every product."""
        return ObjectiveLinearization(self, phi)


class ObjectiveLinearization:
    """:meth:`ProximalObjective.linearize`: flat ``[T, P]`` in and out; computed lazily."""

    def __init__(self, objective, phi):
        self.objective, self.phi = objective, phi
        self._lin = None
        if objective.engine is not None:
            self._lin = objective.engine.linearize(phi, *objective.batch)
        self._vg = None

    def _value_grad(self):
        if self._vg is None:
            obj, phi = self.objective, self.phi
            lam = obj.lam.to(phi.dtype)[:, None]
            d = phi - obj.theta_flat.to(phi.dtype)
            if self._lin is not None:
                v, g = self._lin.loss, self._lin.grad
            else:
                g, v = obj._grad_value(obj.layout.unflatten(phi), *obj.batch)
                g = obj.layout.flatten(g)
            self._vg = (v + 0.5 * lam[:, 0] * (d * d).sum(1), g + lam * d)
        return self._vg

    @property
    def task_loss(self):
        """``[T]``: ``L̂_t(φ_t)`` (no proximal term)."""
        if self._lin is not None:
            return self._lin.loss
        obj = self.objective
        return obj.task_value(obj.layout.unflatten(self.phi))

    @property
    def value(self):
        """``[T]``: ``L̂_t(φ_t) + (λ_t/2)‖φ_t − θ‖²``."""
        return self._value_grad()[0]

    @property
    def grad(self):
        """``[T, P]``: its gradient."""
        return self._value_grad()[1]

    def to_work(self, v):
        """``[T, P]`` in θ's order -> the order :meth:`task_hvp_work` works in (the engine's
        own parameter order, so a CG solve there skips two permutes per product)."""
        return self._lin.net.to_native(v) if self._lin is not None else v

    def from_work(self, v):
        """The inverse of :meth:`to_work`."""
        return self._lin.net.from_native(v) if self._lin is not None else v

    def task_hvp_work(self, v):
        """:meth:`task_hvp` in the work order. With the engine the result lives in one buffer
        reused by every call (a CG matvec consumes it at once): read it before the next call."""
        if self._lin is None:
            return self.task_hvp(v)
        self._hv = self._lin.hvp_native(v, out=getattr(self, "_hv", None))
        return self._hv

    def task_hvp(self, v):
        """``H_t v_t`` (no proximal term): ``[T, P]`` -> ``[T, P]``."""
        if self._lin is not None:
            return self._lin.hvp(v)
        obj = self.objective
        un = obj.layout.unflatten
        return obj.layout.flatten(batched_hvp(obj.task_loss, un(self.phi), un(v), *obj.batch, chunk=obj.hvp_chunk))

    def hvp(self, v):
        """``(H_t + λ_t I) v_t``."""
        return self.task_hvp(v) + self.objective.lam.to(v.dtype)[:, None] * v


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


class _ImplicitGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, *theta_leaves):
        ctx.state = state
        # A copy: an autograd op must never return an alias of a saved buffer. One buffer,
        # returned as views (one launch, not one per tensor).
        layout = state["objective"].layout
        out = layout.unflatten(layout.as_flat(state["phi"]).clone())
        return tuple(out[k] for k in state["names"])

    @staticmethod
    def backward(ctx, *grads):
        st = ctx.state
        obj = st["objective"]
        layout = obj.layout
        phi = st["phi"]
        g = layout.flatten({k: (gr if gr is not None else torch.zeros_like(phi[k])) for k, gr in zip(st["names"], grads)})
        finite_g = torch.isfinite(g).all(1)
        g = g.masked_fill(~finite_g[:, None], 0.0)
        if st["first_order"]:
            x, info = g, None
            bad = ~finite_g
        else:
            lam = obj.lam.to(g.dtype)[:, None]
            with _batch_stats_only(st["model"]):
                lin = st.pop("lin", None) or obj.linearize(layout.as_flat(phi))

                def matvec(v):
                    return torch.addcdiv(v, lin.task_hvp_work(v), lam)  # v + Hv/λ, one pass

                # CG is elementwise in the coordinates: it runs in the HVP's own order.
                x, info = cg_solve(matvec, lin.to_work(g), iters=st["cg_iters"], tol=st["cg_tol"], backend=st["backend"])
                x = lin.from_work(x)
            # A breakdown (I + H/λ indefinite for a non-convex task) keeps CG's last good
            # iterate, a usable partial solve; it is reported in info["cg"].breakdown.
            bad = ~finite_g | ~torch.isfinite(x).all(1)
        bad = bad | ~torch.isfinite(st["inner_loss"])
        x = x.masked_fill(bad[:, None], 0.0)
        st["result"].info = {"cg": info, "dropped": bad}
        total = layout.unflatten(x.sum(0, keepdim=True))  # one reduction over the tasks
        return (None, *(total[k][0].to(st["theta_dtypes"][k]) for k in st["names"]))


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
    engine=None,
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
        hvp_chunk: tasks per HVP group (memory bound, generic path).
        backend: the backend of every kernel: the CG solve and the engine's stages
            (:func:`imaml_kernels.dispatch.kernels`; ``None``: automatic).
        engine: the fused network engine (:func:`select_engine`): ``None`` uses it whenever
            the model is supported (OmniglotConv, MiniImagenetConv, MLP, ...), ``False``
            forces the generic ``torch.func`` path, ``True`` requires the engine.

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
        net = select_engine(model, theta, x, loss, engine, backend)
        objective = ProximalObjective(task_loss, theta, lam_t, (x, y), hvp_chunk=hvp_chunk, engine=net)
        with torch.no_grad():
            if len({v.dtype for v in theta.values()}) == 1:
                # One copy of θ per task, as views of one [T, P] buffer (one launch, not one per tensor).
                phi0 = objective.layout.unflatten(objective.theta_flat.detach().expand(T, -1).clone())
            else:
                phi0 = {k: v.detach().unsqueeze(0).expand(T, *v.shape).clone() for k, v in theta.items()}
            phi = inner(objective, phi0)
            if not isinstance(phi, dict) or set(phi) != set(names):
                raise TypeError(f"the inner solver must return a dict with keys {names}")
            phi = {k: phi[k].detach() for k in names}
            lin = None
            if objective.engine is not None and not first_order:
                # The backward's linearisation, made now: its loss is the inner loss, so the
                # support set's forward pass runs once instead of twice.
                lin = objective.linearize(objective.layout.as_flat(phi))
                inner_loss = lin.task_loss
            else:
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
        "lin": lin,
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
    engine=None,
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
            first_order=first_order, loss=loss, hvp_chunk=hvp_chunk, backend=backend, engine=engine,
        )
        if xq.shape[0] != support[0].shape[0]:
            raise ValueError(f"query has T={xq.shape[0]} tasks but support has T={support[0].shape[0]}")
        net = select_engine(model, theta, xq, loss, engine, backend)
        with _batch_stats_only(model):
            if net is not None:
                logits = functional_logits(net, dict(phi), xq)
                outer = F.cross_entropy(logits.flatten(0, 1), yq.flatten(), reduction="none").view(yq.shape).mean(1)
            else:
                outer = vmap(task_loss)(dict(phi), xq, yq)
        grads = torch.autograd.grad(outer.sum(), [leaves[k] for k in theta], allow_unused=True)
    meta = {k: (g if g is not None else torch.zeros_like(theta[k])) for k, g in zip(theta, grads)}
    info = {"outer_loss": outer.detach(), "inner_loss": phi.inner_loss, **(phi.info or {})}
    return meta, info
