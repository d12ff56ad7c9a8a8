"""Softmax cross-entropy (mean over a task's examples): ``softmax_ce`` (loss, softmax,
gradient), ``softmax_ce_bias`` (and the head bias' gradient, in place) and
``softmax_ce_tangent``, on every backend against the float64 twin
(:mod:`imaml_kernels.reference.softmax_ce`); extreme logits; opcheck."""

import itertools
import math

import pytest
import torch

from imaml_kernels import dispatch

from helpers import rel_err as rel

from .common import (BACKENDS, DTYPES, F32, F64, FAMILIES, KERNELS, backends, case, cast, check_op, device, gen, grid,
                     launch, opcheck, poisoned, randn, runs)

OPS = FAMILIES["softmax_ce"]
assert OPS == ("softmax_ce", "softmax_ce_bias", "softmax_ce_tangent")


def ce_args(name, T, N, K, dtype, dev, shift=1.0):
    """Random arguments of ``name``: logits ``3 N(0, 1) + shift``, labels in ``[0, K)``; the
    tangent's softmax is the float64 softmax of the logits, rounded; the bias gradient poisoned."""
    g = gen(f"{name}-{T}-{N}-{K}-{shift}")
    logits, rlogits = randn(g, T, N, K, scale=3.0, shift=shift), randn(g, T, N, K)
    y = torch.randint(0, K, (T, N), generator=g).to(dev)
    prob, logits, rlogits = cast(dtype, dev, torch.softmax(logits, -1), logits, rlogits)
    return {
        "softmax_ce": lambda: (logits, y),
        "softmax_ce_bias": lambda: (logits, y, poisoned(T, K, dtype=dtype, dev=dev)),
        "softmax_ce_tangent": lambda: (prob, rlogits),
    }[name]()


# One example and one class; rows of 37 examples, 20 classes.
SHAPES = sorted(set(itertools.product((1, 2), (1, 7, 37), (1, 5, 20))) | set(itertools.product((1, 3), (1, 5, 25), (1, 5, 20))))
CASES = [case(f"T{T}-N{N}-K{K}", T, N, K) for T, N, K in SHAPES]


@pytest.mark.parametrize("T,N,K,dtype,backend", grid(CASES))
@pytest.mark.parametrize("name", OPS)
def test_softmax_ce_matches_float64_twin(name, T, N, K, dtype, backend):
    check_op(name, backend, ce_args(name, T, N, K, dtype, device(backend)), dtype)


@pytest.mark.parametrize("dtype,backend", grid([case("T2-N7-K5-shift1000")]))
@pytest.mark.parametrize("name", ("softmax_ce", "softmax_ce_bias"))
def test_softmax_ce_large_logits(name, dtype, backend):
    """Logits near 1000 overflow exp without the max shift."""
    check_op(name, backend, ce_args(name, 2, 7, 5, dtype, device(backend), shift=1000.0), dtype)


@runs("triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", OPS)
def test_softmax_ce_triton_small_tiles_large_logits(monkeypatch, name, dtype):
    # Logits near 1000; 64-byte tiles with K = 5 take 2 float32 rows / 1 float64 row per tile,
    # so N = 7 runs several row tiles (a partial last one).
    from imaml_kernels.triton import softmax_ce

    monkeypatch.setattr(softmax_ce, "SOFTMAX_TILE_BYTES", 64)
    check_op(name, "triton", ce_args(name, 2, 7, 5, dtype, device("triton"), shift=1000.0), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_ce_extreme_logits(backend):
    dev = device(backend)
    logits = torch.tensor([[[1000.0, -1000.0, 0.0], [-50.0, -50.0, -50.0]]], dtype=F32, device=dev)
    y = torch.tensor([[1, 2]], device=dev)
    loss, prob, grad = launch("softmax_ce", backend, (logits, y))
    assert math.isclose(loss.item(), (2000.0 + math.log(3.0)) / 2, rel_tol=1e-6)
    assert torch.isfinite(prob).all() and torch.isfinite(grad).all()


@runs("cpu")
def test_softmax_ce_cpu_rejects_labels_outside_the_classes():
    logits = torch.tensor([[[1000.0, -1000.0, 0.0], [-50.0, -50.0, -50.0]]], dtype=F32)
    with pytest.raises(IndexError, match="outside"):
        dispatch.op("softmax_ce", "cpu")(logits, torch.tensor([[1, 3]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_ce_bias_writes_the_bias_gradient_in_place(backend):
    """The head's bias gradient from the softmax kernel (the sum of its gradient over each task's
    rows) into a strided view; the other outputs are softmax_ce's."""
    op = dispatch.op
    T, N, K = 3, 7, 5
    logits, y = ce_args("softmax_ce", T, N, K, F64, device(backend), shift=0.0)
    buf = torch.full((T, K + 3), 9.0, dtype=F64, device=logits.device)
    loss, prob, grad = op("softmax_ce_bias", backend)(logits, y, buf[:, 1:1 + K])
    want = op("softmax_ce", "reference")(logits, y)
    for o, w in zip((loss, prob, grad), want):
        assert rel(o, w) < 1e-12
    assert rel(buf[:, 1:1 + K], want[2].sum(1)) < 1e-12
    assert (buf[:, 0] == 9.0).all() and (buf[:, 1 + K:] == 9.0).all()


@pytest.mark.parametrize("backend", backends(KERNELS))
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, backend):
    opcheck(name, backend, ce_args(name, 2, 4, 3, F64, device(backend)))
