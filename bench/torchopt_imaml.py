"""torchopt's implicit-differentiation iMAML, written the way its iMAML example uses the API:
one ``torchopt.nn.ImplicitMetaGradientModule`` per task, an inner ``torchopt.SGD`` loop on
``objective()`` (cross-entropy + (λ/2)‖φ − θ‖²), and the backward system solved by
``torchopt.linear_solve.solve_normal_cg`` with a fixed iteration count.

An optional extra of the benchmark (``pip install -r requirements-bench.txt``); the suite
prints a message instead when torchopt is absent.
"""

import torch
import torch.nn.functional as F


def torchopt_available():
    try:
        import torchopt  # noqa: F401

        return True
    except ImportError:
        return False


def _inner_net_class(cg_iters):
    import torchopt

    class InnerNet(torchopt.nn.ImplicitMetaGradientModule, linear_solve=torchopt.linear_solve.solve_normal_cg(maxiter=cg_iters, atol=0.0)):
        def __init__(self, meta_net, steps, lr, lam):
            super().__init__()
            self.meta_net = meta_net
            self.net = torchopt.module_clone(meta_net, by="deepcopy", detach_buffers=True)
            self.steps, self.lr, self.lam = steps, lr, lam

        def forward(self, x):
            return self.net(x)

        def objective(self, x, y):
            prox = sum(((p - m) ** 2).sum() for p, m in zip(self.parameters(), self.meta_parameters()))
            return F.cross_entropy(self(x), y) + 0.5 * self.lam * prox

        def solve(self, x, y):
            params = tuple(self.parameters())
            opt = torchopt.SGD(params, lr=self.lr)
            with torch.enable_grad():
                for _ in range(self.steps):
                    loss = self.objective(x, y)
                    opt.zero_grad()
                    loss.backward(inputs=params)
                    opt.step()
            return self

    return InnerNet


def torchopt_meta_grad(model, tasks, *, lam, inner_steps, inner_lr, cg_iters):
    """Sum over tasks of torchopt's implicit meta-gradient, one task at a time; returns a
    dict shaped like ``model.named_parameters()`` (``tasks = (x_s, y_s, x_q, y_q)``)."""
    x_s, y_s, x_q, y_q = tasks
    InnerNet = _inner_net_class(cg_iters)
    for p in model.parameters():
        p.grad = None
    for t in range(x_s.shape[0]):
        inner = InnerNet(model, inner_steps, inner_lr, lam)
        inner.solve(x_s[t], y_s[t])
        F.cross_entropy(inner(x_q[t]), y_q[t]).backward()
    return {k: p.grad for k, p in model.named_parameters()}
