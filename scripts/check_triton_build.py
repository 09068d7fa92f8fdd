"""Compile check of the Triton kernels for CUDA GPUs on a machine without one (CI).

The interpreter the tests use runs the kernels' Python, not Triton's compiler, so it misses
what only compilation meets: a launch argument equal to 1 becomes a compile-time constant,
type rules, layouts. Here the launch code of qembed.triton runs on CPU tensors with every
kernel replaced by a stub that specialises the arguments as Triton's launcher does and
compiles them for sm_80 and sm_90 (triton ships ptxas). The PTX must not contain approximate
division or square root, nor fused multiply-adds, which would break agreement with the CPU.
Nothing runs on a device.

  python scripts/check_triton_build.py
"""
from __future__ import annotations

import itertools
import os
import re
import sys
import time

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from qembed import formats
from qembed.triton import embedding_bag, lowp_update

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
INEXACT = re.compile(r"\b(div\.(approx|full)|sqrt\.approx|rsqrt|fma\.rn\.f32)")
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


class CompileOnly:
    """Stands in for a @triton.jit kernel: `stub[grid](*args, **kwargs)` compiles the
    specialisation a launch with these arguments would compile, for every target."""

    def __init__(self, fn):
        self.fn, self.seen, self.compiled = fn, set(), 0

    def __getitem__(self, grid):
        return self.run

    def run(self, *args, **kwargs):
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        bound = dict(zip(self.fn.arg_names, args), **kwargs)
        signature, constants = {}, {}
        for param in self.fn.params:
            value = bound[param.name]
            kind = "constexpr" if param.is_constexpr else \
                native_specialize_impl(BaseBackend, value, False, True, True)[0]
            signature[param.name] = kind
            if kind == "constexpr":
                constants[param.name] = value
        key = repr((sorted(signature.items()), sorted(constants.items()), sorted(options.items())))
        if key in self.seen:
            return
        self.seen.add(key)
        for target in TARGETS:
            compiled = triton.compile(ASTSource(self.fn, signature, constants), target=target,
                                      options=options)
            bad = sorted(set(m.group(0) for m in INEXACT.finditer(compiled.asm["ptx"])))
            if bad:
                sys.exit(f"check_triton_build: {self.fn.__name__} uses {', '.join(bad)} "
                         f"({constants})")
        self.compiled += 1


def lookups():
    """Every width, format and mode; the argument types a lookup can pass."""
    for bits, fmt, mode in itertools.product(range(1, 9), formats.FORMATS, formats.POOLINGS):
        dim = 8 if bits % 2 else 136
        rows = torch.zeros(3, formats.row_bytes(dim, bits, fmt), dtype=torch.uint8)
        step = torch.ones(1) if fmt == "symmetric_table" else None
        index = torch.int32 if bits < 5 else torch.int64
        indices, offsets = torch.tensor([1], dtype=index), torch.tensor([0], dtype=index)
        psw = None if mode == "mean" else torch.ones(1, dtype=torch.float16)
        out = torch.bfloat16 if bits == 3 else torch.float32
        embedding_bag.embedding_bag(rows, indices, offsets, psw, step, bits, dim,
                                    formats.FORMATS[fmt], formats.POOLINGS[mode], False, 1, out)


def updates():
    """Every optimizer, step update and rounding, both symmetric formats; seed and counter
    of 1 (compile-time constants)."""
    steps = [(False, 0), (True, 0), (True, 1)]
    for (opt, optimizer), fmt, (learn, step_opt), stochastic in itertools.product(
            formats.OPTIMIZERS.items(), ["symmetric", "symmetric_table"], steps, [True, False]):
        bits, dim = 1 + (optimizer + 2 * learn + step_opt) % 8, 16
        rows = torch.zeros(4, formats.row_bytes(dim, bits, fmt), dtype=torch.uint8)
        step = torch.ones(1) if fmt == "symmetric_table" else None
        state = torch.zeros(4, {"adagrad": 1, "adam": 2 * dim}.get(opt, 0))
        step_state = torch.zeros(4 if fmt == "symmetric" else 1, 2)
        weights = torch.zeros(1, dim) if opt == "none" else None
        lowp_update.lowp_update(rows, step, state, step_state, torch.tensor([1]),
                                torch.zeros(1, dim), weights, None, bits, dim,
                                formats.FORMATS[fmt], optimizer, 0.1, 1e-8, 0.0, 0.9, 0.999, 1,
                                learn, step_opt, 1e-3, stochastic, 1, 1)


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("check_triton_build: unset TRITON_INTERPRET (this checks the compiler)")
    start = time.time()
    stubs = {}
    for module, names in ((embedding_bag, ["_pool_kernel", "_rows_kernel"]),
                          (lowp_update, ["_update_kernel", "_table_step_kernel",
                                         "_encode_kernel"])):
        for name in names:
            stubs[name] = CompileOnly(getattr(module, name))
            setattr(module, name, stubs[name])
    lookups()
    updates()
    counts = ", ".join(f"{name} {stub.compiled}" for name, stub in stubs.items())
    print(f"check_triton_build: compiled for sm_80 and sm_90 in {time.time() - start:.0f} s: "
          f"{counts}")


if __name__ == "__main__":
    main()
