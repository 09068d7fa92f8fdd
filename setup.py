"""Builds qembed._C: the C++ kernels always, the CUDA kernels when torch has CUDA and nvcc exists.
The package's metadata, dependencies (torch, numpy) and extras (triton, experiments, test) are
in pyproject.toml.

Environment switches:
  QEMBED_CUDA=0|1   force the CUDA kernels off or on (default: auto-detect)
  QEMBED_NATIVE=0   do not compile for the build machine's CPU (-march=native); for wheels
                    that must run on other machines
"""
import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    forced = os.environ.get("QEMBED_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc


def cuda_include_dirs():
    """Headers of the CUDA libraries that pip-installed torch builds ship as nvidia-* wheels
    (cusparse.h, cublas_v2.h, ...): ATen's CUDA headers include them, nvcc does not know
    where they are."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def extension():
    sources = ["csrc/qembed.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: no fused multiply-adds, so kernels round exactly as the reference.
    # No -std: torch's build adds the standard its headers need (C++20 from torch 2.14 on).
    # -fno-tree-loop-distribute-patterns: GCC turned the accumulators' zeroing and storing
    # loops into memset/memcpy calls, made once per bag.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-tree-loop-distribute-patterns"]
    if os.environ.get("QEMBED_NATIVE", "1") == "1":
        cxx += ["-march=native", "-mprefer-vector-width=512"]
    args = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    cls = cpp_extension.CppExtension
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if want_cuda() and cuda_sources:
        sources += cuda_sources
        args["nvcc"] = ["-O3", "--fmad=false"]
        include_dirs += cuda_include_dirs()
        cls = cpp_extension.CUDAExtension
    return cls(
        name="qembed._C",
        sources=sources,
        extra_compile_args=args,
        extra_link_args=["-fopenmp"],
        include_dirs=include_dirs,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
