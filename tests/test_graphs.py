"""``imaml_kernels.graphs.CUDAGraphStep``: what is refused before any CUDA call (no warm-up, a
batch off the device) and the engine caches dropped after capture; capture and replay
themselves are in tests/test_gpu.py."""

import pytest
import torch

from imaml_kernels import graphs
from imaml_kernels.graphs import CUDAGraphStep


@pytest.mark.parametrize("warmup", [0, -1, 1.5, True])
def test_warmup_of_at_least_one_step(warmup):
    with pytest.raises(ValueError, match="warmup >= 1"):
        CUDAGraphStep(lambda x: x, [torch.ones(2)], warmup=warmup)


def test_batch_on_a_cuda_device():
    with pytest.raises(ValueError, match="on a CUDA device"):
        CUDAGraphStep(lambda x: x, [torch.ones(2)])
    with pytest.raises(ValueError, match="on a CUDA device"):
        CUDAGraphStep(lambda x: x, [])


def test_replay_refuses_a_batch_off_the_device():
    """A pinned host tensor copied with non_blocking=True would race with the caller reusing it:
    refused, as is a tensor on another device, before anything is copied."""
    g = object.__new__(CUDAGraphStep)  # no capture: the checks come first
    g.static = [torch.empty(2, 3, device="meta")]
    with pytest.raises(ValueError, match="captured on meta"):
        g(torch.ones(2, 3))
    with pytest.raises(ValueError, match="expected 1 batch tensors"):
        g(torch.ones(2, 3), torch.ones(2, 3))


def test_engine_data_caches_are_dropped():
    from imaml_kernels.nets import OmniglotConv

    torch.manual_seed(0)
    model = OmniglotConv(2, channels=4).double()
    eng = model.batched(backend="reference")
    x = torch.rand(2, 2, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(2).expand(2, -1).contiguous()
    eng.inner_loop(model.flat_params(), x, y, lam=2.0, steps=1, lr=0.1)
    assert eng._last_data is not None and eng._last_inner is not None
    graphs._forget_engine_data()
    assert eng._last_data is None and eng._last_inner is None
