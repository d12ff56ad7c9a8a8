"""The fused batched network engine: loss, gradient and exact Hessian-vector products for
T tasks at once, with every task's parameters in one flat ``[T, P]`` buffer.

Forward-over-reverse by hand (Pearlmutter's R-operator): every layer (:mod:`.layers`) has a
forward, a backward, a tangent forward and a tangent backward. :meth:`BatchedNet.linearize`
(:mod:`.net`) runs the primal forward and backward once at ``φ`` and keeps what the HVP needs
(im2col patches, normalised activations, ReLU masks, the primal cotangents), so each HVP of a
CG solve runs only the tangent passes: per conv layer two batched GEMMs forward, four
backward, no primal recompute and no autograd graph.

Supported: chains of Conv2d (square kernel, any stride/padding, groups 1), BatchNorm2d in
batch-statistics mode (affine), ReLU, LeakyReLU, Tanh, MaxPool2d(2), ZeroPad2d, Flatten, a
global average pool and Linear, and residual blocks (two such chains from one input, summed),
with softmax cross-entropy (mean over the task's examples). An ``nn.Sequential`` is read child
by child, any other module through its ``torch.fx`` trace (:mod:`.trace`: a ResNet's
``forward`` with functional activations and pools). The fused stages run through the
``imaml::`` ops of :mod:`imaml_kernels.ops`, on the backend that
:func:`imaml_kernels.dispatch.kernels` resolves once per pass; on the CPU a convolution whose
patches would be large runs directly instead (oneDNN's, per task: :meth:`.layers.Conv._use_direct`).
"""

from .layers import UnsupportedModel
from .net import BatchedNet, Linearization, batched_net, functional_logits
from .precision import GEMM_PRECISIONS, gemm_precision, get_gemm_precision, set_gemm_precision
from .select import select_engine

__all__ = ["GEMM_PRECISIONS", "BatchedNet", "Linearization", "UnsupportedModel", "batched_net", "functional_logits",
           "gemm_precision", "get_gemm_precision", "select_engine", "set_gemm_precision"]
