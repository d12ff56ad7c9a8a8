"""The one dispatch point (:mod:`imaml_kernels.dispatch`): the backend rules (explicit, then
``IMAML_BACKEND``, then automatic), explicit backends that cannot run raising with every reason,
the :class:`~imaml_kernels.dispatch.Kernels` table resolved once per choice, ``dispatch.op``,
and C++ kernels registered for CPU tensors only."""

import pytest
import torch

import imaml_kernels as ik
from imaml_kernels import _ext, dispatch, ops
from imaml_kernels.dispatch import backend_problems, select_backend


@pytest.fixture
def auto(monkeypatch):
    """No IMAML_BACKEND: the automatic choice."""
    monkeypatch.delenv("IMAML_BACKEND", raising=False)
    return monkeypatch


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


def test_explicit_backend_wins_over_the_environment(auto):
    auto.setenv("IMAML_BACKEND", "reference")
    assert select_backend("cpu", torch.float32, "cpu") == "cpu"
    assert dispatch.kernels("cpu", torch.float32, "cpu").backend == "cpu"


def test_an_explicit_backend_that_cannot_run_lists_every_reason(auto):
    with pytest.raises(RuntimeError) as err:
        select_backend("meta", torch.float16, "cpu")
    msg = str(err.value)
    assert "backend='cpu' cannot run here" in msg
    assert "dtype torch.float16 is not supported" in msg and "not the CPU" in msg
    assert backend_problems("reference", "cpu", torch.float16) == []  # the twin runs any dtype


def test_the_automatic_choice_falls_back_quietly(auto):
    assert select_backend("cpu", torch.float16) == "reference"
    assert dispatch.available_backends("cpu", torch.float16) == ["reference"]
    # The Triton interpreter is on in tests; dispatch order.
    assert dispatch.available_backends("cpu") == ["triton", "cpu", "reference"]
    assert dispatch.available_backends("cpu") == ik.available_backends("cpu")


def test_cg_solve_respects_env_backend(monkeypatch):
    monkeypatch.setenv("IMAML_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        ik.cg_solve(lambda v: v, torch.ones(2, 3))


# --------------------------------------------------------------------------- one table per choice


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


def test_kernels_table_names_its_backends(auto):
    k = dispatch.kernels("cpu", torch.float32, "reference")
    assert repr(k) == "Kernels(backend='reference', engine_backend='reference')"
    assert k.bn_fwd.__name__ == "bn_fwd[reference]" and k.cg_dots.__name__ == "cg_dots[reference]"
    assert dispatch.kernels("cpu", torch.float32, "triton").prox_step.__name__ == "prox_step[triton]"


def test_engine_backend_named_cuda_without_triton_raises(monkeypatch):
    monkeypatch.setattr(_ext, "triton_importable", lambda: False)
    cuda = torch.device("cuda")
    with pytest.raises(RuntimeError, match="Triton kernels, and triton is not installed"):
        dispatch._engine_choice("cuda", cuda, torch.float32, explicit=True)
    # The automatic choice falls back quietly to the reference for the engine's stages.
    assert dispatch._engine_choice("cuda", cuda, torch.float32, explicit=False) == "reference"
    assert dispatch._engine_choice("cuda", cuda, torch.float32, explicit=False) == "reference"


# --------------------------------------------------------------------------- dispatch.op


def test_op_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="unknown op 'bn_forward'; the ops are"):
        dispatch.op("bn_forward")


def test_op_picks_the_backend_from_its_first_tensor(auto):
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    g, b = torch.rand(2, 3, dtype=torch.float64) + 0.5, torch.randn(2, 3, dtype=torch.float64)
    run = dispatch.op("bn_fwd")
    assert run.__name__ == "bn_fwd"
    for o, w in zip(run(x, g, b, 1e-5, True), dispatch.op("bn_fwd", "cpu")(x, g, b, 1e-5, True)):
        assert torch.equal(o, w)  # CPU float64 tensors: the C++ kernel
    auto.setenv("IMAML_BACKEND", "reference")
    for o, w in zip(run(x, g, b, 1e-5, True), ik.reference.bn_fwd(x, g, b, 1e-5, True)):
        assert torch.equal(o, w)
    # float16 has no kernel: the automatic choice runs the twin; named, the C++ kernel refuses.
    auto.delenv("IMAML_BACKEND")
    lam = torch.ones(2, dtype=torch.float16)
    phi, grad, theta = (torch.randn(2, 5).half() for _ in range(3))
    want = ik.reference.prox_step(phi.clone(), grad, theta, lam[:, None], 0.1)
    dispatch.op("prox_step")(phi, grad, theta, lam, 0.1)
    assert torch.equal(phi, want)
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run here: dtype torch.float16"):
        dispatch.op("prox_step", "cpu")(phi, grad, theta, lam, 0.1)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
        dispatch.op("prox_step", "cuda")(phi.float(), grad.float(), theta.float(), lam.float(), 0.1)


def test_cpu_kernels_are_registered_for_cpu_tensors_only():
    """A CUDA tensor never reaches an OpenMP kernel: the C++ engine ops have no CUDA kernel
    (torch raises NotImplementedError), the CG ops have their own CUDA C++ kernel."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name, spec in ops.SPECS.items():
        assert has(f"imaml::{name}", "CPU"), name
        assert has(f"imaml::{name}", "CUDA") == (spec.cuda is not None), name
    assert {n for n, s in ops.SPECS.items() if s.cuda is not None} == {"cg_dots", "cg_update"}
