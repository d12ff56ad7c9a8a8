"""imaml_kernels: fused batched Hessian-vector products and a multi-task CG solver for
implicit MAML (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019).

Shapes: task-batched tensors lead with ``T``; flat parameters are ``[T, P]``.
"""

from . import _ext, dispatch, ops, reference  # noqa: F401
from .cg import CG, CGInfo, cg_solve
from .dispatch import BACKENDS, available_backends, select_backend
from .engine import BatchedNet, functional_logits, gemm_precision, get_gemm_precision, select_engine, set_gemm_precision
from .hvp import batched_hvp
from .adapted import AdaptedParams
from .implicit import implicit_adapt, implicit_meta_grad, plan_for
from .plan import Plan
from .objective import ProximalObjective, task_loss_fn
from .inner import GD, SGD, Adam, HessianFree, NewtonCG, SGDThenPullBack
from .layout import ParamLayout
from .minres import MINRES, MINRESInfo, minres_solve
from .query import query_logits
from .step import STATS, meta_step

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "CG", "CGInfo", "available_backends", "cg_solve", "select_backend",
    "batched_hvp", "ParamLayout", "implicit_adapt", "implicit_meta_grad", "AdaptedParams",
    "ProximalObjective", "task_loss_fn", "GD", "SGDThenPullBack", "SGD", "Adam", "NewtonCG", "HessianFree", "BatchedNet", "functional_logits", "select_engine",
    "query_logits", "meta_step", "STATS", "plan_for", "Plan", "MINRES", "MINRESInfo", "minres_solve",
    "gemm_precision", "get_gemm_precision", "set_gemm_precision",
]
