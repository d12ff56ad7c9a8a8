"""The specialisation Triton's JIT would compile for a recorded launch: Triton's own binder
(the one ``JITFunction.run`` uses) turns the call into the signature, constexprs (ints equal
to 1 included) and divisibility attributes of a :class:`Spec`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import torch

from .recording import Launch


def _jit(kernel):
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        # Under TRITON_INTERPRET=1 even triton.language's own jit functions (tl.zeros, tl.sum)
        # are interpreted ones, which cannot be compiled: see run_isolated.
        raise RuntimeError(f"{kernel!r} is not a JITFunction: compile without TRITON_INTERPRET=1 (run_isolated)")
    return kernel


class _Mock:
    """Stands in for a tensor in Triton's binder: its dtype and a 16-byte-aligned address
    (as every CUDA allocation and the launchers' contiguous tensors have)."""

    def __init__(self, dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr():
        return 0


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compilation: what ``JITFunction.run`` would key its cache on."""

    kernel: object
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[tuple, object], ...]
    attrs: Tuple[Tuple[tuple, tuple], ...]
    num_warps: int
    num_stages: int

    @property
    def name(self):
        return self.kernel.fn.__name__

    def constexprs_named(self):
        """``[(argument name, value)]`` of the constexpr arguments."""
        names = [n for n, _ in self.signature]
        return [(names[p[0]], v) for p, v in self.constexprs if len(p) == 1]

    def blocks(self) -> str:
        """The constexpr arguments, named (block sizes and flags)."""
        return " ".join(f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in self.constexprs_named()
                        if not n.endswith("_ptr"))


@functools.lru_cache(maxsize=None)
def _binder(kernel):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialise(launch: Launch) -> Spec:
    """The specialisation Triton's JIT would compile for ``launch`` (its own binder)."""
    kernel = _jit(launch.kernel)
    backend, binder = _binder(kernel)
    args = tuple(_Mock(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*args, **kwargs)
    opts, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return Spec(
        kernel,
        tuple(signature.items()),
        tuple(sorted(constexprs.items())),
        tuple(sorted((k, tuple(tuple(a) for a in v)) for k, v in attrs.items())),
        int(opts.num_warps),
        int(opts.num_stages),
    )
