"""Test helpers: random SPD operators and comparisons, shared by the test files."""

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
