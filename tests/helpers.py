"""Test helpers shared by the test files: random SPD operators, comparisons, and a tiny float64
task batch with its proximal objective and a float64 proximal-GD loop."""

import torch


class HouseholderSPD:
    """``A_t = Q_t diag(lam_t) Q_t^T`` with ``Q_t`` a product of two random Householder
    reflections: a dense SPD matrix with a chosen spectrum whose matvec costs O(P), so CG
    tests at P = 1000..50000 stay cheap. ``lam`` is ``[T, P]`` (any sign, for breakdown tests).
    """

    def __init__(self, lam, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.lam = lam.to(torch.float64)
        T, P = lam.shape
        self.u = [torch.nn.functional.normalize(torch.randn(T, P, generator=g, dtype=torch.float64), dim=1) for _ in range(2)]
        self._cast = {}

    def _params(self, dtype):
        if dtype not in self._cast:
            self._cast[dtype] = (self.lam.to(dtype), [u.to(dtype) for u in self.u])
        return self._cast[dtype]

    def __call__(self, v):
        lam, (u1, u2) = self._params(v.dtype)
        reflect = lambda w, u: w - 2.0 * (w * u).sum(-1, keepdim=True) * u  # noqa: E731
        return reflect(reflect(lam * reflect(reflect(v, u1), u2), u2), u1)

    def dense(self):
        T, P = self.lam.shape
        out = torch.empty(T, P, P, dtype=torch.float64)
        for j in range(P):
            e = torch.zeros(T, P, dtype=torch.float64)
            e[:, j] = 1.0
            out[:, :, j] = self(e)
        return out


def spd_operator(T, P, cond, seed=0):
    """Return ``(op, b)``: a :class:`HouseholderSPD` with condition number ``cond`` (eigenvalues
    uniform in [1, cond], both ends included) and a random ``b`` ``[T, P]`` float64."""
    g = torch.Generator().manual_seed(seed + 1)
    lam = 1.0 + (cond - 1.0) * torch.rand(T, P, generator=g, dtype=torch.float64)
    lam[:, 0] = 1.0
    if P > 1:
        lam[:, 1] = cond
    return HouseholderSPD(lam, seed), torch.randn(T, P, generator=g, dtype=torch.float64)


def batched_matvec(A):
    return lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def dense_solve(A, b):
    """torch.linalg.solve task by task: the batched MKL LU path has been seen to fail
    spuriously ("Pivots given to lu_solve...") for [T, 1000, 1000] after other work."""
    return torch.stack([torch.linalg.solve(A[t], b[t]) for t in range(A.shape[0])])


# --------------------------------------------------------------------------- a tiny float64 task batch

LAMS = {"lam-number": 2.0, "lam-per-task": (0.5, 2.0, 3.0)}  # λ as a Python number or a [T] tensor (T = 3)


def mlp_problem(T=3, N=8, sizes=(4, 6, 3), seed=0):
    """A tiny float64 classification problem: ``(model, theta, x, y)``: an ``MLP(sizes)``, its
    parameters θ (detached) and a support batch ``x [T, N, sizes[0]]``, ``y [T, N]``."""
    from imaml_kernels.nets import MLP

    torch.manual_seed(seed)
    model = MLP(list(sizes)).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, sizes[0], generator=g, dtype=torch.float64)
    return model, {k: v.detach() for k, v in model.named_parameters()}, x, torch.randint(0, sizes[-1], (T, N), generator=g)


def lam_value(name):
    """λ of :data:`LAMS` ``name``: a number, or a ``[T]`` float64 tensor."""
    lam = LAMS[name]
    return torch.tensor(lam, dtype=torch.float64) if isinstance(lam, tuple) else lam


def near(theta, T, scale=0.3, seed=1):
    """Per-task points ``θ + scale N(0, 1)``: a dict of ``[T, ...]`` float64 tensors."""
    g = torch.Generator().manual_seed(seed)
    return {k: v.expand(T, *v.shape) + scale * torch.randn(T, *v.shape, generator=g, dtype=v.dtype) for k, v in theta.items()}


def proximal_objective(kind, model, theta, lam, x, y):
    """``ik.ProximalObjective`` of cross-entropy on ``(x, y)`` through ``kind``: ``"func"``
    (torch.func, :class:`~imaml_kernels.objective.FuncObjective`) or ``"engine"`` (the fused
    engine that ``ik.select_engine`` picks, :class:`~imaml_kernels.objective.EngineObjective`)."""
    import imaml_kernels as ik

    engine = ik.select_engine(model, theta, x) if kind == "engine" else None
    assert (engine is not None) == (kind == "engine"), "the engine does not take this model"
    return ik.ProximalObjective(ik.task_loss_fn(model), theta, lam, (x, y), engine=engine)


def proximal_descent(model, theta, lam, x, y, phi0, steps, lr, proximal=True, pull_back=False):
    """The float64 ground truth of proximal gradient descent: ``steps`` of
    ``φ ← φ − lr (∇L̂_t(φ) + λ_t (φ − θ))`` with the gradients of the tasks' cross-entropy by
    autograd (``proximal=False``: of the task loss alone), then with ``pull_back`` one
    ``φ ← φ − lr λ_t (φ − θ)``."""
    from torch.func import functional_call

    lam = torch.as_tensor(lam, dtype=torch.float64).expand(x.shape[0])
    phi = {k: v.detach().clone() for k, v in phi0.items()}

    def pull(k):  # λ_t (φ_t − θ)
        return lam.view(-1, *[1] * theta[k].dim()) * (phi[k] - theta[k])

    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_() for k, v in phi.items()}
        total = sum(torch.nn.functional.cross_entropy(functional_call(model, {k: v[t] for k, v in leaves.items()}, (x[t],)), y[t])
                    for t in range(x.shape[0]))
        grads = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))
        phi = {k: phi[k] - lr * (grads[k] + pull(k) if proximal else grads[k]) for k in phi}
    if pull_back:
        phi = {k: phi[k] - lr * pull(k) for k in phi}
    return phi


def peak_bytes(fn):
    """The peak of the bytes held by PyTorch's CPU allocator while ``fn()`` runs
    (:func:`bench.memtrack.allocator_peak_bytes`: the allocator's own allocation and free records):
    what ``fn`` allocates on top of what was alive before, independent of timing and of the
    process's resident size."""
    from bench.memtrack import allocator_peak_bytes

    return allocator_peak_bytes(fn)
