"""Checks that qembed._C runs on any x86-64 CPU: code built for AVX2 or AVX-512 lies only in
the CPU kernel variants (csrc/cpu/dispatch.h), which run only where the CPU has it.

The variants compile the same sources with different flags. Wherever one of them emits an
inline function out of line (ours, the standard library's), the linker keeps a single copy
for every caller of that name: were it an AVX-512 copy, an AVX2 CPU would crash in a caller
that never asked for AVX-512. So every function a variant defines lies in its namespace,
qembed::<variant> (csrc/isa_namespace.h), and this script checks the result in the built
library (objdump, nm):

1. a function using any instruction beyond baseline x86-64 (VEX or EVEX encoded: AVX and
   later, mask registers; BMI1/2, LZCNT, MOVBE, POPCNT) lies in qembed::avx2 or
   qembed::avx512;
2. a function using AVX-512 (zmm or mask registers, xmm/ymm16-31, masking, embedded
   broadcasts, EVEX-only instructions) lies in qembed::avx512;
and, with --objects (the build's temporary folder; setup.py compiles variant V's objects
into isa/V/ there), in each variant's objects:
3. every global or weak symbol names the variant's namespace (so no other code can be linked
   to it), and no static initializer exists (it would run when the library loads, on any CPU).

Names count as inside a namespace when they mention it anywhere: std::min<qembed::avx2::X>
is as private to avx2 as qembed::avx2::f. A native build (QEMBED_NATIVE=1) fails 1 and 2
by design.

    python scripts/check_isa_code.py [LIBRARY] [--objects BUILD_TEMP]

LIBRARY defaults to the qembed._C this Python imports. Exits 1 listing the offenders.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys

VARIANTS = ("scalar", "avx2", "avx512")
# Baseline x86-64 has none of these general-purpose instructions.
GPR_EXTENSIONS = {"andn", "bextr", "blsi", "blsmsk", "blsr", "bzhi", "mulx", "pdep", "pext",
                  "rorx", "sarx", "shlx", "shrx", "lzcnt", "movbe", "popcnt"}
# VEX/EVEX mnemonics start with v (but verr, verw), mask-register ones with k.
EXTENDED = re.compile(r"^(v(?!err|erw)|k)[a-z]")
AVX512_OPERANDS = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{%k|\{1to|\{z\}")
AVX512_MNEMONICS = re.compile(
    r"^v(pternlog|movdq[au](8|16|32|64)|perm[it]2|permb|permw$|pcompress|pexpand|compress|"
    r"expand|align[dq]|pro[lr]|psraq|psravq|pabsq|pm(ax|in)[su]q|pmullq|rcp14|rsqrt14|scalef|"
    r"getexp|getmant|rndscale|reduce|fixupimm|range|dbpsadbw|plzcnt|pconflict|popcnt|pmadd52|"
    r"pmultishiftqb|pshl?dv?|pshrdv?|cvtt?(ps|pd|ss|sd)2u|cvtu|cvt(t?)(ps|pd)2qq|cvtqq|"
    r"extract[fi](32x|64x)|insert[fi](32x|64x)|broadcast[fi](32x|64x)|shuf[fi](32|64)x|"
    r"pbroadcastm|pmovm2|pmov[bwdq]2m|pmov[dqw][bdw]$|pmovu?s[dqw][bdw]$|ptestn?m|fpclass|"
    r"pcmpu?[bwdq]$)")


def default_library() -> str:
    import qembed.ops

    if not qembed.ops.HAS_EXTENSION:
        sys.exit("check_isa_code: qembed._C is not built")
    return qembed.ops._C.__file__


def functions(library: str):
    """(name, set of instruction kinds) per function of the library's code: "extended" for
    anything beyond baseline x86-64, "avx512" for AVX-512."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", "--wide", library],
                         check=True, capture_output=True, text=True).stdout
    name, kinds = None, set()
    header = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    for line in out.splitlines():
        m = header.match(line)
        if m:
            if name is not None:
                yield name, kinds
            name, kinds = m.group(1), set()
            continue
        parts = line.split("\t")
        if name is None or len(parts) < 2:
            continue
        insn = parts[1].strip()
        mnemonic = insn.split(" ", 1)[0]
        if mnemonic in ("rex", "lock", "rep", "repz", "repnz", "notrack", "bnd", "data16") \
                and " " in insn:
            mnemonic = insn.split()[1]
        if EXTENDED.match(mnemonic) or mnemonic in GPR_EXTENSIONS:
            kinds.add("extended")
        if AVX512_OPERANDS.search(insn) or AVX512_MNEMONICS.match(mnemonic):
            kinds.add("avx512")
    if name is not None:
        yield name, kinds


def check_library(library: str) -> list[str]:
    problems = []
    counts = {"extended": 0, "avx512": 0}
    for name, kinds in functions(library):
        in_avx512 = "qembed::avx512::" in name
        in_vector = in_avx512 or "qembed::avx2::" in name
        for kind in kinds:
            counts[kind] += 1
        if "avx512" in kinds and not in_avx512:
            problems.append(f"{library}: {name} uses AVX-512 outside qembed::avx512")
        elif "extended" in kinds and not in_vector:
            problems.append(f"{library}: {name} uses instructions beyond baseline x86-64 "
                            "outside qembed::avx2 and qembed::avx512")
    print(f"check_isa_code: {library}: {counts['extended']} functions use instructions beyond "
          f"baseline x86-64, {counts['avx512']} of them AVX-512", file=sys.stderr)
    if counts["extended"] == 0:
        problems.append(f"{library}: no AVX2 or AVX-512 code at all: were the variants built?")
    return problems


def check_objects(build_temp: str) -> list[str]:
    problems, seen = [], 0
    for variant in VARIANTS:
        for obj in sorted(glob.glob(os.path.join(build_temp, "isa", variant, "**", "*.o"),
                                    recursive=True)):
            seen += 1
            nm = subprocess.run(["nm", "-C", "--defined-only", obj], check=True,
                                capture_output=True, text=True).stdout
            for line in nm.splitlines():
                fields = line.split(" ", 2)
                if len(fields) < 3:
                    continue
                kind, name = fields[1], fields[2]
                if name.startswith("_GLOBAL__sub_I"):
                    problems.append(f"{obj}: static initializer {name}")
                elif kind.isupper() and f"qembed::{variant}::" not in name:
                    problems.append(f"{obj}: {kind} {name} lies outside qembed::{variant}")
    if seen == 0:
        problems.append(f"{build_temp}: no objects under isa/<variant>/")
    else:
        print(f"check_isa_code: {seen} variant objects in {build_temp}", file=sys.stderr)
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("library", nargs="?", help="the built qembed._C (default: the imported one)")
    p.add_argument("--objects", help="the build's temporary folder, to check each variant's "
                   "objects too")
    a = p.parse_args(argv)
    problems = check_library(a.library or default_library())
    if a.objects:
        problems += check_objects(a.objects)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"check_isa_code: {'FAILED' if problems else 'ok'}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
