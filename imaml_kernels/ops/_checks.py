"""Argument checks shared by the op families: each raises ``TypeError``/``ValueError`` naming
the argument (the fakes run them, so ``torch.compile`` traces them too)."""

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float64)


def expect(cond, exc, msg):
    if not cond:
        raise exc(msg)


def check_tensor(name, t, dim=None, like=None, dtype=None):
    """``t`` is a contiguous float32/float64 tensor (of ``dim`` dims; matching ``like``'s shape,
    dtype and device; of ``dtype`` when given)."""
    expect(isinstance(t, Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None:
        expect(t.dim() == dim, ValueError, f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if dtype is None:
        expect(t.dtype in FLOATS, TypeError, f"{name} must be float32 or float64, got {t.dtype}")
    else:
        expect(t.dtype == dtype, TypeError, f"{name} must have dtype {dtype}, got {t.dtype}")
    if like is not None:
        expect(t.shape == like.shape, ValueError, f"{name} must have shape {tuple(like.shape)}, got {tuple(t.shape)}")
        expect(t.dtype == like.dtype, TypeError, f"{name} must have dtype {like.dtype}, got {t.dtype}")
    if like is not None:
        expect(t.device == like.device, ValueError, f"{name} must be on {like.device}, got {t.device}")
    expect(t.is_contiguous(), ValueError, f"{name} must be contiguous")


def check_shape(name, t, shape, like):
    """``t`` has exactly ``shape`` and ``like``'s dtype and device, contiguous."""
    expect(isinstance(t, Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    expect(tuple(t.shape) == tuple(shape), ValueError, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    expect(t.dtype == like.dtype, TypeError, f"{name} must have dtype {like.dtype}, got {t.dtype}")
    expect(t.device == like.device, ValueError, f"{name} must be on {like.device}, got {t.device}")
    expect(t.is_contiguous(), ValueError, f"{name} must be contiguous")


def _bytes(t):
    start = t.storage_offset() * t.element_size()
    return start, start + t.numel() * t.element_size()


def overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether contiguous ``a`` and ``b`` share bytes of one storage. Storage identity, not
    ``data_ptr`` (meta and fake tensors, which the fakes see, have none): ``torch._C._is_alias_of``,
    the test functionalisation uses."""
    if a.numel() == 0 or b.numel() == 0 or not torch._C._is_alias_of(a, b):
        return False
    (a0, a1), (b0, b1) = _bytes(a), _bytes(b)
    return a0 < b1 and b0 < a1


def check_disjoint(written, read=None):
    """No tensor of ``written`` (``{name: tensor}``, contiguous) overlaps another one or one of
    ``read``: a kernel's blocks would race (one block's writes reaching another's reads), an
    ``is`` check misses views (a matvec returning ``p.view(...)``)."""
    items = list(written.items())
    for i, (na, a) in enumerate(items):
        for nb, b in items[i + 1:] + list((read or {}).items()):
            expect(not overlaps(a, b), ValueError,
                   f"{na} and {nb} overlap in memory; the kernel writes {na}: pass separate tensors")


def dtype_code(t):
    """The extension's dtype code: 0 float32, 1 float64."""
    return 0 if t.dtype == torch.float32 else 1


def addr(t):
    """``t``'s address, 0 for ``None`` (an absent optional array)."""
    return 0 if t is None else t.data_ptr()


def native():
    """The extension module ``imaml_kernels._C``, or a ``RuntimeError`` saying why it is absent."""
    from .. import _ext

    if not _ext.HAS_EXT:
        raise RuntimeError(f"imaml_kernels: the native extension is not built ({_ext.EXT_ERROR})")
    return _ext._C


def native_cuda():
    from .. import _ext

    C = native()
    if not _ext.HAS_CUDA_EXT:
        raise RuntimeError("imaml_kernels: the native extension was built without CUDA kernels")
    return C


def stream(t):
    """The raw handle of ``t``'s device's current CUDA stream."""
    return torch.cuda.current_stream(t.device).cuda_stream
