"""Shared helpers of the Triton launchers: argument checks, the fp32 hi/lo split of float
scalars, the identity ``wrap``.

A launcher takes its op's arguments in the op's schema order (:mod:`imaml_kernels.ops`), then
the op's outputs, preallocated by the caller, in the op's order, then ``wrap``: the op table
binds it as it is. ``wrap`` is applied to each kernel before launching
(``torch.library.wrap_triton`` inside a ``triton_op``; identity by default; ``bench compile``
passes one that records the launch instead of running it).

Float scalars (``eps``, ``lr``): a Python float reaches a compiled CUDA kernel as an fp32
argument, which would cost float64 stages ~1e-8 relative error (``rstd`` of a constant
channel is ``1/sqrt(eps)``). The launchers pass each as ``hi + lo``, two fp32-exact floats,
recombined in the kernel in the data type (~48 significant bits). The interpreter keeps Python
floats exact, so it cannot show the difference; ``test_scalar_split`` checks the split. (A
parameter annotated ``tl.float64`` is received as fp64 instead: BatchNorm's ``inv_r``.)

Every launcher launches through ``wrap(kernel)[grid](...)`` only, so a recording ``wrap``
sees each launch (``bench compile`` compiles exactly those specialisations).
"""

import struct

import torch

FLOATS = (torch.float32, torch.float64)


def ident(k):
    return k


def split_f64(v: float):
    """``v`` as ``(hi, lo)``: two floats exactly representable in float32 with ``hi + lo``
    within ~2**-48 relative of ``v`` (a CUDA kernel receives Python floats as fp32)."""
    hi = struct.unpack("f", struct.pack("f", float(v)))[0]
    lo = struct.unpack("f", struct.pack("f", float(v) - hi))[0]
    return hi, lo


def check(ref, shape, **tensors):
    if ref.dtype not in FLOATS:
        raise TypeError(f"float32 or float64 expected, got {ref.dtype}")
    for name, (t, want) in tensors.items():
        if t.dtype != ref.dtype or t.device != ref.device:
            raise TypeError(f"{name}: {t.dtype} on {t.device}, expected {ref.dtype} on {ref.device}")
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(want)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
