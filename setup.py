"""Drives the CMake build of ``imaml_kernels._C`` (CMakeLists.txt is the one description).

``pip install .`` and ``pip install -e .`` both work. Environment knobs:

- ``CUDA_HOME``: CUDA toolkit root (default ``/usr/local/cuda``); CUDA kernels build when
  its ``bin/nvcc`` exists.
- ``IMAML_SKIP_CUDA=1``: do not build the CUDA kernels.
- ``IMAML_CUDA_ARCHS``: CMake architecture list, default ``80;90a``.
- ``IMAML_BUILD_JOBS``: parallel compile jobs (default: all cores).
- ``IMAML_SKIP_EXT=1``: skip the native build (pure-Python install: reference and Triton paths).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _cmake_executable():
    exe = shutil.which("cmake")
    if exe is None:
        try:
            import cmake  # the PyPI package ships a binary

            exe = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            raise RuntimeError("CMake >= 3.22 is required to build imaml_kernels._C (pip install cmake)")
    return exe


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if os.environ.get("IMAML_SKIP_EXT") == "1":
            print("imaml_kernels: IMAML_SKIP_EXT=1, skipping the native extension")
            return
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            "-G",
            "Ninja",
        ]
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        nvcc = Path(cuda_home) / "bin" / "nvcc"
        if os.environ.get("IMAML_SKIP_CUDA") == "1":
            args.append("-DIMAML_SKIP_CUDA=ON")
        elif nvcc.exists():
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={cuda_home}"]
        else:
            args.append("-DIMAML_SKIP_CUDA=ON")
            print(f"imaml_kernels: no nvcc at {nvcc}; building the CPU kernels only")
        if "IMAML_CUDA_ARCHS" in os.environ:
            args.append(f"-DIMAML_CUDA_ARCHS={os.environ['IMAML_CUDA_ARCHS']}")
        jobs = os.environ.get("IMAML_BUILD_JOBS", str(os.cpu_count() or 1))
        cmake = _cmake_executable()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("imaml_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
