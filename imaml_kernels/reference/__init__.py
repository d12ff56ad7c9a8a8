"""Pure-PyTorch twins of every kernel family, one module each (the same names as
:mod:`imaml_kernels.ops`). They define the semantics the fused kernels must reproduce; tests
and benchmarks share them. References never import kernels.

Shapes: task-batched tensors lead with ``T``; flat vectors are ``[T, P]``.
"""

from .batchnorm import bn_bwd, bn_fwd, bn_tbwd, bn_tfwd
from .cg import (
    CG_ACTIVE,
    CG_BREAKDOWN,
    CG_CONVERGED,
    CG_DOTS,
    cg_dots,
    cg_solve,
    cg_step,
    cg_update,
)
from .conv import col2im, im2col
from .maxpool import maxpool_fwd, maxpool_gather, maxpool_scatter
from .prox import prox_step
from .softmax_ce import softmax_ce, softmax_ce_grad, softmax_ce_tangent

__all__ = [
    "bn_fwd", "bn_bwd", "bn_tfwd", "bn_tbwd", "CG_ACTIVE", "CG_CONVERGED", "CG_BREAKDOWN", "CG_DOTS",
    "cg_dots", "cg_update", "cg_step", "cg_solve", "im2col", "col2im", "maxpool_fwd", "maxpool_gather",
    "maxpool_scatter", "prox_step", "softmax_ce", "softmax_ce_grad", "softmax_ce_tangent",
]
