"""CUDA-only checks, run by bench/gpu_check.sh on a lent GPU (skipped on CPU machines).

The same kernels' logic is tested on the CPU by test_cg.py/test_ops.py (C++ and the Triton
interpreter); here: CUDA and compiled-Triton agreement with the float64 reference,
bit-for-bit determinism, full opcheck of the Triton ops, and CUDA-graph capture of cg_solve.
"""

import pytest
import torch

import imaml_kernels as ik
from imaml_kernels import ops, reference
from helpers import rel_err, spd_operator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("T,P", [(1, 1), (3, 127), (32, 113_221)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iterates_match_reference_gpu(backend, T, P, dtype):
    op, b = spd_operator(T, P, 10.0, seed=P)
    for k in (1, 3, 5):
        x_ref, count_ref, _ = reference.cg_solve(op, b, iters=k)
        op_cuda = lambda v: op(v.cpu()).to(v.device)  # noqa: E731  (matvec on the CPU is fine here)
        x, info = ik.cg_solve(op_cuda, b.to("cuda", dtype), iters=k, backend=backend)
        tol = 1e-11 if dtype == torch.float64 else 1e-5
        assert rel_err(x.cpu(), x_ref) <= tol
        assert torch.equal(info.iterations.cpu(), count_ref)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_bitwise(backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    d = torch.rand(32, 113_221, generator=g, device="cuda") + 0.5
    b = torch.randn(32, 113_221, generator=g, device="cuda")
    x1, _ = ik.cg_solve(lambda v: d * v, b, iters=5, backend=backend)
    x2, _ = ik.cg_solve(lambda v: d * v, b, iters=5, backend=backend)
    assert torch.equal(x1, x2)


def test_triton_opcheck_full():
    T, P = 3, 5000
    r, p, Ap = (torch.randn(T, P, device="cuda") for _ in range(3))
    partials = torch.empty(T, 2, 4, dtype=torch.float64, device="cuda")
    torch.library.opcheck(ops.cg_dots_triton, (r, p, Ap, partials, 4096))
    torch.library.opcheck(ops.cg_dots, (r, p, Ap, partials, 4096))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend):
    T, P = 8, 50_000
    d = torch.rand(T, P, device="cuda") + 0.5
    b = torch.randn(T, P, device="cuda")
    mv = lambda v: d * v  # noqa: E731
    x_eager, _ = ik.cg_solve(mv, b, iters=5, backend=backend)  # warm-up (compiles Triton)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ik.cg_solve(mv, b, iters=5, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_graph, info = ik.cg_solve(mv, b, iters=5, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x_graph, x_eager)


# --------------------------------------------------------------------------- fused engine


def _engine_problem(dtype, device, T=4, N=5, channels=16):
    from imaml_kernels.nets import OmniglotConv

    torch.manual_seed(0)
    model = OmniglotConv(5, channels=channels).to(dtype)
    base = model.flat_params()
    params = base + 0.01 * torch.randn(T, base.numel(), dtype=dtype)
    x = torch.rand(T, N, 1, 28, 28, dtype=dtype)
    y = torch.arange(N).remainder(5).expand(T, -1).contiguous()
    v = torch.randn_like(params)
    return model, [t.to(device) for t in (params, x, y, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_engine_cuda_matches_cpu_float64(dtype):
    model, (p, x, y, v) = _engine_problem(dtype, "cuda")
    lin = model.batched().linearize(p, x, y)
    model64 = model.double()
    ref = model64.batched(backend="reference").linearize(p.cpu().double(), x.cpu().double(), y.cpu())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(lin.loss.cpu().double(), ref.loss) < tol
    assert rel_err(lin.grad.cpu().double(), ref.grad) < tol
    assert rel_err(lin.hvp(v).cpu().double(), ref.hvp(v.cpu().double())) < tol


def test_engine_meta_step_cuda_graph_replays_the_eager_step():
    from imaml_kernels.graphs import CUDAGraphStep
    from imaml_kernels.nets import OmniglotConv

    torch.manual_seed(0)
    T = 8
    model = OmniglotConv(5).cuda()
    theta = dict(model.named_parameters())
    batch = [torch.rand(T, 5, 1, 28, 28, device="cuda"), torch.arange(5, device="cuda").expand(T, -1).contiguous(),
             torch.rand(T, 5, 1, 28, 28, device="cuda"), torch.arange(5, device="cuda").expand(T, -1).contiguous()]

    def meta_grad(xs, ys, xq, yq):
        g, info = ik.implicit_meta_grad(model, theta, (xs, ys), (xq, yq), lam=2.0, inner=ik.GD(16, 0.1), cg_iters=5, engine=True)
        return torch.cat([g[k].reshape(-1) for k in theta]), info["outer_loss"]

    eager = meta_grad(*batch)[0].clone()
    graphed = CUDAGraphStep(meta_grad, batch)
    out = graphed(*batch)[0]
    torch.cuda.synchronize()
    assert rel_err(out, eager) < 1e-5
    new = [torch.rand_like(batch[0]), batch[1], torch.rand_like(batch[2]), batch[3]]
    assert rel_err(graphed(*new)[0].clone(), meta_grad(*new)[0]) < 1e-5
