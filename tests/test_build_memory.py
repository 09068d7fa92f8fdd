"""Building a table never makes an fp32 copy of it: every qembed table built without weights
(and a quantized table built from an fp32 one) needs at most a few percent of the fp32
table's size beyond what the module keeps.

torch's CPU allocations are invisible to tracemalloc, so each build runs in a fresh process
that reads its own peak resident set (VmHWM, reset just before the build through
/proc/self/clear_refs) and subtracts what it held before and what the module keeps. A fixed
malloc mmap threshold returns every freed block of 128 KiB or more to the system at once:
with glibc's adaptive one, freed blocks stay in the heap and the figure varied by several
MiB from run to run."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROWS, DIM = 1 << 19, 64
FP32 = ROWS * DIM * 4

BUILDS = {
    "quantized-affine": "qnn.QuantizedEmbeddingBag(R, D, bits=4)",
    "quantized-symmetric": "qnn.QuantizedEmbeddingBag(R, D, bits=4, format='symmetric')",
    "quantized-table-step": "qnn.QuantizedEmbeddingBag(R, D, bits=4, format='symmetric_table')",
    "quantized-from-fp32": "qnn.QuantizedEmbeddingBag(R, D, bits=4, _weight=given)",
    "low-precision": "qnn.LowPrecisionEmbeddingBag(R, D, bits=4, optimizer='sgd')",
    "low-precision-table-step": "qnn.LowPrecisionEmbedding(R, D, bits=2, step_per='table', "
                                "optimizer='sgd')",
    "mixed-precision": "qnn.MixedPrecisionEmbeddingBag(R, D, row_bits)",
    "mixed-precision-search": "qnn.MixedPrecisionSearchEmbeddingBag(R, D, num_groups=16)",
}

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from qembed import nn as qnn

    torch.set_num_threads(1)
    R, D = int(sys.argv[1]), int(sys.argv[2])

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def kept(m):  # bytes the module holds: parameters, buffers, the search's groups
        tensors = list(m.parameters()) + list(m.buffers())
        if hasattr(m, "groups"):
            tensors += list(vars(m.groups).values())
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in tensors if t is not None}
        return sum(storages.values())

    def build(rows, given, row_bits):
        R = rows
        return eval(sys.argv[3])

    given = torch.randn(R, D) if "given" in sys.argv[3] else None
    row_bits = torch.tensor([0, 2, 4, 8]).repeat(R // 4)
    build(1000, None if given is None else given[:1000], row_bits[:1000])  # lazy set-ups
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak resident set := current
    before = status("VmRSS:")
    module = build(R, given, row_bits)
    extra = status("VmHWM:") - before - kept(module)
    print(json.dumps({"extra": extra}))
""")


def can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not can_reset_peak(),
                    reason="needs /proc/self/clear_refs to reset the peak resident set")
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_building_a_table_makes_no_fp32_copy(name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(ROWS), str(DIM), BUILDS[name]],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    extra = json.loads(run.stdout.strip().splitlines()[-1])["extra"]
    assert extra <= 0.05 * FP32, f"{name}: {extra / 2**20:.1f} MiB beyond the module's own"
