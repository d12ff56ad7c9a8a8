"""Every kernel as a ``torch.library`` op in the ``imaml::`` namespace, one module per op
family, mirroring ``csrc/`` and :mod:`imaml_kernels.triton`:

==============  ==========================================  =================================
module          ops                                         pure-PyTorch twin
==============  ==========================================  =================================
``cg``          ``cg_dots``, ``cg_update``                  :mod:`~imaml_kernels.reference.cg`
``conv``        ``im2col``, ``col2im``                      :mod:`~imaml_kernels.reference.conv`
``batchnorm``   ``bn_fwd``, ``bn_bwd``, ``bn_tfwd``,        :mod:`~imaml_kernels.reference.batchnorm`
                ``bn_tbwd``
``maxpool``     ``maxpool_fwd``, ``maxpool_gather``,        :mod:`~imaml_kernels.reference.maxpool`
                ``maxpool_scatter``
``softmax_ce``  ``softmax_ce``, ``softmax_ce_tangent``      :mod:`~imaml_kernels.reference.softmax_ce`
``prox``        ``prox_step``                               :mod:`~imaml_kernels.reference.prox`
==============  ==========================================  =================================

Each module holds, in this order: validation (the fake), the launchers and the registrations
(one :class:`~imaml_kernels.ops._registry.OpSpec` table entry per op: ``imaml::<name>`` for
the C++ (CPU tensors) and CUDA C++ kernels, ``imaml::<name>_triton`` for Triton). Every op has
a fake, so ``torch.compile(fullgraph=True)`` traces it. Nothing here chooses a backend or
imports :mod:`imaml_kernels.dispatch`: callers take an op from
``dispatch.kernels(device, dtype, backend)`` (one table per pass) or ``dispatch.op(name, backend)``.
"""

from . import batchnorm, cg, conv, maxpool, prox, softmax_ce  # noqa: F401  (registers the ops)
from ._registry import SPECS, OpSpec, record_triton_launches  # noqa: F401
