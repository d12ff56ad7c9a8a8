"""The peak of what PyTorch allocated, independent of the C allocator's caching, of module
imports and of anything else in the process's resident size:

- :func:`allocator_peak_bytes`: from the CPU allocator's own allocation and free records
  (``torch.profiler`` with ``profile_memory``): every ATen allocation, inside custom ops too;
- :class:`PeakTensorBytes`: live tensor storages seen through a ``TorchDispatchMode`` (works
  under ``torch.func`` transforms: the mode sees the unwrapped tensors), op outputs only.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def allocator_peak_bytes(fn):
    """The peak of the bytes held by PyTorch's CPU allocator while ``fn()`` runs, counted from the
    allocator's own allocation and free records (``torch.profiler`` with ``profile_memory``):
    what ``fn`` allocates on top of what was alive before, independent of timing and of the
    process's resident size (module imports, the C allocator's cache)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


class PeakTensorBytes(TorchDispatchMode):
    """``with PeakTensorBytes() as m: ...`` then ``m.peak`` (bytes above the start).

    Storages that existed before entering are not counted; a storage is counted from the op
    that produced it until it is freed (checked every ``purge_every`` ops, so a free can be
    seen up to that many ops late: the peak is an upper bound within that window).
    """

    def __init__(self, purge_every=16):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0
        self.purge_every = purge_every
        self._ops = 0

    def _purge(self):
        dead = [k for k, (ref, _) in self.live.items() if torch.UntypedStorage._expired(ref)]
        for k in dead:
            ref, n = self.live.pop(k)
            torch.UntypedStorage._free_weak_ref(ref)
            self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._ops += 1
        if self._ops % self.purge_every == 0:
            self._purge()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                try:
                    st = t.untyped_storage()
                    key = st.data_ptr()
                except (RuntimeError, NotImplementedError):  # wrappers without a real storage
                    continue
                if key in self.live:
                    ref, n = self.live[key]
                    if not torch.UntypedStorage._expired(ref):
                        continue
                    torch.UntypedStorage._free_weak_ref(ref)
                    self.current -= n
                    del self.live[key]
                n = st.nbytes()
                self.live[key] = (st._weak_ref(), n)
                self.current += n
                self.peak = max(self.peak, self.current)
        return out

    def __exit__(self, *exc):
        self._purge()
        for ref, _ in self.live.values():
            torch.UntypedStorage._free_weak_ref(ref)
        self.live.clear()
        return super().__exit__(*exc)
