"""torch.library ops: opcheck, validation errors, dispatch."""

import pytest
import torch

import imaml_kernels as ik
from imaml_kernels import _ext, dispatch, ops, reference
from imaml_kernels.dispatch import op
from imaml_kernels.dispatch import backend_problems, select_backend

CG_DOTS, CG_UPDATE = torch.ops.imaml.cg_dots, torch.ops.imaml.cg_update
CG_DOTS_TRITON, CG_UPDATE_TRITON = torch.ops.imaml.cg_dots_triton, torch.ops.imaml.cg_update_triton


def _cg_args(T=3, P=5000, dtype=torch.float32, chunk=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, r, p, Ap = (torch.randn(T, P, generator=g, dtype=dtype) for _ in range(4))
    nb = -(-P // chunk)
    partials = torch.full((T, nb, 4), float("nan"), dtype=torch.float64)  # poisoned
    status_in = torch.zeros(T, dtype=torch.int32)
    status_out = torch.full((T,), -7, dtype=torch.int32)  # poisoned
    iters = torch.zeros(T, dtype=torch.int32)
    thresh = torch.zeros(T, dtype=torch.float64)
    return x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk


OPS = [
    pytest.param(CG_DOTS, CG_UPDATE, 4096, "all", id="cpp-chunk4096"),
    pytest.param(CG_DOTS, CG_UPDATE, 16384, "all", id="cpp-chunk16384"),
    # Under TRITON_INTERPRET the kernel body runs on real pointers, which the AOT-dispatch
    # checks (FakeTensor/functional tracing through the triton_op body) cannot provide; on a
    # GPU gpu_check.sh runs the full opcheck.
    pytest.param(CG_DOTS_TRITON, CG_UPDATE_TRITON, 4096, "interp", id="triton"),
]
INTERP_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("dots,update,chunk,utils", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_and_values(dots, update, chunk, utils, dtype):
    x, r, p, Ap, partials, s_in, s_out, iters, thresh, _ = _cg_args(dtype=dtype, chunk=chunk)
    kw = {} if utils == "all" else {"test_utils": INTERP_UTILS}
    torch.library.opcheck(dots, (r, p, Ap, partials, chunk), **kw)
    dots(r, p, Ap, partials, chunk)
    ref = torch.empty_like(partials)
    reference.cg_dots(r, p, Ap, ref, chunk)
    assert torch.allclose(partials, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    args = (x.clone(), r.clone(), p.clone(), Ap, partials, s_in, s_out, iters, thresh, chunk)
    torch.library.opcheck(update, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), **kw)
    ref_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    update(*args)
    reference.cg_update(*ref_args)
    for got, want in zip(args[:3] + args[6:8], ref_args[:3] + ref_args[6:8]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    assert (args[6] != -7).all()


def test_update_skips_broken_and_converged_tasks():
    x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk = _cg_args(T=3, P=100, dtype=torch.float64)
    CG_DOTS(r, p, Ap, partials, chunk)
    s_in[0] = reference.CG_BREAKDOWN
    thresh[1] = float("inf")  # converged
    Ap[2] = -p[2]  # negative curvature -> breakdown now
    CG_DOTS(r, p, Ap, partials, chunk)
    x0, r0, p0 = x.clone(), r.clone(), p.clone()
    CG_UPDATE(x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk)
    assert s_out.tolist() == [2, 1, 2] and iters.tolist() == [0, 0, 0]
    assert torch.equal(x, x0) and torch.equal(r, r0) and torch.equal(p, p0)


BAD = [
    ("r", lambda a: a.__setitem__(1, a[1][:, :-1].contiguous()), ValueError, "p must have shape"),
    ("dtype", lambda a: a.__setitem__(2, a[2].double()), TypeError, "Ap must have dtype"),
    ("contig", lambda a: a.__setitem__(1, a[1].t().contiguous().t()), ValueError, "p must be contiguous"),
    ("partials", lambda a: a.__setitem__(3, a[3][:, :, :3].contiguous()), ValueError, "partials must have shape"),
    ("partials-dtype", lambda a: a.__setitem__(3, a[3].float()), TypeError, "partials must be float64"),
    ("rank", lambda a: a.__setitem__(0, a[0][0]), ValueError, "r must have 2 dimensions"),
    ("half", lambda a: a.__setitem__(0, a[0].half()), TypeError, "r must be float32 or float64"),
]


@pytest.mark.parametrize("name,mutate,exc,msg", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("op", [CG_DOTS, CG_DOTS_TRITON], ids=["cpp", "triton"])
def test_cg_dots_validation(name, mutate, exc, msg, op):
    _, r, p, Ap, partials, *_ = _cg_args(T=2, P=64, chunk=4096)
    args = [r, p, Ap, partials, 4096]
    mutate(args)
    with pytest.raises(exc, match=msg):
        op(*args)


def test_cg_update_validation():
    x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk = _cg_args(T=2, P=64)
    with pytest.raises(TypeError, match="status_in must have dtype torch.int32"):
        CG_UPDATE(x, r, p, Ap, partials, s_in.long(), s_out, iters, thresh, chunk)
    with pytest.raises(ValueError, match="thresh must have shape \\(2,\\)"):
        CG_UPDATE(x, r, p, Ap, partials, s_in, s_out, iters, thresh[:1], chunk)
    with pytest.raises(ValueError, match="chunk must be 4096"):
        CG_UPDATE_TRITON(x, r, p, Ap, partials, s_in, s_out, iters, thresh, 2048)


def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv("IMAML_BACKEND", raising=False)
    assert select_backend("cpu", torch.float32) == "cpu"
    assert select_backend("cpu", torch.float32, "reference") == "reference"
    assert select_backend("cpu", torch.float64, "triton") == "triton"  # interpreter is on in tests
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here: .*not a CUDA device"):
        select_backend("cpu", torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="unknown backend 'fast'"):
        select_backend("cpu", torch.float32, "fast")
    with pytest.raises(RuntimeError, match="dtype torch.float16 is not supported"):
        select_backend("cpu", torch.float16, "cpu")
    monkeypatch.setenv("IMAML_BACKEND", "reference")
    assert select_backend("cpu", torch.float32) == "reference"
    monkeypatch.setenv("IMAML_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="IMAML_BACKEND='cuda'"):
        select_backend("cpu", torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("TRITON_INTERPRET" in p for p in backend_problems("triton", "cpu", torch.float32))
    # Automatic choice for a CUDA device never picks CPU-only backends.
    monkeypatch.delenv("IMAML_BACKEND")
    assert select_backend("cuda", torch.float32) in ("cuda", "triton", "reference")


def test_cg_solve_respects_env_backend(monkeypatch):
    monkeypatch.setenv("IMAML_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        ik.cg_solve(lambda v: v, torch.ones(2, 3))


# --------------------------------------------------------------------------- one dispatch point


def test_kernels_resolve_every_op_once_per_choice(monkeypatch):
    monkeypatch.delenv("IMAML_BACKEND", raising=False)
    k = dispatch.kernels("cpu", torch.float32)
    assert (k.backend, k.engine_backend) == ("cpu", "cpu")
    assert dispatch.kernels("cpu", torch.float64) is k  # cached: one table per choice
    for name in ops.SPECS:
        assert callable(getattr(k, name)), name
    ref = dispatch.kernels("cpu", torch.float32, "reference")
    assert (ref.backend, ref.engine_backend) == ("reference", "reference")
    tri = dispatch.kernels("cpu", torch.float32, "triton")  # the interpreter is on in tests
    assert tri.engine_backend == "triton"
    # The same arguments give the same values on every backend.
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    g, b = torch.rand(2, 3, dtype=torch.float64) + 0.5, torch.randn(2, 3, dtype=torch.float64)
    want = ref.bn_fwd(x, g, b, 1e-5, True)
    for got in (dispatch.kernels("cpu", torch.float64).bn_fwd(x, g, b, 1e-5, True), tri.bn_fwd(x, g, b, 1e-5, True)):
        for o, w in zip(got, want):
            assert torch.allclose(o, w, rtol=1e-12, atol=1e-12)


def test_engine_backend_named_cuda_without_triton_raises(monkeypatch):
    monkeypatch.setattr(_ext, "triton_importable", lambda: False)
    cuda = torch.device("cuda")
    with pytest.raises(RuntimeError, match="Triton kernels, and triton is not installed"):
        dispatch._engine_choice("cuda", cuda, torch.float32, explicit=True)
    # The automatic choice falls back quietly to the reference for the engine's stages.
    assert dispatch._engine_choice("cuda", cuda, torch.float32, explicit=False) == "reference"
    assert dispatch._engine_choice("cuda", cuda, torch.float32, explicit=False) == "reference"


def test_cpu_kernels_are_registered_for_cpu_tensors_only():
    """A CUDA tensor never reaches an OpenMP kernel: the C++ engine ops have no CUDA kernel
    (torch raises NotImplementedError), the CG ops have their own CUDA C++ kernel."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name, spec in ops.SPECS.items():
        assert has(f"imaml::{name}", "CPU"), name
        assert has(f"imaml::{name}", "CUDA") == (spec.cuda is not None), name
    assert {n for n, s in ops.SPECS.items() if s.cuda is not None} == {"cg_dots", "cg_update"}


def test_record_triton_launches_sees_every_launch_without_running_it():
    seen = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append((self.fn.__name__, tuple(grid), kw))

    x = torch.randn(3, 40, 5)
    g, b = torch.rand(3, 5) + 0.5, torch.randn(3, 5)
    with ops.record_triton_launches(Recorder):
        op("bn_fwd", "cpu")(x, g, b, 1e-5, True)
        op("softmax_ce", "cpu")(torch.randn(3, 4, 5), torch.zeros(3, 4, dtype=torch.int64))
        op("softmax_ce", "reference")(torch.randn(3, 4, 5), torch.zeros(3, 4, dtype=torch.int64))  # no op: unseen
    names = [s[0] for s in seen]
    assert names == ["_bn_fwd_kernel", "_softmax_ce_kernel"] or (names[-1] == "_softmax_ce_kernel" and "bn_" in names[0]), names
    assert all(all(d >= 1 for d in grid) for _, grid, _ in seen)
    n = len(seen)
    op("bn_fwd", "cpu")(x, g, b, 1e-5, True)
    assert len(seen) == n  # inactive outside the context


def test_empty_task_batch_launches_nothing():
    """T = 0 runs every backend without launching an empty grid."""
    for backend in ("cpu", "triton", "reference"):
        x = torch.randn(0, 7, 3)
        y, xhat, rstd = op("bn_fwd", backend)(x, torch.ones(0, 3), torch.zeros(0, 3), 1e-5, True)
        assert y.shape == (0, 7, 3) and rstd.shape == (0, 3)
        b = torch.zeros(0, 5)
        xs, info = ik.cg_solve(lambda v: 2 * v, b, iters=3, backend=backend)
        assert xs.shape == (0, 5) and info.iterations.shape == (0,)


def test_import_without_triton_is_silent(tmp_path):
    """Without triton, importing the package prints nothing from op registration and registers
    no Triton op; the C++ and reference backends still work."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, imaml_kernels as ik\n"
        "assert not ik._ext.triton_importable()\n"
        "assert not hasattr(torch.ops.imaml, 'bn_fwd_triton') and hasattr(torch.ops.imaml, 'bn_fwd')\n"
        "x, info = ik.cg_solve(lambda v: 2 * v, torch.ones(2, 3), iters=2)\n"
        "print(float(x.sum()))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3.0" and out.stderr == "", out.stderr
