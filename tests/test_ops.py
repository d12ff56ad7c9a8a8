"""torch.library ops: opcheck, validation errors, dispatch."""

import pytest
import torch

import imaml_kernels as ik
from imaml_kernels import _ext, dispatch, ops
from imaml_kernels.dispatch import op
from imaml_kernels.dispatch import backend_problems, select_backend


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
