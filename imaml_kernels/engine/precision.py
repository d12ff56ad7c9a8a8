"""The engine's GEMM precision: float32 (default) or bfloat16 operands with float32 accumulation.

``set_gemm_precision("bf16")`` (or ``with gemm_precision("bf16"):``) makes every float32 GEMM
of the fused engine (the convolutions' and linear layers' forward, backward and tangent
products) round its two operands to bfloat16 and multiply them with float32 accumulation; the
product is rounded to bfloat16 by ATen's bf16 GEMM and widened back to float32, like
``torch.set_float32_matmul_precision("medium")`` on a GPU. Everything else stays float32:
parameters, gradients, the im2col patches, BatchNorm, the loss, CG and every reduction. The
mode touches float32 GEMMs only (float64 runs as ever) and only the engine (the generic
``torch.func`` path follows torch's own matmul settings).

Operands that a linearisation reuses (the patches and weights, read again by every HVP of a
CG solve) are rounded once and kept beside their float32 originals in the layer's cache.

Example::

    >>> import imaml_kernels as ik
    >>> with ik.gemm_precision("bf16"):
    ...     g, info = ik.implicit_meta_grad(model, theta, support, query, lam=2.0, inner=ik.GD(16, 0.1))
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["GEMM_PRECISIONS", "gemm_precision", "get_gemm_precision", "set_gemm_precision"]

GEMM_PRECISIONS = ("fp32", "bf16")
_state = {"mode": "fp32"}


def set_gemm_precision(mode: str) -> None:
    """``"fp32"`` (default) or ``"bf16"``: the precision of the engine's float32 GEMMs."""
    if mode not in GEMM_PRECISIONS:
        raise ValueError(f"gemm precision must be one of {GEMM_PRECISIONS}, got {mode!r}")
    _state["mode"] = mode


def get_gemm_precision() -> str:
    return _state["mode"]


@contextlib.contextmanager
def gemm_precision(mode: str):
    """The engine's GEMM precision inside a ``with`` block (restored after it)."""
    before = _state["mode"]
    set_gemm_precision(mode)
    try:
        yield
    finally:
        _state["mode"] = before


def _low(t: torch.Tensor) -> bool:
    return _state["mode"] == "bf16" and t.dtype == torch.float32


def lowp(t: torch.Tensor, cache: dict | None = None, key: str | None = None) -> torch.Tensor:
    """``t`` as a GEMM operand: rounded to bfloat16 in bf16 mode (once per ``cache[key]``)."""
    if not _low(t):
        return t
    if cache is None:
        return t.to(torch.bfloat16)
    lp = cache.get(key)
    if lp is None:
        lp = cache[key] = t.to(torch.bfloat16)
    return lp


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` batched; in bf16 mode on bf16 operands, returned in float32."""
    if a.dtype == torch.bfloat16 or b.dtype == torch.bfloat16 or _low(a):
        return torch.bmm(_bf(a), _bf(b)).float()
    return torch.bmm(a, b)


def baddbmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``bias + a @ b`` batched (see :func:`bmm`)."""
    if a.dtype == torch.bfloat16 or b.dtype == torch.bfloat16 or _low(a):
        return bmm(a, b).add_(bias)
    return torch.baddbmm(bias, a, b)


def baddbmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out += a @ b`` in place (see :func:`bmm`)."""
    if a.dtype == torch.bfloat16 or b.dtype == torch.bfloat16 or _low(a):
        return out.add_(bmm(a, b))
    return out.baddbmm_(a, b)


def _bf(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bfloat16 else t.to(torch.bfloat16)
