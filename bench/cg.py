"""One CG iteration's vector work (everything but the matvec): fused kernels vs eager PyTorch.

Fused: ``imaml::cg_dots`` + ``imaml::cg_update`` (2 passes over [T, P]). Eager: the
package's reference (same masking/breakdown semantics) and a plain textbook iteration
without masks, both in PyTorch ops.
"""

import torch

from imaml_kernels import dispatch, ops, reference

from .common import markdown_table, time_fn


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


def run(T=32, P=113_221, dtype=torch.float32, device="cpu", backends=None, repeat=20):
    """Time one iteration per backend; returns rows ``(backend, ms, GB/s, ratio vs eager ref)``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(T, P, generator=g, dtype=dtype).to(device) for _ in range(4)]
    Ap = base[3].abs() + 0.1
    base[2] = base[1].clone()  # p = r, as at the first iteration
    thresh = torch.zeros(T, dtype=torch.float64, device=device)
    bytes_moved = (3 + 7) * T * P * base[0].element_size()  # dots: 3 reads; update: 4 reads + 3 writes
    results = {}
    x, r, p = (t.clone() for t in base[:3])

    def reset():
        # Every timed call restores r and p so values stay bounded across repeats; the
        # reset's own time is measured once and subtracted from every row.
        r.copy_(base[1])
        p.copy_(base[1])

    t_reset = time_fn(reset, device=device, repeat=repeat)[0]

    def timed(fn):
        return max(time_fn(lambda: (fn(), reset()), device=device, repeat=repeat)[0] - t_reset, 1e-9)

    names = backends or [b for b in ("cuda", "triton", "cpu") if not dispatch.backend_problems(b, device, dtype)]
    if torch.device(device).type == "cpu":
        names = [n for n in names if n != "triton"]  # the interpreter is not a performance path
    for name in names + ["reference"]:
        partials, chunk = ops.cg.cg_partials(x, name)
        s_in = torch.zeros(T, dtype=torch.int32, device=device)
        s_out = torch.zeros_like(s_in)
        it = torch.zeros_like(s_in)
        kern = dispatch.kernels(x.device, x.dtype, name)
        dots, update = kern.cg_dots, kern.cg_update

        def step():
            dots(r, p, Ap, partials, chunk)
            update(x, r, p, Ap, partials, s_in, s_out, it, thresh, chunk)

        results[name] = timed(step)
    rr = (r * r).sum(1, keepdim=True)
    status = torch.zeros(T, dtype=torch.int32, device=device)
    results["eager (masked, same semantics)"] = timed(lambda: _masked_eager(x, r, p, Ap, thresh, status))
    results["eager (plain, no masks)"] = timed(lambda: _plain_eager(x, r, p, Ap, rr))
    ref = results["eager (masked, same semantics)"]
    rows = [
        (name, f"{sec * 1e3:.2f}", f"{bytes_moved / sec / 1e9:.1f}", f"{ref / sec:.2f}x")
        for name, sec in results.items()
    ]
    return rows, results


def run_solve(T=32, P=113_221, dtype=torch.float32, device="cpu", iters=5, repeat=10):
    """A full ``cg_solve`` of ``iters`` iterations per backend (diagonal SPD matvec, so the
    vector work dominates): rows ``(backend, ms / solve, ms / iteration)``."""
    import imaml_kernels as ik

    g = torch.Generator(device="cpu").manual_seed(1)
    d = (torch.rand(T, P, generator=g, dtype=dtype) + 0.5).to(device)
    b = torch.randn(T, P, generator=g, dtype=dtype).to(device)
    names = [n for n in ("cuda", "triton", "cpu") if not dispatch.backend_problems(n, device, dtype)]
    if torch.device(device).type == "cpu":
        names = [n for n in names if n != "triton"]
    results = {}
    for name in names + ["reference"]:
        results[name] = time_fn(lambda: ik.cg_solve(lambda v: d * v, b, iters=iters, backend=name), device=device, repeat=repeat)[0]
    rows = [(name, f"{sec * 1e3:.2f}", f"{sec * 1e3 / iters:.2f}") for name, sec in results.items()]
    return rows, results


def copy_bandwidth(T, P, dtype, device):
    """Measured device copy bandwidth (GB/s, read + write) for a [T, P] tensor."""
    a = torch.randn(T, P, dtype=dtype, device=device)
    b = torch.empty_like(a)
    sec = time_fn(lambda: b.copy_(a), device=device, repeat=20)[0]
    return 2 * a.numel() * a.element_size() / sec / 1e9


def main(args):
    device = args.device
    rows, results = run(T=args.tasks, P=args.params, device=device, repeat=args.repeat)
    print(f"\n## CG iteration vector work: T={args.tasks}, P={args.params}, float32, {device}\n")
    print("(GB/s counts the fused kernels' 10 vector passes for every row; 'ratio' is speed vs eager PyTorch with the same semantics; 'reference' is the float64-accumulating test oracle)\n")
    print(markdown_table(("backend", "ms / iteration", "effective GB/s", "ratio"), rows))
    bw = copy_bandwidth(args.tasks, args.params, torch.float32, device)
    print(f"\nmeasured copy bandwidth: {bw:.1f} GB/s")
    fused = [n for n in ("cuda", "triton", "cpu") if n in results]
    for n in fused:
        eff = 10 * args.tasks * args.params * 4 / results[n] / 1e9
        print(f"{n}: fused vs eager (same semantics) = {results['eager (masked, same semantics)'] / results[n]:.2f}x "
              f"(target >= 3x on CPU), vs the float64 reference = {results['reference'] / results[n]:.1f}x, vs plain eager = {results['eager (plain, no masks)'] / results[n]:.2f}x, "
              f"{100 * eff / bw:.0f}% of copy bandwidth (target >= 80% on GPU)")
    solve_rows, _ = run_solve(T=args.tasks, P=args.params, device=device, repeat=max(3, args.repeat // 2))
    print(f"\n## Full 5-iteration cg_solve (diagonal matvec), T={args.tasks}, P={args.params}, float32, {device}\n")
    print(markdown_table(("backend", "ms / solve", "ms / iteration"), solve_rows))
    return rows
