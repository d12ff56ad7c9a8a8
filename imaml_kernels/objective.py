"""The objective inner solvers and the implicit backward work on, behind one protocol.

A *task objective* is ``L̂_t(φ_t)`` for T tasks at once. Two implement it:

- :class:`EngineObjective`: the fused network engine (:class:`~imaml_kernels.engine.BatchedNet`);
- :class:`FuncObjective`: any model through ``torch.func`` under ``vmap``.

Its methods: ``loss(phi) -> [T]`` and ``loss_and_grad(phi) -> ([T], grads)`` on dicts of
``[T, ...]``; ``descend(theta_flat, lam, phi0_flat, steps, lr)`` (``steps`` fused proximal
gradient steps, or ``None`` where there is no fused loop); and ``linearize(phi_flat)``, which
returns a **linearisation**: the objective at a flat ``[T, P]`` point, whose HVPs reuse one
primal pass (the engine's :class:`~imaml_kernels.engine.Linearization`, or
:class:`FuncLinearization`):

- ``loss [T]``, ``grad [T, P]`` (θ's order);
- ``hvp(v, out=None)``: ``H_t v_t`` with ``v`` and the result in the linearisation's *work*
  order (the engine's own parameter order; θ's order on the generic path);
- ``to_work(v)`` / ``from_work(v)``: θ's order to the work order and back.

:class:`ProximalObjective` adds the proximal term ``(λ_t/2)‖φ_t − θ‖²`` (written once, in
:func:`proximal_term`) and is what every inner solver receives. λ is a Python number, a
``[T]`` tensor or per coordinate (:mod:`imaml_kernels.lam`) throughout (:func:`lam_like`
broadcasts each against a tensor).
"""

import contextlib
import copy
import functools
import weakref
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from .hvp import HVP_MODES, batched_hvp
from .lam import PerCoordinate
from .layout import ParamLayout

__all__ = [
    "task_loss_fn", "proximal_term", "lam_like", "batch_stats_only", "differentiable_attention", "randomness_checked", "TaskObjective", "FuncObjective",
    "FuncLinearization", "EngineObjective", "ProximalObjective", "one_task_loss",
]


def task_loss_fn(model, loss: Optional[Callable] = None) -> Callable:
    """``f(params_t, x_t, y_t) -> scalar`` for one task: ``loss(model(params_t, x_t), y_t)``.

    ``model`` is an ``nn.Module`` (called through ``functional_call`` with its buffers;
    parameters missing from ``params_t`` are the module's own) or ``f(params, x) -> out``;
    ``loss`` defaults to cross-entropy. The one task loss of the package (the implicit op,
    the trainer and the evaluator use it).
    """
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


def lam_like(lam, t: torch.Tensor, key: Optional[str] = None):
    """λ against ``t``: a Python number stays one (no launch); a ``[T]`` tensor becomes
    ``[T, 1, ...]`` of ``t``'s dtype; a :class:`~imaml_kernels.lam.PerCoordinate` becomes
    ``[1, P]`` against a flat ``t [T, P]`` in θ's order, or, with ``key``, parameter ``key``'s
    ``[1, *shape]`` against its ``[T, *shape]``."""
    if isinstance(lam, PerCoordinate):
        return lam.param(key, t) if key is not None else lam.row(t)
    if not isinstance(lam, torch.Tensor):
        return lam
    return lam.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))


def proximal_term(phi, theta, lam):
    """``(½ Σ_i λ_i (φ_t − θ)_i² [T], λ (φ_t − θ))`` for ``phi`` a ``[T, P]`` tensor (``theta``
    ``[P]``) or a dict of ``[T, ...]`` tensors (``theta`` a dict of unbatched ones); ``lam`` a
    number, a ``[T]`` tensor or per coordinate."""
    if isinstance(phi, torch.Tensor):
        d = phi - theta.to(phi.dtype)
        g = lam_like(lam, d) * d
        return 0.5 * (g * d).sum(1), g
    sq, g = 0, {}
    for k, p in phi.items():
        d = p - theta[k]
        g[k] = lam_like(lam, d, k) * d
        sq = sq + (g[k] * d).reshape(p.shape[0], -1).sum(1)
    return 0.5 * sq, g


@contextlib.contextmanager
def batch_stats_only(model):
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


# ------------------------------------------------------------------------ task objectives


class TaskObjective:
    """The protocol (see the module docstring); ``layout`` is θ's :class:`ParamLayout`."""

    layout: ParamLayout
    batch: tuple

    def loss(self, phi: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss_and_grad(self, phi: Mapping[str, torch.Tensor]):
        raise NotImplementedError

    def linearize(self, phi: torch.Tensor):
        raise NotImplementedError

    def subset(self, lo: int, hi: int) -> "TaskObjective":
        """The objective of tasks ``lo:hi`` (a plan that runs tasks in chunks needs it)."""
        raise NotImplementedError

    def descend(self, theta_flat, lam, phi0, steps: int, lr: float, proximal: bool = True,
                pull_back: bool = False) -> Optional[torch.Tensor]:
        return None


class EngineObjective(TaskObjective):
    """The fused engine's cross-entropy of the network. ``lean``: its linearisations hold no
    patch buffers (:meth:`~imaml_kernels.engine.BatchedNet.linearize`), for plans with a memory
    bound."""

    def __init__(self, net, batch, lean=False):
        self.net, self.layout, self.batch, self.lean = net, net.layout, tuple(batch), lean

    def subset(self, lo, hi):
        """The objective of tasks ``lo:hi``."""
        return EngineObjective(self.net, tuple(b[lo:hi] for b in self.batch), self.lean)

    def loss(self, phi):
        return self.net.loss(self.layout.as_flat(phi), *self.batch)

    def loss_and_grad(self, phi):
        v, g = self.net.loss_and_grad(self.layout.as_flat(phi), *self.batch)
        return v, self.layout.unflatten(g)

    def linearize(self, phi):
        return self.net.linearize(phi, *self.batch, lean=self.lean)

    def descend(self, theta_flat, lam, phi0, steps, lr, proximal=True, pull_back=False):
        return self.net.inner_loop(theta_flat, *self.batch, lam=lam, steps=steps, lr=lr, phi0=phi0, proximal=proximal,
                                   pull_back=pull_back)


# The HVP mode "auto" settled on, per model (weakly) and loss: a fallback is found once.
_AUTO_MODE = weakref.WeakKeyDictionary()
# torch.compile'd functions of the generic path, per model (weakly), loss and kind: compiled once.
_COMPILED = weakref.WeakKeyDictionary()


def _compiled(model, loss, kind, make):
    """``torch.compile(make())``, made once per (model, loss, kind) and reused (dynamo's own
    cache would see a new closure each call)."""
    try:
        store = _COMPILED.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: compiled per call
        return torch.compile(make(), dynamic=False)
    fn = store.get((loss, kind))
    if fn is None:
        fn = store[(loss, kind)] = torch.compile(make(), dynamic=False)
    return fn


@contextlib.contextmanager
def differentiable_attention():
    """Attention that ``vmap`` and every derivative go through: scaled-dot-product attention on
    its math backend (the fused CPU/CUDA kernels have no forward-mode or second derivative and
    no vmap batching rule), and ``nn.MultiheadAttention``'s / ``nn.TransformerEncoderLayer``'s
    inference fast path off (an eval-mode layer would take it, and it has no derivative)."""
    if torch.compiler.is_compiling():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


_math_sdpa = differentiable_attention


def randomness_checked(fn):
    """``fn()``, with torch's vmap randomness error as one line that names the option."""
    try:
        return fn()
    except RuntimeError as exc:
        if "randomness" not in str(exc):
            raise
        raise ValueError("the model draws random numbers (dropout in training mode?) under vmap: pass randomness='different' "
                         "(each task its own draws) or 'same' (one draw for every task), or put the model in eval mode") from None


def _rng_now(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def one_task_loss(task_loss, params, batch):
    """``vmap(task_loss, randomness="error")`` for a batch of **one** task, without ``vmap``:
    the task's own call on its parameters ``params`` (unbatched: ``{name: [...]}``) and
    ``batch[i][0]``, its loss as ``[1]``. A whole meta-gradient of the ResNet-12 of ``bench
    models`` ran 1.3-1.6x slower through ``vmap`` over one task than through the plain call
    (batching rules move the task dimension into channels and back around every op). A random draw raises as ``vmap``'s
    ``randomness="error"`` does (the generator's state is compared around the call)."""
    device = batch[0].device
    before = _rng_now(device)
    out = task_loss(params, *(b[0] for b in batch))
    if not torch.equal(before, _rng_now(device)):
        raise RuntimeError("vmap: called random operation while in randomness error mode (a task's call drew random "
                           "numbers, or another thread drew some meanwhile: pass randomness='different' or 'same')")
    return out.unsqueeze(0)


class FuncObjective(TaskObjective):
    """Any model: ``task_loss(params_t, *batch_t)`` under ``vmap``.

    HVPs in ``hvp_mode``: ``"revrev"`` linearises once (:class:`FuncLinearization` keeps the
    support loss's gradient graph, and every product is one backward pass through it);
    ``"fwdrev"`` recomputes each product forward-over-reverse (for models with an op that has no
    double backward); ``"auto"``: the first, falling back to the second on such an op, the
    choice remembered under ``key`` (``(model, loss)``).

    ``psi``: the parameters meta-learned but not adapted (a dict, for the cross term)."""

    def __init__(self, task_loss, layout, batch, *, hvp_mode="auto", key=None, psi=None, compiled=False, randomness="error"):
        if hvp_mode not in HVP_MODES + ("auto",):
            raise ValueError(f"hvp_mode must be one of {HVP_MODES + ('auto',)}, got {hvp_mode!r}")
        self.task_loss, self.layout, self.batch = task_loss, layout, tuple(batch)
        self.hvp_mode, self.psi, self.compiled = hvp_mode, dict(psi or {}), bool(compiled)
        # How random ops (dropout) behave across the tasks under vmap: "error" (torch's default),
        # "different" (each task its own draws) or "same".
        self.randomness = randomness
        # "auto" remembers its choice per (model, loss): both outlive this call's task_loss closure.
        self._key, self._sub = key if isinstance(key, tuple) else (key if key is not None else task_loss, None)
        r = dict(randomness=randomness)
        self._loss = vmap(task_loss, **r)
        self._vmap_grad = (_compiled(self._key, self._sub, "grad", lambda: vmap(grad(task_loss), **r)) if compiled
                           else vmap(grad(task_loss), **r))
        self._vmap_grad_value = vmap(grad_and_value(task_loss), **r)

    def subset(self, lo, hi):
        """The objective of tasks ``lo:hi`` (shares everything but the batch)."""
        sub = copy.copy(self)
        sub.batch = tuple(b[lo:hi] for b in self.batch)
        return sub

    # Attention runs on the math SDPA backend here too: the fused kernels have no vmap batching
    # rule (each would fall back to a loop over the tasks).

    def _one(self):
        """One task, eager, no random draws to arrange: the task's own call, without vmap
        (:func:`one_task_loss`)."""
        return (self.batch[0].shape[0] == 1 and self.randomness == "error" and not self.compiled
                and not torch.compiler.is_compiling())

    def _losses(self, params, one):
        """The tasks' losses ``[T]``: ``params`` ``{name: [T, ...]}``, or with ``one`` the single
        task's unbatched parameters."""
        return one_task_loss(self.task_loss, params, self.batch) if one else self._loss(params, *self.batch)

    def loss(self, phi):
        with _math_sdpa():
            one = self._one()
            return self._losses({k: v[0] for k, v in phi.items()} if one else dict(phi), one)

    def _grads(self, phi, value=False):
        """Every task's gradient ``{name: [T, ...]}`` (and with ``value`` its loss ``[T]``).

        Eagerly: the ``vmap``'d forward, then one ordinary backward of the tasks' summed loss
        (task t's loss depends on its own parameters only, so the sum's gradient in them is its
        own). Against ``vmap(grad(·))``, which runs the backward under ``vmap``: 43-45 against
        54 ms a gradient on the ResNet-12 of ``bench models`` (T = 4), equal on the
        transformer and the MLP (Zen 5, 2 threads, fresh processes); and it never imports
        ``torch._dynamo`` (``torch.func.grad`` does: 65-72 MiB of modules). Compiled, or
        while tracing: ``vmap(grad(·))``."""
        if self.compiled or torch.compiler.is_compiling():
            return (self._vmap_grad_value if value else self._vmap_grad)(dict(phi), *self.batch)
        one = self._one()  # one task: its own call, leaves without the task dimension
        with torch.enable_grad():
            leaves = {k: (t[0] if one else t).detach().requires_grad_() for k, t in phi.items()}
            loss = self._losses(leaves, one)
            if loss.requires_grad:
                gs = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
            else:  # no parameter reaches the loss
                gs = [None] * len(leaves)
        g = {k: torch.zeros_like(t) if d is None else d for (k, t), d in zip(leaves.items(), gs)}
        if one:
            g = {k: d.unsqueeze(0) for k, d in g.items()}
        return (g, loss.detach()) if value else g

    def loss_and_grad(self, phi):
        with _math_sdpa():
            g, v = self._grads(phi, value=True)
        return v, g

    def linearize(self, phi):
        return FuncLinearization(self, phi)

    def descend(self, theta_flat, lam, phi0, steps, lr, proximal=True, pull_back=False):
        """Proximal GD on a flat ``[T, P]`` buffer, in place: per step the gradients (one
        ``vmap``'d backward), then ``φ ← lerp(φ, θ, lr λ) − lr g`` parameter by parameter (no
        other ``[T, P]`` temporaries)."""
        phi = phi0.clone(memory_format=torch.contiguous_format)
        views = self.layout.unflatten(phi)
        theta = self.layout.unflatten(theta_flat.reshape(1, -1).to(phi.dtype))
        if self._one() and not isinstance(lam, (torch.Tensor, PerCoordinate)):
            self._descend_one(views, theta, lam * lr, steps, lr, proximal, pull_back)
            return phi
        w = {k: lam_like(lam, p, k) * lr for k, p in views.items()}
        for _ in range(steps):
            with _math_sdpa():
                grads = self._grads(views)
            for k, p in views.items():
                if proximal:  # φ − lr(g + λ(φ − θ)) = lerp(φ, θ, lr λ) − lr g, with g taken at φ
                    p.lerp_(theta[k], w[k])
                p.sub_(grads[k], alpha=lr)
        if pull_back:
            for k, p in views.items():
                p.lerp_(theta[k], w[k])
        return phi

    def _descend_one(self, views, theta, w, steps, lr, proximal, pull_back):
        """:meth:`descend` for one task and a scalar λ, the same arithmetic in fewer ops: the
        task's parameters are leaves made once (views of φ's buffer, updated in place between
        the steps' gradients), and each step's update is two ``_foreach`` calls, where the
        general loop makes each step's leaves anew and updates parameter by parameter (on the
        ResNet-12 of ``bench models``, 25 parameters, six small ops each a step)."""
        names = list(views)
        leaves = [views[k][0].detach().requires_grad_() for k in names]
        anchor = [theta[k][0] for k in names]
        with _math_sdpa():
            for _ in range(steps):
                with torch.enable_grad():
                    loss = one_task_loss(self.task_loss, dict(zip(names, leaves)), self.batch)
                    gs = (torch.autograd.grad(loss.sum(), leaves, allow_unused=True) if loss.requires_grad
                          else [None] * len(leaves))
                with torch.no_grad():
                    if proximal:  # φ − lr(g + λ(φ − θ)) = lerp(φ, θ, lr λ) − lr g, with g taken at φ
                        torch._foreach_lerp_(leaves, anchor, w)
                    used = [(p, g) for p, g in zip(leaves, gs) if g is not None]
                    if used:
                        torch._foreach_sub_([p for p, _ in used], [g for _, g in used], alpha=lr)
        if pull_back:
            with torch.no_grad():
                torch._foreach_lerp_(leaves, anchor, w)

    # -- HVPs

    def _settled_mode(self):
        if self.hvp_mode != "auto":
            return self.hvp_mode
        try:
            return _AUTO_MODE.get(self._key, {}).get(self._sub)
        except TypeError:  # a key that cannot be weakly referenced
            return None

    def _remember(self, mode):
        with contextlib.suppress(TypeError):
            _AUTO_MODE.setdefault(self._key, {})[self._sub] = mode

    @property
    def mode(self) -> Optional[str]:
        """The HVP mode in use (``None`` while "auto" has not run a product yet)."""
        return self._settled_mode()

    def hvp(self, phi, v, mode):
        """``H_t v_t`` recomputed from scratch (no linearisation), flat ``[T, P]`` in and out;
        compiled: through ``torch.compile`` (reverse-over-reverse: dynamo cannot trace a jvp there)."""
        un = self.layout.unflatten
        f = self.task_loss
        if self.compiled:
            fn = _compiled(self._key, self._sub, "hvp", lambda: lambda p, t, *b: batched_hvp(f, p, t, *b, mode="revrev"))
        else:
            fn = functools.partial(batched_hvp, f, mode=mode, randomness=self.randomness)
        with _math_sdpa():
            return self.layout.flatten(fn(un(phi), un(v), *self.batch))

    def cross_vjp(self, phi, u, mode) -> Dict[str, torch.Tensor]:
        """``Σ_t (∂²L̂_t/∂ψ∂φ) u_t`` recomputed: for each non-adapted parameter ψ, the gradient
        in ψ of ``Σ_t <∇φ L̂_t(φ_t, ψ), u_t>`` (``phi``, ``u`` flat ``[T, P]``)."""
        un = self.layout.unflatten
        f = self.task_loss

        def one(ph, uu, ps, *b):
            if mode == "revrev":
                def inner(q):
                    gphi = grad(lambda p: f({**p, **q}, *b))(ph)
                    return sum((gphi[k] * uu[k]).sum() for k in gphi)
            else:
                def inner(q):
                    return torch.func.jvp(lambda p: f({**p, **q}, *b), (ph,), (uu,))[1]
            return grad(inner)(ps)

        dims = (0, 0, None) + (0,) * len(self.batch)
        with _math_sdpa():
            out = vmap(one, in_dims=dims, randomness=self.randomness)(un(phi), un(u), self.psi, *self.batch)
        return {k: t.sum(0) for k, t in out.items()}


def _rng_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def _replaying(state, device):
    """Run with the generator at ``state`` (``None``: as it is), then restore it."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


class FuncLinearization:
    """:meth:`FuncObjective.linearize`: the protocol (see the module docstring) in θ's order
    (the work order is θ's: ``to_work``/``from_work`` return their argument).

    In ``"revrev"`` mode (and first, in ``"auto"``) the support loss and its gradient are
    computed once with their graph kept (``create_graph``; ψ as leaves too); every HVP and the
    cross term are then one backward pass through that graph, with no primal recompute. On an op
    without a double backward "auto" falls back to recomputed forward-over-reverse products for
    good. Under ``torch.compile`` each product is recomputed reverse-over-reverse."""

    def __init__(self, task, phi):
        self.task, self.phi = task, phi
        self._vg = self._graph = None
        # Recomputed products replay the random draws (dropout masks) of this one state, so every
        # product of a solve sees the same masks and the solve's operator stays symmetric.
        self._rng = _rng_state(phi.device) if task.randomness != "error" else None
        self.mode = "revrev" if torch.compiler.is_compiling() or task.compiled else task._settled_mode()
        if self.mode in (None, "revrev") and not (torch.compiler.is_compiling() or task.compiled):
            self._graph = self._build()

    def _build(self):
        task = self.task
        with torch.enable_grad(), _math_sdpa():
            # One leaf per parameter (not views of one flat leaf: the backward of each view would
            # zero-fill a whole [T, P] buffer, for every parameter and every product).
            one = task._one()  # one task: its own call, leaves without the task dimension
            leaves = {k: (t[0] if one else t).detach().requires_grad_() for k, t in task.layout.unflatten(self.phi).items()}
            psi = {k: p.detach().requires_grad_() for k, p in task.psi.items()}
            f = task.task_loss
            if one:
                loss = one_task_loss(lambda p, *b: f({**p, **psi}, *b), leaves, task.batch)
            else:
                loss = vmap(lambda p, *b: f({**p, **psi}, *b), randomness=task.randomness)(leaves, *task.batch)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()), create_graph=True)
        self._vg = (loss.detach(), [g.detach() for g in grads])  # the flat gradient made on first use
        return list(leaves.values()), grads, psi

    def _value_grad(self):
        if self._vg is None:
            v, g = self.task.loss_and_grad(self.task.layout.unflatten(self.phi))
            self._vg = (v, self.task.layout.flatten(g))
        elif isinstance(self._vg[1], list):
            T = self.phi.shape[0]
            self._vg = (self._vg[0], torch.cat([g.reshape(T, -1) for g in self._vg[1]], 1))
        return self._vg

    @property
    def loss(self):
        return self._vg[0] if self._vg is not None else self.task.loss(self.task.layout.unflatten(self.phi))

    @property
    def grad(self):
        return self._value_grad()[1]

    def _through_graph(self, wrt, v):
        _, g, _ = self._graph
        try:
            with _math_sdpa():
                out = torch.autograd.grad(g, wrt, v, retain_graph=True, allow_unused=True)
        except (RuntimeError, NotImplementedError):
            if self.mode == "revrev":
                raise  # asked for explicitly: the model's own error
            self.mode, self._graph = "fwdrev", None  # "auto": an op without a double backward
            return None
        if self.mode is None:
            self.mode = "revrev"
            self.task._remember("revrev")
        return out

    def hvp(self, v, out=None):
        """``H_t v_t`` (flat ``[T, P]``); ``out``: a buffer from an earlier call to write into."""
        if self._graph is not None:
            leaves = self._graph[0]
            vs = [u.to(leaf.dtype).reshape(leaf.shape) for u, leaf in zip(self.task.layout.unflatten(v).values(), leaves)]
            res = self._through_graph(leaves, vs)
            if res is not None:
                parts = [r.reshape(v.shape[0], -1).to(v.dtype) for r in res]  # a low-precision model: back to v's dtype
                return torch.cat(parts, 1, out=out) if out is not None and not torch.compiler.is_compiling() else torch.cat(parts, 1)
        if self.mode is None or self.mode == "fwdrev":
            if self.task.hvp_mode == "auto":
                self.task._remember("fwdrev")
            self.mode = "fwdrev"
        with _replaying(self._rng, self.phi.device):
            return self.task.hvp(self.phi, v.to(self.phi.dtype), self.mode).to(v.dtype)

    def cross_vjp(self, u) -> Dict[str, torch.Tensor]:
        """``Σ_t (∂²L̂_t/∂ψ∂φ) u_t`` for the non-adapted parameters ψ."""
        if not self.task.psi:
            return {}
        if self._graph is not None:
            leaves, psi = self._graph[0], self._graph[2]
            us = [t.to(self.phi.dtype).reshape(leaf.shape) for t, leaf in zip(self.task.layout.unflatten(u).values(), leaves)]
            res = self._through_graph(list(psi.values()), us)
            if res is not None:
                return {k: torch.zeros_like(p) if r is None else r for (k, p), r in zip(psi.items(), res)}
        with _replaying(self._rng, self.phi.device):
            return self.task.cross_vjp(self.phi, u, self.mode or "fwdrev")

    def to_work(self, v):
        return v

    from_work = to_work


# ------------------------------------------------------------------------ proximal objective


class ProximalObjective:
    """``L̂_t(φ_t) + (λ_t/2)‖φ_t − θ‖²`` for all T tasks; what inner solvers minimise.

    Args:
        task_loss: ``f(params_t, *batch_t) -> scalar`` for one task (:func:`task_loss_fn`).
        theta: dict of shared meta-parameters (unbatched; detached here).
        lam: λ > 0: a Python number, a ``[T]`` tensor or a
            :class:`~imaml_kernels.lam.PerCoordinate` (:func:`imaml_kernels.lam.resolve`).
        batch: tensors with leading T (the support set).
        hvp_mode, compiled: the generic path's HVPs and whether its gradient and HVP run
            through ``torch.compile`` (:class:`FuncObjective`); ``key``: the ``(model, loss)``
            under which its "auto" mode remembers a fallback.
        psi: the model's parameters that are meta-learned but not adapted (generic path:
            :meth:`FuncObjective.cross_vjp`).
        engine: a :class:`~imaml_kernels.engine.BatchedNet` computing the same ``task_loss``
            (cross-entropy of the network): values, gradients and HVPs then run through the
            fused engine (:class:`EngineObjective`).
        task: a ready task objective (overrides ``task_loss``/``engine``).

    The dict methods take and return ``{name: [T, ...]}``; values are ``[T]``.
    :meth:`linearize` works on flat ``[T, P]`` buffers; :meth:`descend` is proximal gradient
    descent, fused where the task objective has a fused loop.
    """

    def __init__(self, task_loss, theta, lam, batch, engine=None, *, hvp_mode="auto", task=None, key=None, psi=None,
                 compiled=False, randomness="error", lean=False):
        self.theta = {k: v.detach() for k, v in theta.items()}
        self.lam = lam
        self.batch = tuple(batch)
        self.layout = ParamLayout.from_params(self.theta, batched=False)
        if task is None:
            if engine is not None:
                if engine.layout.names != self.layout.names or engine.layout.shapes != self.layout.shapes:
                    raise ValueError("the engine's parameter layout differs from theta's (names, order or shapes)")
                task = EngineObjective(engine, self.batch, lean)
            else:
                task = FuncObjective(task_loss, self.layout, self.batch, hvp_mode=hvp_mode, key=key, psi=psi, compiled=compiled,
                                     randomness=randomness)
        self.task = task
        self.engine = getattr(task, "net", None)

    @property
    def theta_flat(self) -> torch.Tensor:
        """θ as one ``[P]`` vector (made once while θ is unchanged: keyed by the tensors' versions)."""
        if torch.compiler.is_compiling():  # no cache state while tracing
            return self.layout.flatten({k: v.unsqueeze(0) for k, v in self.theta.items()})[0]
        key = tuple((id(v), v._version) for v in self.theta.values())
        if getattr(self, "_theta_flat_key", None) != key:
            self._theta_flat = self.layout.flatten({k: v.unsqueeze(0) for k, v in self.theta.items()})[0]
            self._theta_flat_key = key
        return self._theta_flat

    def subset(self, lo: int, hi: int) -> "ProximalObjective":
        """The objective of tasks ``lo:hi`` (θ and its flat copy shared; λ and the batch sliced)."""
        sub = copy.copy(self)
        sub.batch = tuple(b[lo:hi] for b in self.batch)
        sub.lam = self.lam[lo:hi] if isinstance(self.lam, torch.Tensor) else self.lam  # per coordinate: every task's
        sub.task = self.task.subset(lo, hi)
        return sub

    def task_value(self, phi):
        """``L̂_t(φ_t)`` ``[T]``."""
        return self.task.loss(phi)

    def value(self, phi):
        """Proximal objective ``[T]``."""
        return self.task.loss(phi) + proximal_term(phi, self.theta, self.lam)[0]

    def value_and_grad(self, phi):
        v, g = self.task.loss_and_grad(phi)
        pv, pg = proximal_term(phi, self.theta, self.lam)
        return v + pv, {k: g[k] + pg[k] for k in phi}

    def grad(self, phi):
        return self.value_and_grad(phi)[1]

    def task_hvp(self, phi, v):
        """``H_t v_t`` with ``H_t = ∇²L̂_t(φ_t)`` (no proximal term), dicts in and out."""
        flat = self.layout.flatten
        lin = self.linearize(flat(phi))
        return self.layout.unflatten(lin.from_work(lin.hvp(lin.to_work(flat(v)))))

    def hvp(self, phi, v):
        """``(H_t + λ_t I) v_t``: the Hessian of the proximal objective."""
        hv = self.task_hvp(phi, v)
        return {k: hv[k] + lam_like(self.lam, v[k], k) * v[k] for k in v}

    def linearize(self, phi: torch.Tensor):
        """The task objective ``L̂_t`` (no proximal term: add :func:`proximal_term`) linearised at
        a flat ``phi [T, P]``: the protocol of the module docstring; with the engine every HVP
        reuses one primal pass."""
        return self.task.linearize(phi)

    def descend(self, phi0, steps: int, lr: float, proximal: bool = True, pull_back: bool = False):
        """``steps`` of ``φ ← φ − lr ∇(L̂_t(φ) + (λ_t/2)‖φ − θ‖²)`` from the dict ``phi0``
        (not modified): one fused loop on a flat buffer where the task objective has one.

        ``proximal=False``: the steps use the task loss alone, ``φ ← φ − lr ∇L̂_t(φ)``.
        ``pull_back``: then one ``φ ← φ − lr λ_t (φ − θ)`` (both: the authors' released
        procedure)."""
        fused = self.task.descend(self.theta_flat, self.lam, self.layout.as_flat(phi0), steps, lr, proximal, pull_back)
        if fused is not None:
            return self.layout.unflatten(fused)
        phi = {k: v.clone() for k, v in phi0.items()}
        for _ in range(steps):
            g = self.grad(phi) if proximal else self.task.loss_and_grad(phi)[1]
            for k in phi:
                phi[k].sub_(lr * g[k])
        if pull_back:
            for k in phi:
                phi[k].sub_(lam_like(self.lam, phi[k], k) * lr * (phi[k] - self.theta[k].to(phi[k].dtype)))
        return phi
