"""One CG iteration's vector work (everything but the matvec): fused kernels vs eager PyTorch.

Fused: ``imaml::cg_dots`` + ``imaml::cg_update`` (2 passes over [T, P]). Eager: the
package's reference (same masking/breakdown semantics) and a plain textbook iteration
without masks, both in PyTorch ops.
"""

import torch

from imaml_kernels import dispatch, ops, reference

from . import fresh
from .common import markdown_table, time_fn
from .fresh import Prepared, Row


def _plain_eager(x, r, p, Ap, rr):
    # The textbook iteration as public code writes it (no masks, no guards).
    alpha = rr / (p * Ap).sum(1, keepdim=True)
    x.add_(alpha * p)
    r.sub_(alpha * Ap)
    rr_new = (r * r).sum(1, keepdim=True)
    p.mul_(rr_new / rr).add_(r)
    return rr_new


def _masked_eager(x, r, p, Ap, thresh, status):
    # Same semantics as the kernels (per-task masks and guards), written the way eager
    # PyTorch code would: native-dtype reductions, torch.where masks.
    sums = torch.stack([(r * r).sum(1), (p * Ap).sum(1), (r * Ap).sum(1), (Ap * Ap).sum(1)], -1).double()
    alpha, beta, status, update = reference.cg_step(sums, thresh, status)
    a, b = alpha.to(x.dtype)[:, None], beta.to(x.dtype)[:, None]
    x.add_(a * p)
    r.sub_(a * Ap)
    p.mul_(b).add_(r)
    return status


EAGER_MASKED, EAGER_PLAIN = "eager (masked, same semantics)", "eager (plain, no masks)"


def _fused_backends(device, dtype=torch.float32):
    names = [b for b in ("cuda", "triton", "cpu") if not dispatch.backend_problems(b, device, dtype)]
    if torch.device(device).type == "cpu":
        names = [n for n in names if n != "triton"]  # the interpreter is not a performance path
    return names


def prepare_iteration(kind, T, P, dtype="float32", device="cpu"):
    """In a worker (:mod:`bench.fresh_worker`): one CG iteration of ``kind`` (a backend,
    ``"reference"``, :data:`EAGER_MASKED` or :data:`EAGER_PLAIN`) on fresh ``[T, P]`` vectors.
    Every timed call restores r and p so values stay bounded across repeats; the reset is
    the baseline, its own time measured and subtracted."""
    dtype = getattr(torch, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(T, P, generator=g, dtype=dtype).to(device) for _ in range(4)]
    Ap = base[3].abs() + 0.1
    base[2] = base[1].clone()  # p = r, as at the first iteration
    thresh = torch.zeros(T, dtype=torch.float64, device=device)
    x, r, p = (t.clone() for t in base[:3])
    status = torch.zeros(T, dtype=torch.int32, device=device)

    def reset():
        r.copy_(base[1])
        p.copy_(base[1])

    if kind == EAGER_MASKED:
        fn = lambda: _masked_eager(x, r, p, Ap, thresh, status)  # noqa: E731
    elif kind == EAGER_PLAIN:
        rr = (r * r).sum(1, keepdim=True)
        fn = lambda: _plain_eager(x, r, p, Ap, rr)  # noqa: E731
    else:
        partials, chunk = ops.cg.cg_partials(x, kind)
        s_out, it = torch.zeros_like(status), torch.zeros_like(status)
        kern = dispatch.kernels(x.device, x.dtype, kind)

        def fn():
            kern.cg_dots(r, p, Ap, partials, chunk)
            kern.cg_update(x, r, p, Ap, partials, status, s_out, it, thresh, chunk)

    return Prepared(lambda: (fn(), reset()), baseline=reset)


def run(T=32, P=113_221, dtype=torch.float32, device="cpu", backends=None, repeat=20, rounds=1):
    """Time one iteration per backend, each in fresh worker processes (:mod:`bench.fresh`);
    rows ``(backend, ms, GB/s, speed vs eager with the same semantics)`` and ``{backend: s}``."""
    bytes_moved = (3 + 7) * T * P * torch.finfo(dtype).bits // 8  # dots: 3 reads; update: 4 reads + 3 writes
    names = (backends or _fused_backends(device, dtype)) + ["reference", EAGER_MASKED, EAGER_PLAIN]
    kw = dict(T=T, P=P, dtype=str(dtype).removeprefix("torch."), device=device)
    rows = [Row(n, n, "bench.cg:prepare_iteration", {"kind": n, **kw}, warmup=3, repeat=repeat, device=device) for n in names]
    measured = fresh.run_rows(rows, rounds=rounds)
    ref = measured[EAGER_MASKED]
    table = [(n, f"{m.seconds * 1e3:.2f}", f"{bytes_moved / m.seconds / 1e9:.1f}", fresh.ratio_text(fresh.ratio(ref, m), rounds))
             if m.ok else (n, f"not measured: {m.error}", "", "") for n, m in measured.items()]
    return table, {n: m.seconds for n, m in measured.items() if m.ok}


def prepare_solve(backend, T, P, iters, dtype="float32", device="cpu"):
    """In a worker: a full ``cg_solve`` of ``iters`` iterations on ``backend`` with a diagonal
    SPD matvec (so the vector work dominates)."""
    import imaml_kernels as ik

    dtype = getattr(torch, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    d = (torch.rand(T, P, generator=g, dtype=dtype) + 0.5).to(device)
    b = torch.randn(T, P, generator=g, dtype=dtype).to(device)
    return lambda: ik.cg_solve(lambda v: d * v, b, iters=iters, backend=backend)


def run_solve(T=32, P=113_221, dtype=torch.float32, device="cpu", iters=5, repeat=10, rounds=1):
    """A full ``cg_solve`` per backend, each in fresh worker processes: rows ``(backend,
    ms / solve, ms / iteration)`` and ``{backend: s}``."""
    kw = dict(T=T, P=P, iters=iters, dtype=str(dtype).removeprefix("torch."), device=device)
    names = _fused_backends(device, dtype) + ["reference"]
    rows = [Row(n, n, "bench.cg:prepare_solve", {"backend": n, **kw}, warmup=3, repeat=repeat, device=device) for n in names]
    measured = fresh.run_rows(rows, rounds=rounds)
    table = [(n, f"{m.seconds * 1e3:.2f}", f"{m.seconds * 1e3 / iters:.2f}") if m.ok else (n, f"not measured: {m.error}", "")
             for n, m in measured.items()]
    return table, {n: m.seconds for n, m in measured.items() if m.ok}


def copy_bandwidth(T, P, dtype, device):
    """Measured device copy bandwidth (GB/s, read + write) for a [T, P] tensor."""
    a = torch.randn(T, P, dtype=dtype, device=device)
    b = torch.empty_like(a)
    sec = time_fn(lambda: b.copy_(a), device=device, repeat=20)[0]
    return 2 * a.numel() * a.element_size() / sec / 1e9


def main(args):
    device, rounds = args.device, getattr(args, "rounds", 1)
    rows, results = run(T=args.tasks, P=args.params, device=device, repeat=args.repeat, rounds=rounds)
    print(f"\n## CG iteration vector work: T={args.tasks}, P={args.params}, float32, {device}\n")
    print(fresh.method(rounds, "milliseconds per iteration") + "\n")
    print("(GB/s counts the fused kernels' 10 vector passes for every row; 'ratio' is speed vs eager PyTorch with the same semantics; 'reference' is the float64-accumulating test oracle)\n")
    print(markdown_table(("backend", "ms / iteration", "effective GB/s", "ratio"), rows))
    bw = copy_bandwidth(args.tasks, args.params, torch.float32, device)
    print(f"\nmeasured copy bandwidth: {bw:.1f} GB/s")
    fused = [n for n in ("cuda", "triton", "cpu") if n in results]
    for n in fused:
        eff = 10 * args.tasks * args.params * 4 / results[n] / 1e9
        vs = {k: f"{results[k] / results[n]:.2f}x" if k in results else "not measured" for k in (EAGER_MASKED, "reference", EAGER_PLAIN)}
        print(f"{n}: fused vs eager (same semantics) = {vs[EAGER_MASKED]} (target >= 3x on CPU), vs the float64 reference = "
              f"{vs['reference']}, vs plain eager = {vs[EAGER_PLAIN]}, {100 * eff / bw:.0f}% of copy bandwidth (target >= 80% on GPU)")
    solve_rows, _ = run_solve(T=args.tasks, P=args.params, device=device, repeat=max(3, args.repeat // 2), rounds=rounds)
    print(f"\n## Full 5-iteration cg_solve (diagonal matvec), T={args.tasks}, P={args.params}, float32, {device}\n")
    print(markdown_table(("backend", "ms / solve", "ms / iteration"), solve_rows))
    return rows
