"""Builds qembed._C: the C++ kernels always, the CUDA kernels when torch has CUDA and nvcc exists.
The package's metadata, dependencies (torch, numpy) and extras (triton, experiments, test) are
in pyproject.toml.

The build is portable: it runs on any CPU of its architecture. On x86-64 the CPU kernels in
csrc/cpu/isa/ are compiled three times, for the scalar baseline, AVX2 and AVX-512, and the
library picks the best the CPU supports when it loads (csrc/cpu/dispatch.h).

Environment switches:
  QEMBED_CUDA=0|1   force the CUDA kernels off or on (default: auto-detect)
  QEMBED_NATIVE=1   compile everything, kernel variants included, for the build machine's CPU
                    (-march=native): the library then runs only on CPUs with its instruction
                    sets. For comparing against the portable build.
  QEMBED_CPU_VARIANTS=0  the CPU kernels for the baseline alone, no AVX2/AVX-512 variants:
                    a third of their compile time, for compile checks
                    (scripts/check_cuda_build.sh); slower kernels
  QEMBED_EXTENSION=0  leave the library out: the package alone (CI installs it editable and
                    takes the library from the wheel it builds, scripts/setup_env.sh)
"""
import glob
import json
import os
import platform
import shutil

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.environ.get("QEMBED_NATIVE", "0") == "1"
# Whether the AVX2 and AVX-512 kernel variants are compiled; elsewhere (other architectures,
# MSVC), or with QEMBED_CPU_VARIANTS=0, the scalar one alone.
X86_VARIANTS = (platform.machine().lower() in ("x86_64", "amd64") and os.name == "posix"
       and os.environ.get("QEMBED_CPU_VARIANTS", "1") != "0")


def kernel_variants():
    """Name -> compiler flags of each CPU kernel variant (csrc/cpu/dispatch.h)."""
    if NATIVE:
        native = ["-march=native", "-mprefer-vector-width=512"]
        names = ("scalar", "avx2", "avx512") if X86_VARIANTS else ("scalar",)
        return {name: native for name in names}
    variants = {"scalar": []}
    if X86_VARIANTS:
        variants["avx2"] = ["-march=x86-64-v3"]
        # 512-bit vectors wherever GCC vectorizes: its generic tuning prefers 256. GCC 12
        # warns about its own AVX-512 intrinsics (_mm512_undefined_*), thousands of lines.
        variants["avx512"] = ["-march=x86-64-v4", "-mavx512vbmi", "-mprefer-vector-width=512",
                              "-Wno-maybe-uninitialized"]
    return variants


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
    if NATIVE:
        cxx += ["-march=native", "-mprefer-vector-width=512"]
    args = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    macros = [("QEMBED_X86_KERNELS", "1")] if X86_VARIANTS else []
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
        define_macros=macros,
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build, plus the CPU kernel variants: setuptools compiles an extension's sources
    with one set of flags, so each variant's objects are compiled here, each with its own
    flags and QEMBED_ISA naming its namespace (csrc/isa_namespace.h), and linked in as extra
    objects. Also records the torch release the library is built against, which
    qembed/_extension.py compares with the one it is loaded into."""

    def build_extension(self, ext):
        kernels = sorted(glob.glob(os.path.join("csrc", "cpu", "isa", "*.cpp")))
        cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) \
            else list(ext.extra_compile_args)
        for name, flags in kernel_variants().items():
            # The ninja build in torch's wrapper takes per-language flags as a dict.
            ext.extra_objects += self.compiler.compile(
                kernels, output_dir=os.path.join(self.build_temp, "isa", name),
                macros=ext.define_macros + [("QEMBED_ISA", name)],
                include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs={"cxx": cxx + flags}, depends=ext.depends)
        super().build_extension(ext)
        import torch

        info = {"torch": str(torch.__version__),
                "cuda_kernels": any(s.endswith(".cu") for s in ext.sources), "native": NATIVE}
        folders = {os.path.dirname(self.get_ext_fullpath(ext.name))}
        if self.inplace or getattr(self, "editable_mode", False):  # the library goes there too
            folders.add(os.path.join(ROOT, "qembed"))
        for folder in folders:
            with open(os.path.join(folder, "_build_info.json"), "w") as f:
                json.dump(info, f)


setup(
    ext_modules=[extension()] if os.environ.get("QEMBED_EXTENSION", "1") != "0" else [],
    cmdclass={"build_ext": BuildExtension},
)
