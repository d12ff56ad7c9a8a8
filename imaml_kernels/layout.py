"""Mapping between parameter dicts of ``[T, ...]`` tensors and flat ``[T, P]`` buffers."""

import math
from typing import Dict, Mapping

import torch


class ParamLayout:
    """The per-task layout of a parameter dict: names, shapes, offsets into a flat ``[T, P]``.

    ``unflatten`` returns views into the flat buffer (no copy); ``flatten`` always makes one
    new buffer (one ``torch.cat``), even from views of a flat buffer.

    Example::

        >>> layout = ParamLayout.from_params({"w": torch.zeros(4, 3, 2), "b": torch.zeros(4, 3)})
        >>> flat = layout.flatten(params)          # [4, 9]
        >>> layout.unflatten(flat)["w"].shape      # torch.Size([4, 3, 2]), a view of flat
    """

    def __init__(self, shapes: Mapping[str, torch.Size]):
        self.names = list(shapes)
        self.shapes = {k: torch.Size(s) for k, s in shapes.items()}
        self.numels = {k: math.prod(s) for k, s in self.shapes.items()}
        self.offsets = {}
        off = 0
        for k in self.names:
            self.offsets[k] = off
            off += self.numels[k]
        self.numel = off

    @classmethod
    def from_params(cls, params: Mapping[str, torch.Tensor], batched: bool = True):
        """Layout of ``params``; with ``batched`` the leading ``T`` dim is not part of the layout."""
        return cls({k: (v.shape[1:] if batched else v.shape) for k, v in params.items()})

    def __repr__(self):
        return f"ParamLayout(P={self.numel}, {dict(self.shapes)})"

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{name: [T, *shape]}`` -> ``[T, P]``."""
        missing = [k for k in self.names if k not in params]
        if missing:
            raise KeyError(f"parameters missing from the dict: {missing}")
        T = params[self.names[0]].shape[0]
        parts = []
        for k in self.names:
            v = params[k]
            if tuple(v.shape[1:]) != tuple(self.shapes[k]) or v.shape[0] != T:
                raise ValueError(f"{k}: expected shape [{T}, {', '.join(map(str, self.shapes[k]))}], got {list(v.shape)}")
            parts.append(v.reshape(T, -1))
        return torch.cat(parts, dim=1)

    def as_flat(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`flatten` for a caller that will not write to the result: when ``params`` are
        the views :meth:`unflatten` made of one ``[T, P]`` buffer (in order), that buffer,
        with no copy; else a new buffer. A host-side test of strides and storages, no sync."""
        if not torch.compiler.is_compiling():
            flat = self._viewed_buffer(params)
            if flat is not None:
                return flat
        return self.flatten(params)

    def _viewed_buffer(self, params):
        first = params.get(self.names[0]) if self.names else None
        if not isinstance(first, torch.Tensor) or first.dim() < 1:
            return None
        T, storage = first.shape[0], first.untyped_storage()._cdata
        row = first.stride(0) if T > 1 else self.numel
        base = first.storage_offset() - self.offsets[self.names[0]]
        for k in self.names:
            v = params.get(k)
            if (not isinstance(v, torch.Tensor) or v.dtype != first.dtype or v.device != first.device
                    or tuple(v.shape) != (T, *self.shapes[k]) or v.untyped_storage()._cdata != storage
                    or v.storage_offset() != base + self.offsets[k]):
                return None
            if T > 1 and v.stride(0) != row:
                return None
            expect = 1
            for size, stride in zip(reversed(v.shape[1:]), reversed(v.stride()[1:])):
                if size != 1 and stride != expect:
                    return None
                expect *= size
        if base < 0 or (row < self.numel and row != 0):  # row 0: one row expanded to T (read-only)
            return None
        return first.as_strided((T, self.numel), (row, 1), base)

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``[T, P]`` -> ``{name: [T, *shape]}``, views into ``flat``."""
        if flat.dim() != 2 or flat.shape[1] != self.numel:
            raise ValueError(f"expected a flat [T, {self.numel}] tensor, got {list(flat.shape)}")
        T = flat.shape[0]
        return {
            k: flat[:, self.offsets[k] : self.offsets[k] + self.numels[k]].view(T, *self.shapes[k]) for k in self.names
        }
