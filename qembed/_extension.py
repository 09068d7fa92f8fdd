"""Loading the compiled kernels, qembed._C.

A C++ extension is tied to the torch release it was compiled against: loaded into another, it
fails on a missing symbol, or worse. The build records that release in ``_build_info.json``
beside the library (setup.py); it is compared here before the library is loaded.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os

import torch

REBUILD = ("rebuild qembed against the installed torch: pip install --no-build-isolation "
           "--no-deps --force-reinstall <qembed source or sdist> (in a checkout: "
           "bash scripts/setup_env.sh)")


def build_info() -> dict | None:
    """What the build recorded (torch release, CUDA kernels, native), or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _release(version: str) -> str:
    """The release without its local label: "2.13.0+cpu" -> "2.13.0"."""
    return str(version).split("+")[0]


def mismatch(info: dict | None, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why a library built as ``info`` says cannot load into this torch, or None."""
    if not info or "torch" not in info:
        return None
    if _release(info["torch"]) != _release(torch_version):
        return (f"qembed's compiled kernels (qembed._C) were built against torch {info['torch']}, "
                f"but torch {torch_version} is installed; {REBUILD}")
    if info.get("cuda_kernels") and torch_cuda is None:
        return (f"qembed's compiled kernels (qembed._C) were built with CUDA kernels against a "
                f"CUDA build of torch {info['torch']}, but the installed torch {torch_version} "
                f"has no CUDA; {REBUILD}")
    return None


def load():
    """qembed._C, or None where it is not built. Raises ImportError, naming both releases and
    the rebuild command, where it was built against another torch."""
    if importlib.util.find_spec("qembed._C") is None:
        return None
    problem = mismatch(build_info(), torch.__version__, torch.version.cuda)
    if problem:
        raise ImportError(problem)
    try:
        return importlib.import_module("qembed._C")
    except ImportError as e:
        if "undefined symbol" not in str(e):
            raise
        raise ImportError(f"qembed._C does not fit torch {torch.__version__} ({e}); "
                          f"{REBUILD}") from e
