"""Registration of every kernel as ``imaml::`` ops from one table entry per op.

An :class:`OpSpec` names the op, its schema, its fake (validation and output allocation, the
same code the real implementations run first), its pure-PyTorch twin and the launchers of each
backend. :func:`register` turns it into

- ``imaml::<name>``: an op of a ``torch.library.Library`` (schema, fake, and kernels per dispatch
  key; not ``custom_op``, see :func:`register`) whose kernels are registered per device type: the C++
  (OpenMP) kernel for CPU tensors only and, where one exists, the CUDA C++ kernel for CUDA
  tensors (launched under the tensor's device and on its current stream). A CUDA tensor given
  to a CPU-only op raises instead of passing a device pointer to OpenMP;
- ``imaml::<name>_triton``: a ``triton_op`` (``wrap_triton``) running the Triton launcher
  under the tensor's device; registered only where ``triton`` imports, so a machine without
  Triton prints nothing at import.

Launchers take the op's arguments in schema order followed by its preallocated outputs (the
Triton ones then ``wrap=``): the table binds them directly, the Triton launchers of
:mod:`imaml_kernels.triton` through :func:`triton_launcher` (imported at the first call).
They never launch an empty grid (``T = 0``). The arguments reach them prepared once, by
:func:`bound` (see :class:`OpSpec`). :func:`record_triton_launches` lets tools see the Triton launches a
meta-step would make (``bench compile``, ``bench launches``) without a GPU.
"""

import contextlib
import dataclasses
import importlib
import re
from typing import Callable, Dict, Optional, Tuple

import torch

from .._ext import triton_importable


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op of a kernel family.

    Attributes:
        name: ``imaml::<name>`` (C++/CUDA) and ``imaml::<name>_triton``.
        schema: the ``torch.library`` schema, e.g. ``"(Tensor x, float eps) -> (Tensor, Tensor)"``.
        fake: ``fake(*args)`` validates the arguments (raising ``TypeError``/``ValueError`` that
            name the argument) and returns freshly allocated outputs (a tensor, a tuple, or
            ``None`` for an op that only mutates its arguments).
        reference: the pure-PyTorch twin, ``reference(*args)`` with the op's results.
        cpu: ``cpu(*args, *outs)`` runs the C++ kernel; ``cuda`` the same for the CUDA C++ kernel.
        triton: ``triton(*args, *outs, wrap=...)``, the Triton host launcher (usually
            :func:`triton_launcher`).
        mutates: names of the arguments the op writes.
        views: names of the tensor arguments passed as given (strided views the kernels read
            with their own strides, e.g. BatchNorm's parameter-like ``[T, C]`` rows).
        casts: ``(name, dtype)`` pairs: that argument is converted to ``dtype`` (class labels).

    The public arguments are prepared once (:func:`bound`): every tensor argument that is
    neither written nor in ``views`` is made contiguous (after its cast), ``None`` (an absent
    optional tensor) and scalars pass through.
    """

    name: str
    schema: str
    fake: Callable
    reference: Callable
    cpu: Optional[Callable] = None
    cuda: Optional[Callable] = None
    triton: Optional[Callable] = None
    mutates: Tuple[str, ...] = ()
    views: Tuple[str, ...] = ()
    casts: Tuple[Tuple[str, torch.dtype], ...] = ()


SPECS: Dict[str, OpSpec] = {}
_LIB = torch.library.Library("imaml", "FRAGMENT")  # the C++ and CUDA ops (the Triton ones are triton_ops)
_RECORDERS = []


@contextlib.contextmanager
def record_triton_launches(wrap):
    """While active, every call of an ``imaml::`` op (C++, CUDA or Triton; real or fake) also calls
    its Triton launcher on the same tensors with ``wrap=wrap``. ``wrap(kernel)[grid](*args,
    **kwargs)`` must record and never launch. Works under ``FakeTensorMode`` on ``"cuda"``
    tensors, so the launches of a whole meta-step are seen on a machine without a GPU.

    Example::

        >>> seen = []
        >>> class Rec:
        ...     def __init__(self, fn): self.fn = fn
        ...     def __getitem__(self, grid): return lambda *a, **k: seen.append((self.fn, grid, a, k))
        >>> with record_triton_launches(Rec):
        ...     net.linearize(params, x, y)
    """
    _RECORDERS.append(wrap)
    try:
        yield
    finally:
        _RECORDERS.remove(wrap)


def _as_tuple(res):
    if res is None:
        return ()
    return res if isinstance(res, tuple) else (res,)


def _shadow(spec, args, outs):
    for wrap in list(_RECORDERS):
        if spec.triton is not None:
            spec.triton(*args, *outs, wrap=wrap)


def _first_tensor(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


def _device_guard(args):
    t = _first_tensor(args)
    if t is not None and t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _implementation(spec, launch):
    def impl(*args):
        res = spec.fake(*args)
        outs = _as_tuple(res)
        with _device_guard(args):
            launch(*args, *outs)
        _shadow(spec, args, outs)
        return res

    return impl


def _fake(spec):
    def fake(*args):
        res = spec.fake(*args)
        _shadow(spec, args, _as_tuple(res))
        return res

    return fake


_TYPES = {"Tensor": torch.Tensor, "Tensor?": Optional[torch.Tensor], "float": float, "int": int, "bool": bool}


def _typed(schema, impl):
    """``impl(*args)`` as a function with the schema's named, annotated parameters
    (``triton_op`` infers its schema from the Python signature)."""
    args, ret = schema.split("->")
    params = []
    for item in args.strip()[1:-1].split(","):
        kind, name = item.split()
        params.append((name, _TYPES[kind.split("(")[0]]))
    rets = [r.strip() for r in ret.strip().strip("()").split(",") if r.strip()]
    out = None if not rets else (torch.Tensor if len(rets) == 1 else Tuple[tuple(torch.Tensor for _ in rets)])
    names = ", ".join(n for n, _ in params)
    scope = {"_impl": impl}
    exec(f"def op({names}):\n    return _impl({names})\n", scope)  # noqa: S102  (names come from our own schemas)
    fn = scope["op"]
    fn.__annotations__ = {**dict(params), "return": out}
    return fn


def triton_launcher(path: str) -> Callable:
    """The host launcher ``imaml_kernels.triton.<path>`` (``"batchnorm.bn_fwd"``) as an
    :attr:`OpSpec.triton`, imported at its first call: :mod:`imaml_kernels.triton` imports
    ``triton``, which only a machine with Triton has (the op is then not registered)."""
    module, name = path.rsplit(".", 1)
    resolved = []

    def launch(*args, wrap):
        if not resolved:
            resolved.append(getattr(importlib.import_module(f"..triton.{module}", __package__), name))
        resolved[0](*args, wrap=wrap)

    launch.__name__ = launch.__qualname__ = name
    return launch


def _triton_launch(spec):
    from torch.library import wrap_triton

    def launch(*args):
        spec.triton(*args, wrap=wrap_triton)

    return launch


def register(spec: OpSpec) -> OpSpec:
    """Register ``spec``'s ops (see the module docstring) and add it to :data:`SPECS`."""
    if spec.name in SPECS:
        raise ValueError(f"imaml::{spec.name} is registered twice")
    SPECS[spec.name] = spec
    if spec.cpu is not None:
        # Defined on a torch.library.Library, not by custom_op: custom_op wraps each kernel in
        # torch._disable_dynamo, whose first call imports torch._dynamo (about 70 MiB of
        # modules) into every process that runs an op, compiled or not.
        _LIB.define(spec.name + spec.schema)
        _LIB.impl(spec.name, _implementation(spec, spec.cpu), "CPU")
        if spec.cuda is not None:
            _LIB.impl(spec.name, _implementation(spec, spec.cuda), "CUDA")
        torch.library.register_fake(f"imaml::{spec.name}", _fake(spec), lib=_LIB)
    if spec.triton is not None and triton_importable():
        from torch.library import triton_op

        top = triton_op(f"imaml::{spec.name}_triton", _typed(spec.schema, _implementation(spec, _triton_launch(spec))),
                        mutates_args=spec.mutates)
        top.register_fake(_fake(spec))
    return spec


def _arg_names(schema):
    return re.findall(r"(\w+)\s*[,)]", schema.split("->")[0])


def _prep(spec):
    """The argument preparation of ``spec`` (see :class:`OpSpec`)."""
    kept = set(spec.mutates) | set(spec.views)
    casts = dict(spec.casts)
    plan = [(n not in kept, casts.get(n)) for n in _arg_names(spec.schema)]

    def prep(*args):
        out = []
        for (contiguous, dtype), a in zip(plan, args):
            if isinstance(a, torch.Tensor):
                if dtype is not None:
                    a = a.to(dtype)
                if contiguous:
                    a = a.contiguous()
            out.append(a)
        return tuple(out)

    return prep


def bound(spec: OpSpec, backend: str) -> Callable:
    """The callable that runs ``spec`` on ``backend`` (``"cpu"``/``"cuda"``: ``imaml::<name>``;
    ``"triton"``: ``imaml::<name>_triton``; ``"reference"``: the twin), public arguments in
    (prepared as :class:`OpSpec` says)."""
    if backend in ("cpu", "cuda"):
        fn = getattr(torch.ops.imaml, spec.name)
    elif backend == "triton":
        fn = getattr(torch.ops.imaml, spec.name + "_triton")
    elif backend == "reference":
        fn = spec.reference
    else:
        raise ValueError(f"unknown backend {backend!r}")
    prep = _prep(spec)

    def run(*args):
        return fn(*prep(*args))

    run.__name__ = f"{spec.name}[{backend}]"
    return run
