"""The native build: CUDA sources compile for sm_80/sm_90a, the extension imports without a
GPU (and fails clearly when a CUDA kernel is called), the package imports without it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
NVCC = CUDA_HOME / "bin" / "nvcc"
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))


def test_cu_files_found():
    assert CU_FILES, "no .cu sources under csrc/"


@pytest.mark.skipif(not NVCC.exists(), reason=f"no nvcc at {NVCC} (set CUDA_HOME)")
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_sources_compile(cu, tmp_path):
    cmd = [
        str(NVCC), "-c", str(cu), "-o", str(tmp_path / "k.o"), "-std=c++17", "-O3",
        f"-I{ROOT / 'csrc'}", "-Xcompiler=-Wall",
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # Only CUDA and standard headers: no torch include may sneak in.
    assert "torch" not in cu.read_text()


def _run(code, env=None):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}
    )


@pytest.mark.skipif(not NVCC.exists(), reason=f"no nvcc at {NVCC}: the extension is built without CUDA")
def test_cuda_extension_imports_without_gpu_and_errors_clearly():
    code = (
        "import imaml_kernels._C as C\n"
        "assert C.has_cuda\n"
        "print('devices', C.cuda_device_count())\n"
        "try:\n"
        "    C.cg_dots_cuda(0, 0, 0, 0, 0, 1, 10, 4096, 0)\n"
        "except RuntimeError as e:\n"
        "    print('error:', e)\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    if "devices 0" in res.stdout:
        assert "error: imaml_kernels CUDA: cg_dots launch:" in res.stdout


def test_package_imports_without_extension():
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'imaml_kernels._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, imaml_kernels as ik\n"
        "msgs = [str(x.message) for x in w if 'imaml_kernels' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'pip install -e .' in msgs[0], msgs\n"
        "assert ik.select_backend('cpu', torch.float32) == 'reference'\n"
        "try:\n"
        "    ik.select_backend('cpu', torch.float32, 'cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'not built' in str(e)\n"
        "x, info = ik.cg_solve(lambda v: 2 * v, torch.ones(2, 3), iters=2)\n"
        "assert torch.allclose(x, torch.full((2, 3), 0.5))\n"
        "print('ok')\n"
    )
    res = _run(code, env={"IMAML_BACKEND": ""})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_cmake_is_the_build_description():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "pybind11_add_module(_C" in text and "check_language(CUDA)" in text
    setup = (ROOT / "setup.py").read_text()
    assert '"Ninja"' in setup and "--build" in setup
