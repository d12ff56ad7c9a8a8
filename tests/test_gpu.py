"""CUDA-only checks, run by ``bench/gpu_check.sh`` on a lent GPU (every test skips without CUDA).

The kernels' logic is tested on the CPU by test_ops.py, test_fused_cpu.py and
test_fused_triton.py (C++ kernels and the Triton interpreter). Here, on CUDA tensors, with the
Triton kernels compiled for the GPU (conftest.py turns the interpreter on only where no CUDA
device exists; ``test_triton_kernels_are_compiled_not_interpreted`` fails if it is on):

- ``torch.library.opcheck`` of every Triton op (``imaml::<name>_triton`` for every name in
  :data:`imaml_kernels.ops.SPECS`) and of the CUDA C++ CG ops, on small valid inputs built by
  one builder per op family (:data:`CASES`);
- every op family (Triton; CUDA C++ for CG) against its float64 twin in
  :mod:`imaml_kernels.reference`: float64 within 1e-10 (max-norm relative), float32 within 4x
  torch's own float32 error (the same twin run in float32 on the GPU on the same inputs) or
  ``FLOOR32``, whichever is larger; integer outputs exactly;
- bit-for-bit determinism of the CUDA and Triton CG kernels at the paper's size (T=32,
  P=113,221); a CPU-only engine op given CUDA tensors raises;
- ``cg_solve`` on the GPU against the float64 reference CG; CUDA-graph capture and replay of a
  CG solve and of a whole meta-step (two replays bit-identical, equal to the eager step within
  float32 tolerance); the engine on CUDA against the float64 CPU reference;
- what only a GPU shows (issue 26): CG at P = 0 (one block, not an empty grid), NaN kept by the
  compiled clamps (BatchNorm's M2 in either launch plan, CG's rr_new), one CUDA runtime in the
  process, P past the grid's axis-1 limit, and ``CUDAGraphStep``'s hazards (the engine's data
  caches after capture, a batch off the device, a tensor ``lr`` reaching the replays).

Everything stays on the device (matvecs included). Shapes are small and shared between tests
so each Triton specialisation compiles once: the file runs in well under 2 minutes on an H100.
"""

import copy
import math
import os
import re

import pytest
import torch

import imaml_kernels as ik
from imaml_kernels import _ext, dispatch, reference
from imaml_kernels.ops import SPECS
from helpers import rel_err, spd_operator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

F32, F64 = torch.float32, torch.float64
DTYPES = [F32, F64]
EPS = 1e-5
TOL64 = 1e-10  # float64 kernels vs the float64 twin (max-norm relative)
FLOOR32 = 2e-6  # float32: the smallest tolerance, when torch's own float32 error is smaller still
RATIO32 = 4.0  # float32: kernel error <= RATIO32 x torch's float32 error on the same inputs
CG_CHUNK = 4096  # the CUDA C++ and Triton CG block length (ops.cg.CUDA_CG_CHUNK == TRITON_CG_CHUNK)
PAPER_T, PAPER_P = 32, 113_221  # Omniglot 5-way 1-shot: T tasks, P parameters of OmniglotConv(5)


# --------------------------------------------------------------------------- input builders
#
# One builder per op family: ``builder(dtype, device) -> {op name: [(case id, args), ...]}``,
# args being the op's own arguments (contiguous, labels int64), drawn in float64 and rounded
# to ``dtype``; derived inputs (BatchNorm statistics, max-pool argmax, CG partials) are the
# float64 twin's on the rounded inputs, so every case is a valid, consistent call.


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale + shift


def _cast(tensors, dtype, device):
    return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in tensors]


def cg_family(dtype, device, T=4, P=5003):
    """``cg_dots`` (poisoned NaN partials) and ``cg_update`` (partials of the same vectors;
    tasks 0, 1 step, task 2 has converged (threshold inf), task 3 broke down earlier)."""
    g = _gen(1)
    x, r, p = _cast([_randn(g, T, P) for _ in range(3)], dtype, device)
    Ap = p * (0.5 + torch.rand(T, P, generator=g, dtype=F64)).to(device=device, dtype=dtype)  # p.Ap > 0
    nb = math.ceil(P / CG_CHUNK)
    poisoned = torch.full((T, nb, 4), float("nan"), dtype=F64, device=device)
    partials = torch.empty(T, nb, 4, dtype=F64, device=device)
    reference.cg_dots(r.double(), p.double(), Ap.double(), partials, CG_CHUNK)
    status_in = torch.zeros(T, dtype=torch.int32, device=device)
    status_in[min(3, T - 1)] = reference.CG_BREAKDOWN
    status_out = torch.full((T,), -7, dtype=torch.int32, device=device)  # poisoned
    iters = torch.arange(T, dtype=torch.int32, device=device)
    thresh = torch.zeros(T, dtype=F64, device=device)
    thresh[min(2, T - 1)] = float("inf")
    cid = f"T{T}-P{P}"
    return {
        "cg_dots": [(cid, (r, p, Ap, poisoned, CG_CHUNK))],
        "cg_update": [(cid, (x, r, p, Ap, partials, status_in, status_out, iters, thresh, CG_CHUNK))],
    }


def conv_family(dtype, device):
    """im2col/col2im: 5 channels, 3x3 stride 2 pad 1 (im2col's whole-patch-row path, as the
    first layer) and 16 channels, 3x3 stride 1 pad 1 (its channel-tile path)."""
    g = _gen(2)
    out = {"im2col": [], "col2im": []}
    for (T, N, H, W, C), (k, s, pad) in (((2, 3, 9, 9, 5), (3, 2, 1)), ((2, 2, 7, 7, 16), (3, 1, 1))):
        Ho, Wo = (H + 2 * pad - k) // s + 1, (W + 2 * pad - k) // s + 1
        x, gcols = _cast([_randn(g, T, N, H, W, C), _randn(g, T, N, Ho, Wo, k, k, C)], dtype, device)
        cid = f"{T}x{N}x{H}x{W}x{C}-k{k}s{s}p{pad}"
        out["im2col"].append((cid, (x, Ho, Wo, k, s, pad, pad)))
        out["col2im"].append((cid, (gcols, H, W, s, pad, pad)))
    return out


def batchnorm_family(dtype, device):
    """The four BatchNorm stages: R = 37 rows (one program per task and channel block, no
    ReLU) and R = 300 (rows split, partial sums combined; with ReLU)."""
    out = {n: [] for n in ("bn_fwd", "bn_bwd", "bn_tfwd", "bn_tbwd", "col2im_bn_bwd", "col2im_bn_tbwd")}
    for seed, (T, R, C, relu) in enumerate(((2, 37, 20, False), (2, 300, 20, True))):
        g = _gen(10 + seed)
        x, rx, gy, rgy = (_randn(g, T, R, C, scale=2.0, shift=0.5) for _ in range(4))
        gamma, beta, rgamma, rbeta = _randn(g, T, C, shift=0.3), _randn(g, T, C, scale=0.5), _randn(g, T, C), _randn(g, T, C)
        x, rx, gy, rgy, gamma, beta, rgamma, rbeta = _cast([x, rx, gy, rgy, gamma, beta, rgamma, rbeta], dtype, device)
        y, xhat, rstd = reference.bn_fwd(x.double(), gamma.double(), beta.double(), EPS, relu)
        relu_y = y if relu else None
        _, rxhat, a = reference.bn_tfwd(rx.double(), xhat, rstd, gamma.double(), rgamma.double(), rbeta.double(), relu_y)
        xhat, rstd, rxhat, a = _cast([xhat, rstd, rxhat, a], dtype, device)
        relu_y = None if relu_y is None else relu_y.to(dtype)
        cid = f"T{T}-R{R}-C{C}-{'relu' if relu else 'id'}"
        out["bn_fwd"].append((cid, (x, gamma, beta, EPS, relu)))
        out["bn_bwd"].append((cid, (gy, xhat, rstd, gamma, relu_y, torch.empty_like(gamma), torch.empty_like(gamma))))
        out["bn_tfwd"].append((cid, (rx, xhat, rstd, gamma, rgamma, rbeta, relu_y)))
        out["bn_tbwd"].append((cid, (gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, torch.empty_like(gamma), torch.empty_like(gamma))))
    # The backward gathering its cotangent from the next conv's patch cotangent (3x3, stride 2,
    # pad 1): R = N H W with N = 1 (R = 37 is prime: 1 x 37 x 1 images) or N = 3 (300 = 3 x 10 x 10).
    for seed, (T, N, H, W, C, relu) in enumerate(((2, 1, 37, 1, 20, False), (2, 3, 10, 10, 20, True))):
        g = _gen(20 + seed)
        R = N * H * W
        Ho, Wo = (H + 2 - 3) // 2 + 1, (W + 2 - 3) // 2 + 1
        x, gcols = _randn(g, T, R, C, scale=2.0, shift=0.5), _randn(g, T, N, Ho, Wo, 3, 3, C)
        gamma, beta = _randn(g, T, C, shift=0.3), _randn(g, T, C, scale=0.5)
        x, gcols, gamma, beta = _cast([x, gcols, gamma, beta], dtype, device)
        y, xhat, rstd = reference.bn_fwd(x.double(), gamma.double(), beta.double(), EPS, relu)
        xhat, rstd = _cast([xhat, rstd], dtype, device)
        relu_y = y.to(dtype).to(device) if relu else None
        out["col2im_bn_bwd"].append((f"T{T}-N{N}-{H}x{W}-C{C}", (gcols, H, W, 2, 1, 1, xhat, rstd, gamma, relu_y,
                                                                  torch.empty_like(gamma), torch.empty_like(gamma))))
        gy, rx, rgamma, rbeta = _cast([_randn(g, T, R, C), _randn(g, T, R, C), _randn(g, T, C), _randn(g, T, C)], dtype, device)
        _, rxhat, a = reference.bn_tfwd(rx.double(), xhat.double(), rstd.double(), gamma.double(), rgamma.double(),
                                        rbeta.double(), None if relu_y is None else relu_y.double())
        rxhat, a = _cast([rxhat, a], dtype, device)
        out["col2im_bn_tbwd"].append((f"T{T}-N{N}-{H}x{W}-C{C}", (gy, gcols, H, W, 2, 1, 1, xhat, rxhat, rstd, a, gamma, rgamma,
                                                                   relu_y, torch.empty_like(gamma), torch.empty_like(gamma))))
    return out


def maxpool_family(dtype, device):
    """2x2 max-pool of ``[2, 3, 7, 6, 5]`` (odd height: floor mode); argmax from the twin."""
    g = _gen(3)
    T, N, H, W, C = 2, 3, 7, 6, 5
    x, rx, gy = _cast([_randn(g, T, N, H, W, C), _randn(g, T, N, H, W, C), _randn(g, T, N, H // 2, W // 2, C)], dtype, device)
    _, idx = reference.maxpool_fwd(x.double())
    cid = f"{T}x{N}x{H}x{W}x{C}"
    return {
        "maxpool_fwd": [(cid, (x,))],
        "maxpool_gather": [(cid, (rx, idx))],
        "maxpool_scatter": [(cid, (gy, idx, H, W))],
    }


def softmax_ce_family(dtype, device):
    g = _gen(4)
    T, N, K = 3, 5, 7
    logits, rlogits = _cast([_randn(g, T, N, K, scale=3.0, shift=1.0), _randn(g, T, N, K)], dtype, device)
    y = torch.randint(0, K, (T, N), generator=g, dtype=torch.int64).to(device)
    prob = torch.softmax(logits.double(), -1).to(dtype)
    cid = f"T{T}-N{N}-K{K}"
    return {"softmax_ce": [(cid, (logits, y))], "softmax_ce_tangent": [(cid, (prob, rlogits))],
            "softmax_ce_bias": [(cid, (logits, y, torch.empty(T, K, dtype=dtype, device=device)))]}


def prox_family(dtype, device):
    """The proximal step with θ shared ``[P]`` and per task ``[T, P]``."""
    g = _gen(5)
    T, P = 3, 5003
    cases = []
    for theta_shape, cid in (((P,), "shared-theta"), ((T, P), "per-task-theta")):
        phi, grad, theta = _cast([_randn(g, T, P), _randn(g, T, P), _randn(g, *theta_shape)], dtype, device)
        lam = (_randn(g, T).abs() + 0.1).to(device=device, dtype=dtype)
        cases.append((cid, (phi, grad, theta, lam, 0.37)))
    return {"prox_step": cases}


FAMILIES = (cg_family, conv_family, batchnorm_family, maxpool_family, softmax_ce_family, prox_family)
BUILDERS = {name: fam for fam in FAMILIES for name in fam(F64, "cpu")}  # op name -> its family's builder


def cases(name, dtype, device="cuda"):
    """The ``[(case id, args)]`` of op ``name``."""
    return BUILDERS[name](dtype, device)[name]


def triton_op(name):
    return getattr(torch.ops.imaml, name + "_triton")


def kernel(name, backend):
    """``imaml::<name>_triton`` for ``"triton"``; ``imaml::<name>`` (the C++ kernel of the
    tensors' device: CUDA C++ on CUDA tensors) otherwise."""
    return triton_op(name) if backend == "triton" else getattr(torch.ops.imaml, name)


TRITON_OPS = sorted(n for n, s in SPECS.items() if s.triton is not None)
CUDA_OPS = sorted(n for n, s in SPECS.items() if s.cuda is not None)
CPU_ONLY_OPS = sorted(n for n, s in SPECS.items() if s.cpu is not None and s.cuda is None)
ACCURACY = [(n, "triton") for n in TRITON_OPS] + [(n, "cuda") for n in CUDA_OPS]


# --------------------------------------------------------------------------- comparison


def _mutated_positions(spec):
    """Positions (in the op's arguments) of the arguments ``spec`` writes."""
    names = re.findall(r"(\w+)\s*[,)]", spec.schema.split("->")[0])
    return [i for i, n in enumerate(names) if n in spec.mutates]


def run_op(fn, args, mutated):
    """``fn`` on copies of ``args`` -> its outputs: the returned tensors, then the written arguments."""
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    res = fn(*copies)
    res = () if res is None else res if isinstance(res, tuple) else (res,)
    return list(res) + [copies[i] for i in mutated]


def _to64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def max_rel(out, want):
    """Max-norm error of ``out`` relative to ``want``'s max-norm (the absolute error where ``want`` is 0)."""
    out, want = out.double(), want.double()
    if want.numel() == 0:
        return 0.0
    err = (out - want).abs().max().item()
    scale = want.abs().max().item()
    return err / scale if scale > 0 else err


def poison_allocator(device="cuda"):
    """Best effort: fill freed blocks of the caching allocator (both pools) with 0xFF bytes
    (NaN in float32/float64, 255 in uint8, -1 in int32), so that outputs the ops allocate
    with ``new_empty`` and leave partly unwritten show up."""
    small = [torch.full((256 * 1024,), 255, dtype=torch.uint8, device=device) for _ in range(16)]
    large = torch.full((64 << 20,), 255, dtype=torch.uint8, device=device)
    del small, large


def check_against_reference(name, fn, args, dtype, what):
    """``fn(*args)`` against the float64 twin of ``name`` on the same (rounded) inputs."""
    spec = SPECS[name]
    mutated = _mutated_positions(spec)
    want = run_op(spec.reference, _to64(args), mutated)
    ref32 = run_op(spec.reference, args, mutated) if dtype == F32 else None
    cuda = args[0].is_cuda
    if cuda:
        poison_allocator(args[0].device)
    got = run_op(fn, args, mutated)
    if cuda:
        torch.cuda.synchronize()
    assert len(got) == len(want), f"{what}: {len(got)} outputs, the twin has {len(want)}"
    for i, (o, w) in enumerate(zip(got, want)):
        assert o.shape == w.shape and o.device == args[0].device, f"{what} output {i}: {tuple(o.shape)} on {o.device}"
        if not w.is_floating_point():
            assert torch.equal(o, w.to(o.dtype)), f"{what} output {i}: integer output differs from the twin"
            continue
        expect_dtype = w.dtype if dtype == F64 else ref32[i].dtype
        assert o.dtype == expect_dtype, f"{what} output {i}: dtype {o.dtype}, expected {expect_dtype}"
        assert torch.isfinite(o).all(), f"{what} output {i}: not finite (unwritten elements?)"
        err = max_rel(o, w)
        tol = TOL64 if dtype == F64 else max(RATIO32 * max_rel(ref32[i], w), FLOOR32)
        assert err <= tol, f"{what} output {i}: relative error {err:.3g} > {tol:.3g}"


# --------------------------------------------------------------------------- the GPU itself


def test_triton_kernels_are_compiled_not_interpreted():
    """On a GPU the Triton kernels must run compiled: TRITON_INTERPRET=1 (conftest sets it only
    where no CUDA device exists; gpu_check.sh exports 0) would test the interpreter's arithmetic."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "TRITON_INTERPRET=1 on a CUDA machine"
    assert not _ext.triton_interpreted()
    import triton

    target = triton.runtime.driver.active.get_current_target()
    assert target.backend == "cuda", target


def test_cuda_extension_built_and_dispatch_picks_the_gpu_kernels(monkeypatch):
    from imaml_kernels import _ext

    monkeypatch.delenv("IMAML_BACKEND", raising=False)
    assert _ext.HAS_EXT and _ext.HAS_CUDA_EXT, f"the CUDA kernels are not built ({_ext.EXT_ERROR})"
    for dtype in DTYPES:
        k = dispatch.kernels("cuda", dtype)
        assert (k.backend, k.engine_backend) == ("cuda", "triton"), k


def test_every_op_has_an_input_builder():
    assert set(BUILDERS) == set(SPECS), set(SPECS) ^ set(BUILDERS)


# --------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("name", TRITON_OPS)
def test_opcheck_triton_op(name):
    for cid, args in cases(name, F32):
        torch.library.opcheck(triton_op(name), args)


@pytest.mark.parametrize("name", CUDA_OPS)
def test_opcheck_cuda_cg_op(name):
    for cid, args in cases(name, F32):
        torch.library.opcheck(kernel(name, "cuda"), args)


@pytest.mark.parametrize("name", CPU_ONLY_OPS)
def test_cpu_only_op_refuses_cuda_tensors(name):
    """``imaml::<name>`` has only its OpenMP kernel: CUDA tensors must raise, never reach it."""
    _, args = cases(name, F32)[0]
    with pytest.raises((NotImplementedError, RuntimeError)):
        kernel(name, "cuda")(*args)
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- op families vs float64


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,backend", ACCURACY, ids=[f"{n}-{b}" for n, b in ACCURACY])
def test_op_matches_float64_reference(name, backend, dtype):
    for cid, args in cases(name, dtype):
        check_against_reference(name, kernel(name, backend), args, dtype, f"{name}[{backend}] {cid} {dtype}")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cg_kernels_are_bitwise_deterministic_at_paper_size(backend):
    fam = cg_family(F32, "cuda", T=PAPER_T, P=PAPER_P)
    for name in ("cg_dots", "cg_update"):
        _, args = fam[name][0]
        mutated = _mutated_positions(SPECS[name])
        first, second = run_op(kernel(name, backend), args, mutated), run_op(kernel(name, backend), args, mutated)
        for i, (a, b) in enumerate(zip(first, second)):
            assert torch.equal(a, b), f"{name}[{backend}] output {i} differs between two runs"
    g = torch.Generator(device="cuda").manual_seed(0)
    d = torch.rand(PAPER_T, PAPER_P, generator=g, device="cuda") + 0.5
    b = torch.randn(PAPER_T, PAPER_P, generator=g, device="cuda")
    x1, _ = ik.cg_solve(lambda v: d * v, b, iters=5, backend=backend)
    x2, _ = ik.cg_solve(lambda v: d * v, b, iters=5, backend=backend)
    assert torch.equal(x1, x2)


# --------------------------------------------------------------------------- cg_solve


def _on_device(op, device):
    """The helpers' Householder SPD operator with its factors on ``device`` (matvec on the GPU)."""
    op = copy.copy(op)
    op.lam, op.u, op._cast = op.lam.to(device), [u.to(device) for u in op.u], {}
    return op


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("T,P", [(1, 1), (3, 127), (PAPER_T, PAPER_P)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_cg_solve_iterates_match_float64_reference(backend, T, P, dtype):
    op, b = spd_operator(T, P, 10.0, seed=P)
    op, b = _on_device(op, "cuda"), b.cuda()
    for k in (1, 3, 5):
        x_ref, count_ref, _ = reference.cg_solve(op, b, iters=k)
        x, info = ik.cg_solve(op, b.to(dtype), iters=k, backend=backend)
        if dtype == F64:
            tol = TOL64
        else:
            x_ref32, _, _ = reference.cg_solve(op, b.float(), iters=k)
            tol = max(RATIO32 * rel_err(x_ref32, x_ref), FLOOR32)
        err = rel_err(x, x_ref)
        assert err <= tol, f"{k} iterations: relative error {err:.3g} > {tol:.3g}"
        if P > 1:  # P = 1 converges after one step; whether r is then exactly 0 is rounding's choice
            assert torch.equal(info.iterations, count_ref)


# --------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    """A whole cg_solve (matvec on the device) captured once, replayed twice: bit-identical
    replays, equal to the eager solve."""
    T, P = 8, PAPER_P
    g = torch.Generator(device="cuda").manual_seed(1)
    d = torch.rand(T, P, generator=g, device="cuda") + 0.5
    b = torch.randn(T, P, generator=g, device="cuda")
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
    first = x_graph.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x_graph, first)
    assert torch.equal(first, x_eager)
    assert (info.iterations == 5).all()


META_T = 8


def _meta_batch(T=META_T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.arange(5, device="cuda").expand(T, -1).contiguous()
    return [torch.rand(T, 5, 1, 28, 28, generator=g, device="cuda"), y,
            torch.rand(T, 5, 1, 28, 28, generator=g, device="cuda"), y.clone()]


def test_engine_meta_step_cuda_graph_replays_the_eager_step():
    """The meta-gradient of a whole meta-step (16 fused inner steps, outer gradient, CG with
    HVPs) of the paper's network as one CUDA graph: two replays bit-identical, equal to the
    eager step; a new batch copied in gives the eager result on that batch."""
    from imaml_kernels.graphs import CUDAGraphStep
    from imaml_kernels.nets import OmniglotConv

    torch.manual_seed(0)
    model = OmniglotConv(5).cuda()
    theta = dict(model.named_parameters())
    batch = _meta_batch()

    def meta_grad(xs, ys, xq, yq):
        g, info = ik.implicit_meta_grad(model, theta, (xs, ys), (xq, yq), lam=2.0, inner=ik.GD(16, 0.1), cg_iters=5, engine=True)
        return torch.cat([g[k].reshape(-1) for k in theta]), info["outer_loss"]

    eager, eager_loss = (t.clone() for t in meta_grad(*batch))
    graphed = CUDAGraphStep(meta_grad, batch)
    first = [t.clone() for t in graphed(*batch)]
    second = graphed(*batch)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "two replays differ"
    assert rel_err(first[0], eager) < 1e-5 and rel_err(first[1], eager_loss) < 1e-5
    new = _meta_batch(seed=1)
    replayed = graphed(*new)[0].clone()
    assert rel_err(replayed, meta_grad(*new)[0]) < 1e-5


def test_train_meta_step_with_adam_is_one_cuda_graph():
    """train.meta_step (inner loop, implicit gradient, backward, capturable Adam step) captured
    as one graph. From the same restored state, two replays leave bit-identical parameters,
    and the gradients and statistics equal those of an eager step within float32 tolerance."""
    from imaml_kernels.graphs import CUDAGraphStep
    from imaml_kernels.nets import OmniglotConv
    from imaml_kernels.step import meta_step

    torch.manual_seed(0)
    model = OmniglotConv(5).cuda()
    theta = dict(model.named_parameters())
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, capturable=True)
    cfg = {"lam": 2.0, "cg_iters": 5, "cg_damping": 0.0, "lam_damping": 0.0}
    solver = ik.GD(16, 0.1)
    batch = _meta_batch()

    def step(*b):
        return meta_step(model, theta, opt, b, lam=cfg["lam"], inner=solver, solve=ik.CG(cfg["cg_iters"]))

    step(*batch)  # Adam's state exists after a first step
    torch.cuda.synchronize()
    state = [*params, *model.buffers(), *(t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
    snapshot = [t.detach().clone() for t in state]

    def restore():
        with torch.no_grad():
            for t, s in zip(state, snapshot):
                t.copy_(s)

    graphed = CUDAGraphStep(step, batch, warmup=2)  # its warm-up steps move the model: restore before each replay
    replays = []
    for _ in range(2):
        restore()
        stats = graphed(*batch).clone()
        torch.cuda.synchronize()
        replays.append((stats, [p.detach().clone() for p in params], [p.grad.clone() for p in params]))
    restore()
    eager_stats = step(*batch)
    torch.cuda.synchronize()
    (s1, p1, g1), (s2, p2, g2) = replays
    assert torch.equal(s1, s2) and all(torch.equal(a, b) for a, b in zip(p1 + g1, p2 + g2)), "two replays differ"
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    assert rel_err(flat(g1), flat([p.grad for p in params])) < 1e-5
    assert rel_err(s1[:3], eager_stats[:3]) < 1e-5  # outer loss, accuracy, inner loss
    before = flat(snapshot[: len(params)])
    assert rel_err(flat(p1) - before, flat(params) - before) < 1e-3  # the Adam updates


# --------------------------------------------------------------------------- fused engine


def _engine_problem(dtype, T=4, N=5, channels=16):
    from imaml_kernels.nets import OmniglotConv

    torch.manual_seed(0)
    model = OmniglotConv(5, channels=channels).double()
    base = model.flat_params()
    params = base + 0.01 * torch.randn(T, base.numel(), dtype=F64)
    x = torch.rand(T, N, 1, 28, 28, dtype=F64)
    y = torch.arange(N).remainder(5).expand(T, -1).contiguous()
    v = torch.randn_like(params)
    return model, (params, x, y, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_engine_cuda_matches_cpu_float64(dtype):
    """Loss, gradient and HVP of the engine on CUDA (Triton stages) against the float64
    reference engine on the CPU; float32 within 4x torch's own float32 error (the reference
    engine in float32 on the GPU) or 1e-5."""
    model64, (p, x, y, v) = _engine_problem(dtype)
    model = copy.deepcopy(model64).to(device="cuda", dtype=dtype)
    pc, xc, vc, yc = p.to("cuda", dtype), x.to("cuda", dtype), v.to("cuda", dtype), y.cuda()
    lin = model.batched().linearize(pc, xc, yc)
    ref = model64.batched(backend="reference").linearize(p, x, y)
    got = {"loss": lin.loss, "grad": lin.grad, "hvp": lin.hvp(vc)}
    want = {"loss": ref.loss, "grad": ref.grad, "hvp": ref.hvp(v)}
    if dtype == F32:
        r32 = model.batched(backend="reference").linearize(pc, xc, yc)
        torch32 = {"loss": r32.loss, "grad": r32.grad, "hvp": r32.hvp(vc)}
    for key, out in got.items():
        assert out.dtype == dtype and out.is_cuda
        err = rel_err(out.cpu(), want[key])
        tol = TOL64 if dtype == F64 else max(RATIO32 * rel_err(torch32[key].cpu(), want[key]), 1e-5)
        assert err < tol, f"{key}: relative error {err:.3g} > {tol:.3g}"


# --------------------------------------------------------------------------- issue 26: the GPU half's edges


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cg_at_p_zero(backend):
    """P = 0: one block per task (the CUDA kernels launched 0 blocks once: "invalid configuration
    argument"), zero partials, every task converged."""
    from imaml_kernels.ops.cg import cg_partials

    T = 3
    x, r, p, Ap = (torch.empty(T, 0, device="cuda") for _ in range(4))
    partials, chunk = cg_partials(r, backend)
    partials.fill_(float("nan"))
    kernel("cg_dots", backend)(r, p, Ap, partials, chunk)
    s_in, s_out = torch.zeros(T, dtype=torch.int32, device="cuda"), torch.full((T,), -7, dtype=torch.int32, device="cuda")
    iters = torch.zeros(T, dtype=torch.int32, device="cuda")
    kernel("cg_update", backend)(x, r, p, Ap, partials, s_in, s_out, iters, torch.zeros(T, dtype=F64, device="cuda"), chunk)
    torch.cuda.synchronize()
    assert torch.equal(partials, torch.zeros_like(partials)) and s_out.tolist() == [reference.CG_CONVERGED] * T
    sol, info = ik.cg_solve(lambda v: 2 * v, torch.empty(T, 0, device="cuda"), iters=3, backend=backend)
    assert sol.shape == (T, 0) and bool(info.converged.all()) and not bool(info.breakdown.any())


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cg_rr_new_nan_breaks_down_compiled(backend):
    """Finite partials whose rr_new is inf - inf (alpha = 1e300): a breakdown, compiled too
    (``tl.maximum`` compiled to max.f64 would return 0 for the NaN and step by 1e300)."""
    T, P = 2, 100
    g = torch.Generator(device="cuda").manual_seed(3)
    x, r, p = (torch.randn(T, P, generator=g, device="cuda", dtype=F64) for _ in range(3))
    Ap = 1.5 * p
    partials = torch.empty(T, 1, 4, dtype=F64, device="cuda")
    kernel("cg_dots", backend)(r, p, Ap, partials, CG_CHUNK)
    partials[0, 0] = torch.tensor([1.0, 1e-300, 1e10, 1.0], dtype=F64, device="cuda")
    s_in, s_out = torch.zeros(T, dtype=torch.int32, device="cuda"), torch.full((T,), -7, dtype=torch.int32, device="cuda")
    iters = torch.zeros(T, dtype=torch.int32, device="cuda")
    x0 = x.clone()
    kernel("cg_update", backend)(x, r, p, Ap, partials, s_in, s_out, iters, torch.zeros(T, dtype=F64, device="cuda"), CG_CHUNK)
    torch.cuda.synchronize()
    assert s_out.tolist() == [reference.CG_BREAKDOWN, 0] and iters.tolist() == [0, 1]
    assert torch.equal(x[0], x0[0])


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "row-splits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_bn_fwd_nan_propagates_compiled(monkeypatch, split, dtype):
    """A NaN in one channel: its rstd, xhat and y are NaN in one launch and with row splits
    alike, compiled (the M2 clamp keeps NaN: ``tl.where``, not ``max.f64``), and only there."""
    from imaml_kernels.triton import batchnorm as tbn

    if split:
        for name, v in (("BN_TARGET_PROGRAMS", 10**6), ("BN_MIN_PROGRAMS", 10**6), ("BN_SPLIT_MIN_R", 0),
                        ("BN_MIN_SPLIT_ROWS", 12), ("BN_SPLIT_BLOCK", 2)):
            monkeypatch.setattr(tbn, name, v)
        assert tbn.plan(2, 37, 5, 4)[4] == 3
    g = _gen(30)
    x, gamma, beta = _cast([_randn(g, 2, 37, 5), _randn(g, 2, 5, shift=1.0), _randn(g, 2, 5)], dtype, "cuda")
    x[1, 20, 3] = float("nan")
    y, xhat, rstd = triton_op("bn_fwd")(x, gamma, beta, EPS, True)
    torch.cuda.synchronize()
    nan = torch.zeros(2, 5, dtype=torch.bool, device="cuda")
    nan[1, 3] = True
    assert torch.equal(torch.isnan(rstd), nan)
    assert torch.equal(torch.isnan(xhat), nan[:, None, :].expand_as(xhat))
    assert torch.equal(torch.isnan(y), nan[:, None, :].expand_as(y))


def test_one_cuda_runtime_in_the_process():
    """The extension links the shared CUDA runtime torch loaded: after a CUDA CG launch the
    process maps one libcudart (a static copy kept its own module loading and error state)."""
    fam = cg_family(F32, "cuda", T=2, P=100)
    _, args = fam["cg_dots"][0]
    kernel("cg_dots", "cuda")(*args)
    torch.cuda.synchronize()
    with open("/proc/self/maps") as f:
        paths = {ln.split()[-1] for ln in f if "libcudart" in ln}
    assert len({os.path.basename(p) for p in paths}) == 1, paths


def test_large_p_launches_on_axis_zero():
    """P past the grid's axis-1 limit (65,535 blocks): prox at P = 140M float32 (2048 per block),
    CG at P = 270M (4096 per block) launch and compute (one grid axis, task-major)."""
    P = 140_000_000
    phi, grad, theta = (torch.rand(1, P, device="cuda") for _ in range(3))
    lam = torch.full((1,), 0.5, device="cuda")
    want = phi - 0.25 * (grad + lam[:, None] * (phi - theta))
    triton_op("prox_step")(phi, grad, theta, lam, 0.25)
    assert rel_err(phi, want) < 1e-6
    del phi, grad, theta, want
    P = 270_000_000
    r = torch.rand(1, P, device="cuda")
    nb = math.ceil(P / CG_CHUNK)
    partials = torch.full((1, nb, 4), float("nan"), dtype=F64, device="cuda")
    for backend in ("triton", "cuda"):
        partials.fill_(float("nan"))
        kernel("cg_dots", backend)(r, r, r, partials, CG_CHUNK)
        rr = (r.double() ** 2).sum()
        assert abs(partials[0, :, 0].sum() - rr) / rr < 1e-12 and torch.isfinite(partials).all()


def test_cuda_graph_step_hazards():
    """CUDAGraphStep: an eager call on the same static input right after capture does not read
    the capture's unwritten memory (the engine's per-data caches are dropped), a batch off the
    device is refused, and a tensor ``lr`` of a capturable Adam reaches the replays."""
    from imaml_kernels.graphs import CUDAGraphStep
    from imaml_kernels.nets import OmniglotConv

    torch.manual_seed(0)
    model = OmniglotConv(5).cuda()
    batch = _meta_batch()
    eng = model.batched()
    theta0 = model.flat_params().detach()

    def inner(xs, ys, xq, yq):
        return eng.inner_loop(theta0, xs, ys, lam=2.0, steps=4, lr=0.1)

    phi = inner(*batch).clone()
    want = eng.linearize(phi, batch[0], batch[1]).loss.clone()
    graphed = CUDAGraphStep(inner, batch, warmup=1)
    # Before any replay, on the graph's static support set: linearize would reuse the inner
    # loop's prepared data for that same tensor, made during capture and not yet written.
    got = eng.linearize(phi, graphed.static[0], graphed.static[1]).loss
    assert rel_err(got, want) < 1e-6
    with pytest.raises(ValueError, match="captured on cuda"):
        graphed(*[t.cpu().pin_memory() for t in batch])

    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=torch.tensor(1e-3, device="cuda"), capturable=True)

    def step(*b):
        opt.zero_grad(set_to_none=False)
        sum((p * p).sum() for p in params).backward()
        opt.step()
        return params[0].detach()

    step(*batch)  # Adam's state exists
    graphed = CUDAGraphStep(step, batch, warmup=1)
    state = [*params, *(t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))]
    snapshot = [t.detach().clone() for t in state]
    deltas = []
    for lr in (1e-3, 1e-2):  # what a schedule does with a tensor lr: fill it between replays
        with torch.no_grad():
            for t, v in zip(state, snapshot):
                t.copy_(v)
        opt.param_groups[0]["lr"].fill_(lr)
        graphed(*batch)
        torch.cuda.synchronize()
        deltas.append(params[0].detach() - snapshot[0])
    assert rel_err(deltas[1], 10 * deltas[0]) < 1e-3, "the lr set after capture did not reach the replay"
