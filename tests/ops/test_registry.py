"""The registration of every kernel as ``imaml::`` ops (:mod:`imaml_kernels.ops._registry`):
one op-family test file per family, the Triton launches seen without running them, no empty
grid at T = 0, and a machine without Triton."""

import os
import subprocess
import sys

import torch

import imaml_kernels as ik
from imaml_kernels import ops
from imaml_kernels.dispatch import op

from .common import FAMILIES, device, runs


def test_every_op_has_a_family_test_file_and_a_twin():
    names = [n for family in FAMILIES.values() for n in family]
    assert sorted(names) == sorted(ops.SPECS), set(names) ^ set(ops.SPECS)
    here = os.path.dirname(__file__)
    assert all(os.path.exists(os.path.join(here, f"test_{family}.py")) for family in FAMILIES)
    for name, spec in ops.SPECS.items():
        assert callable(spec.reference) and callable(spec.fake), name


@runs("cpu")
def test_record_triton_launches_sees_every_launch_without_running_it():
    seen = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append((self.fn.__name__, tuple(grid), kw))

    x = torch.randn(3, 40, 5)
    g, b = torch.rand(3, 5) + 0.5, torch.randn(3, 5)
    with ops.record_triton_launches(Recorder):
        op("bn_fwd", "cpu")(x, g, b, 1e-5, True)
        op("softmax_ce", "cpu")(torch.randn(3, 4, 5), torch.zeros(3, 4, dtype=torch.int64))
        op("softmax_ce", "reference")(torch.randn(3, 4, 5), torch.zeros(3, 4, dtype=torch.int64))  # no op: unseen
    names = [s[0] for s in seen]
    assert names == ["_bn_fwd_kernel", "_softmax_ce_kernel"] or (names[-1] == "_softmax_ce_kernel" and "bn_" in names[0]), names
    assert all(all(d >= 1 for d in grid) for _, grid, _ in seen)
    n = len(seen)
    op("bn_fwd", "cpu")(x, g, b, 1e-5, True)
    assert len(seen) == n  # inactive outside the context


@runs("cpu")
@runs("triton")
def test_empty_task_batch_launches_nothing():
    """T = 0 runs every backend without launching an empty grid."""
    for backend in ("cpu", "triton", "reference"):
        dev = device(backend)
        x = torch.randn(0, 7, 3, device=dev)
        y, xhat, rstd = op("bn_fwd", backend)(x, torch.ones(0, 3, device=dev), torch.zeros(0, 3, device=dev), 1e-5, True)
        assert y.shape == (0, 7, 3) and rstd.shape == (0, 3)
        b = torch.zeros(0, 5, device=dev)
        xs, info = ik.cg_solve(lambda v: 2 * v, b, iters=3, backend=backend)
        assert xs.shape == (0, 5) and info.iterations.shape == (0,)


def test_import_without_triton_is_silent(tmp_path):
    """Without triton, importing the package prints nothing from op registration and registers
    no Triton op; the C++ and reference backends still work."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, imaml_kernels as ik\n"
        "assert not ik._ext.triton_importable()\n"
        "assert not hasattr(torch.ops.imaml, 'bn_fwd_triton') and hasattr(torch.ops.imaml, 'bn_fwd')\n"
        "x, info = ik.cg_solve(lambda v: 2 * v, torch.ones(2, 3), iters=2)\n"
        "print(float(x.sum()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3.0" and out.stderr == "", out.stderr


@runs("cpu")
def test_running_the_ops_does_not_import_dynamo():
    """The C++ ops, and a fused-engine meta-gradient built on them, leave ``torch._dynamo``
    unimported (``custom_op`` kernels import it at their first call: about 70 MiB of modules in
    every process that runs one)."""
    code = (
        "import sys, torch, imaml_kernels as ik\n"
        "from imaml_kernels.dispatch import op\n"
        "from imaml_kernels.nets import OmniglotConv\n"
        "op('bn_fwd', 'cpu')(torch.randn(3, 40, 5), torch.ones(3, 5), torch.zeros(3, 5), 1e-5, True)\n"
        "model = OmniglotConv(3, channels=4)\n"
        "theta = dict(model.named_parameters())\n"
        "x, y = torch.randn(2, 3, 1, 28, 28), torch.arange(3).repeat(2, 1)\n"
        "g, info = ik.implicit_meta_grad(model, theta, (x, y), (x, y), lam=2.0, inner=ik.GD(2, 0.1), cg_iters=2)\n"
        "assert info['plan'].path == 'engine', info['plan']\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
