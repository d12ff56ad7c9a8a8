"""A stand-in CUDA runtime for a CPU-only torch: a CPU-only build has no CUDA device guard or
hooks, so its autograd engine cannot run a backward pass on fake ``cuda`` tensors.
:data:`FAKE_CUDA_SOURCE` (a no-op device guard and CUDA hooks that report "built, not
available") is compiled once with the C++ compiler, cached, and loaded by the counting
subprocess before torch is imported (:func:`bench.launches.counting.measure`)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import torch


def cuda_ready() -> bool:
    """Whether fake ``cuda`` tensors can run a backward pass in this process."""
    if torch.backends.cuda.is_built():
        return True
    acc = torch._C._accelerator_getAccelerator()
    return acc is not None and acc.type == "cuda"


FAKE_CUDA_SOURCE = r"""
// A stand-in CUDA runtime for counting ops on fake "cuda" tensors with a CPU-only torch:
// a device guard (streams and events are no-ops) and CUDA hooks that report "built, not
// available", so that the autograd engine's stream bookkeeping runs. Nothing can execute on
// it: every tensor must be a FakeTensor. Load it before torch is imported.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace imaml_fake {
struct CUDAHooks : public at::CUDAHooksInterface {
  explicit CUDAHooks(at::CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return false; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  void init() const override {}
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  void setCurrentDevice(c10::DeviceIndex) const override {}
  c10::DeviceIndex current_device() const override { return 0; }
  int getNumGPUs() const override { return 1; }
};
}  // namespace imaml_fake

namespace at {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", imaml_fake::CUDAHooks)
}

static bool registered_guard = [] {
  if (c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA)) return false;
  static c10::impl::DeviceGuardImplRegistrar reg(
      c10::DeviceType::CUDA, new c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>());
  return true;
}();

extern "C" int imaml_fake_cuda_guard_registered() { return registered_guard ? 1 : 0; }
"""


def fake_cuda_library() -> Path:
    """The compiled :data:`FAKE_CUDA_SOURCE` for this torch (built once, then cached under
    ``$IMAML_CACHE`` or ``~/.cache/imaml_kernels``)."""
    tdir = Path(torch.__file__).parent
    key = hashlib.sha1(f"{FAKE_CUDA_SOURCE}{torch.__version__}{tdir}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("IMAML_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imaml_kernels")
    so = cache / f"fakecuda-{key}.so"
    if so.exists():
        return so
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"fakecuda-{key}.cpp"
    src.write_text(FAKE_CUDA_SOURCE)
    tmp = so.with_name(f".{so.name}.{os.getpid()}")
    cmd = [
        os.environ.get("CXX", "c++"), "-O1", "-shared", "-fPIC", "-std=c++20", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-I", str(tdir / "include"),
        str(src), "-L", str(tdir / "lib"), "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{tdir / 'lib'}", "-o", str(tmp),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise RuntimeError(f"bench.launches: no C++ compiler ({cmd[0]}) to build the stand-in CUDA runtime") from exc
    if proc.returncode:
        raise RuntimeError(f"bench.launches: building the stand-in CUDA runtime failed:\n{proc.stderr[-3000:]}")
    os.replace(tmp, so)
    return so
