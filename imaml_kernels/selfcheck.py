"""Self-check: run every backend that can run here on a small multi-task CG problem and print
a table (error against a dense float64 solve, time, iterations); then the fused network
engine's HVP on each backend against a float64 ``torch.func`` reference.

Usage: ``python -m imaml_kernels.selfcheck`` (``TRITON_INTERPRET=1`` adds Triton on a CPU).
"""

import argparse
import platform
import time

import torch

from . import _ext
from .cg import cg_solve
from .dispatch import BACKENDS, backend_problems


def _problem(T, P, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(T, P, P, generator=g, dtype=torch.float64)
    A = M @ M.transpose(1, 2) / P + torch.eye(P, dtype=torch.float64)
    b = torch.randn(T, P, generator=g, dtype=torch.float64)
    x_star = torch.linalg.solve(A, b)
    return A.to(device, dtype), b.to(device, dtype), x_star


def run(T=8, P=300, iters=60):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for dtype in (torch.float64, torch.float32):
            A, b, x_star = _problem(T, P, device, dtype)
            for backend in BACKENDS:
                problems = backend_problems(backend, device, dtype)
                if problems:
                    rows.append((backend, device, str(dtype)[6:], "-", "-", "-", "skipped: " + problems[0]))
                    continue
                start = time.perf_counter()
                x, info = cg_solve(lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1), b, iters=iters, backend=backend)
                if device == "cuda":
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - start) * 1e3
                err = ((x.double().cpu() - x_star).norm() / x_star.norm()).item()
                tol = 1e-10 if dtype == torch.float64 else 1e-4
                ok = "ok" if err <= tol and not info.breakdown.any() else "FAILED"
                rows.append((backend, device, str(dtype)[6:], f"{err:.1e}", f"{ms:.1f}", str(info.iterations.max().item()), ok))
    return rows


def run_engine(T=3, N=5):
    """The engine's HVP (OmniglotConv, 8 filters) per backend vs float64 torch.func."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, jvp, vmap

    from .engine import BatchedNet
    from .dispatch import kernels
    from .nets import OmniglotConv

    torch.manual_seed(0)
    model = OmniglotConv(5, channels=8).double()
    net0 = BatchedNet(model, model.input_shape)
    base = model.flat_params()
    p = base + 0.05 * torch.randn(T, base.numel(), dtype=torch.float64)
    v = torch.randn_like(p)
    x = torch.randn(T, N, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(N).remainder(5).expand(T, -1).contiguous()

    def f(q, xb, yb):
        params = {k: t[0] for k, t in net0.layout.unflatten(q[None]).items()}
        return F.cross_entropy(functional_call(model, params, (xb,)), yb)

    ref = vmap(lambda a, t, xb, yb: jvp(lambda q: grad(f)(q, xb, yb), (a,), (t,))[1])(p, v, x, y)
    rows = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for dtype in (torch.float64, torch.float32):
            for backend in ("cpu", "triton", "reference"):
                probe = torch.empty(0, device=device, dtype=dtype)
                try:
                    got = kernels(probe.device, probe.dtype, backend).engine_backend
                    if got != backend:
                        raise RuntimeError(f"resolves to {got}")
                except RuntimeError as e:
                    rows.append((backend, device, str(dtype)[6:], "-", "-", "skipped: " + str(e).split(": ", 1)[-1][:60]))
                    continue
                net = BatchedNet(model, model.input_shape, backend=backend)
                args = [t.to(device, dtype) for t in (p, v, x)]
                start = time.perf_counter()
                hv = net.hvp(args[0], args[1], args[2], y.to(device))
                if device == "cuda":
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - start) * 1e3
                err = ((hv.double().cpu() - ref).norm() / ref.norm()).item()
                ok = "ok" if err <= (1e-10 if dtype == torch.float64 else 1e-5) else "FAILED"
                rows.append((backend, device, str(dtype)[6:], f"{err:.1e}", f"{ms:.1f}", ok))
    return rows


def _print_table(head, rows):
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--iters", type=int, default=60)
    args = parser.parse_args(argv)
    print(f"imaml_kernels self-check | {platform.processor() or platform.machine()} | torch {torch.__version__}"
          f" | extension: {'built' if _ext.HAS_EXT else 'missing'}{' with CUDA' if _ext.HAS_CUDA_EXT else ''}")
    print(f"problem: T={args.tasks} SPD systems of size P={args.size}, {args.iters} CG iterations\n")
    rows = run(args.tasks, args.size, args.iters)
    _print_table(("backend", "device", "dtype", "rel. error", "ms", "iters", "status"), rows)
    print("\nfused engine: HVP of OmniglotConv (8 filters), T=3, 5 images per task, vs float64 torch.func\n")
    erows = run_engine()
    _print_table(("backend", "device", "dtype", "rel. error", "ms", "status"), erows)
    failed = [r for r in rows + erows if r[-1] == "FAILED"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
