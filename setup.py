"""Build and install moga.

The Python package lives in ``python/moga``; the Triton kernels in ``kernels/`` are installed as the
subpackage ``moga.kernels``. The compiled extension ``moga._C`` is built from ``csrc/``:

* the CPU part (``csrc/*.cpp`` and ``csrc/cpu/*.cpp``) always;
* the CUDA part (``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp``) when torch has CUDA and nvcc is found.
  ``MOGA_BUILD_CUDA=1`` forces it (and fails loudly if it cannot), ``MOGA_BUILD_CUDA=0`` skips it.
  ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0a``.
* ``MOGA_BUILD_EXT=0`` skips the extension entirely (pure Python install; the ``torch`` and ``triton``
  backends still work).

Objects are compiled by ninja in a fixed folder, ``build/ninja-<python>`` (``MOGA_BUILD_DIR`` overrides), not in
the temporary folder ``pip install -e`` would use: a rebuild recompiles only the sources whose text, included
headers (ninja's depfiles, torch's headers included) or compile command changed, then relinks. ``make build`` also
skips the whole step when no build input changed (see the Makefile).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_DIR = os.environ.get("MOGA_BUILD_DIR") or os.path.join(
    ROOT, "build", f"ninja-py{sys.version_info[0]}{sys.version_info[1]}"
)


def _packages() -> tuple[list[str], dict[str, str]]:
    pkgs = find_packages(where="python")
    package_dir = {"": "python", "moga.kernels": "kernels"}
    for sub in find_packages(where="kernels"):
        pkgs.append(f"moga.kernels.{sub}")
        package_dir[f"moga.kernels.{sub}"] = os.path.join("kernels", *sub.split("."))
    pkgs.append("moga.kernels")
    return pkgs, package_dir


def _want_cuda() -> bool:
    flag = os.environ.get("MOGA_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no"):
        return False
    import torch

    nvcc = shutil.which("nvcc") or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    )
    possible = torch.version.cuda is not None and bool(nvcc)
    if flag in ("1", "true", "yes"):
        if not possible:
            raise RuntimeError(
                "MOGA_BUILD_CUDA=1 but the CUDA part cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, nvcc found={bool(nvcc)}"
            )
        return True
    return possible


def _extensions() -> tuple[list, dict]:
    if os.environ.get("MOGA_BUILD_EXT", "1").strip() == "0":
        return [], {}
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpu_sources:
        return [], {}
    from torch.utils import cpp_extension

    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 for torch 2.11, C++20
    # for torch >= 2.12), and our sources compile under both.
    cxx = ["-O3", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        # ATen/cuda/CUDAContext.h includes cusparse.h, which ships in the nvidia pip wheels, not in CUDA_HOME.
        try:
            import nvidia

            for root in nvidia.__path__:
                for cand in ("cu13", "cu12"):
                    inc = os.path.join(root, cand, "include")
                    if os.path.isdir(inc):
                        include_dirs.append(inc)
        except ImportError:
            pass
        cuda_sources = sorted(
            glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
        )
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension(
            "moga._C",
            sources=cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("MOGA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + ["-DMOGA_WITH_CUDA=1"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "moga._C",
            sources=cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": _persistent_build_ext(cpp_extension.BuildExtension)}


def _persistent_build_ext(base: type) -> type:
    """torch's BuildExtension (ninja) compiling into BUILD_DIR whatever build folder setuptools or pip chose, so
    ninja's objects and .ninja_log survive between builds. Ninja rebuilds an object when its source, a header it
    includes or its command line changed (another torch, flags, arch list or include path): reuse is safe."""

    class PersistentBuildExtension(base.with_options(use_ninja=True)):
        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = BUILD_DIR

    return PersistentBuildExtension


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()

setup(
    name="moga",
    version="0.1.0",
    description="GPU kernels for Mixture-of-Groups Attention (MoGA)",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_data={"moga.backends": ["auto_table.json"]},  # backend="auto"'s measured order
    package_dir=package_dir,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "diffusers", "pytest-timeout"],
        "bench": ["tqdm", "matplotlib"],
    },
    entry_points={"console_scripts": ["moga=moga.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
