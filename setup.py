"""Builds tellneo._C (the packed-sequence mixer) by driving CMake.

Build switches (environment variables):

  TELLNEO_CUDA        auto (default) | 0 | 1
                      auto: compile the CUDA sources when nvcc is found, and fall back to a CPU-only build
                            (with a loud warning) if the CUDA part fails to configure or compile;
                      0:    never compile CUDA;
                      1:    compile CUDA or fail (nvcc must be found).
  TELLNEO_CUDA_ARCHS  CMake CUDA architectures, default "80;90" (A100, H100/H200).
  TELLNEO_BUILD_JOBS  parallel compile jobs (default: CPU count).
  TELLNEO_BUILD_TYPE  CMake build type (default: Release).
  CUDA_HOME           where nvcc lives (bin/nvcc); when unset, nvcc on PATH, then /usr/local/cuda.

torch is deliberately not a build requirement: the extension takes raw pointers and a CUDA stream handle from
Python, so `pip install .` works with build isolation in a fresh virtual environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    """$CUDA_HOME/bin/nvcc (or $CUDA_PATH) when set, and only there; else nvcc on PATH, else /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidates = [Path(home) / "bin" / "nvcc"]
    else:
        on_path = shutil.which("nvcc")
        candidates = ([Path(on_path)] if on_path else []) + [Path("/usr/local/cuda/bin/nvcc")]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def cmake_executable() -> str:
    try:
        import cmake  # the PyPI package, present in the isolated build environment

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if not found:
            raise RuntimeError("tellneo: cmake not found; `pip install cmake` or build with build isolation")
        return found


def ninja_executable() -> str | None:
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        return shutil.which("ninja")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        mode = os.environ.get("TELLNEO_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise RuntimeError(f"tellneo: TELLNEO_CUDA must be auto, 0 or 1, got {mode!r}")
        nvcc = find_nvcc()
        if mode == "1" and nvcc is None:
            raise RuntimeError(
                "tellneo: TELLNEO_CUDA=1 but nvcc was not found (looked in $CUDA_HOME/bin when CUDA_HOME is set, "
                "else on $PATH and in /usr/local/cuda/bin); install the CUDA toolkit or build with TELLNEO_CUDA=auto"
            )
        want_cuda = nvcc is not None and mode in ("auto", "1")
        if want_cuda:
            try:
                self._cmake_build(ext, nvcc)
                return
            except subprocess.CalledProcessError:
                if mode == "1":
                    raise
                print(
                    "\n" + "!" * 78 + "\ntellneo: building the CUDA sources with "
                    f"{nvcc} failed; building the CPU-only extension instead (TELLNEO_CUDA=auto).\n"
                    "Set TELLNEO_CUDA=1 to make this an error.\n" + "!" * 78 + "\n",
                    file=sys.stderr,
                )
        self._cmake_build(ext, None)

    def _cmake_build(self, ext: Extension, nvcc: str | None) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ("cuda" if nvcc else "cpu")
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('TELLNEO_BUILD_TYPE', 'Release')}",
            f"-DTELLNEO_VERSION={self.distribution.get_version()}",
            f"-DTELLNEO_WITH_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        ninja = ninja_executable()
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if nvcc:
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DTELLNEO_CUDA_ARCHS={os.environ.get('TELLNEO_CUDA_ARCHS', '80;90')}",
            ]
        jobs = os.environ.get("TELLNEO_BUILD_JOBS", str(os.cpu_count() or 1))
        cmake = cmake_executable()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


packages = find_packages(include=["tellneo", "tellneo.*"]) + ["tellneo.kernels"]

setup(
    packages=packages,
    package_dir={"tellneo.kernels": "kernels"},
    ext_modules=[CMakeExtension("tellneo._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
