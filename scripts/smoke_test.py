"""Smoke test of an installed qembed (a wheel in a fresh environment): it imports with its
compiled kernels, a lookup matches the reference, one low-precision training step updates
the table, and the `qembed` command answers --help.

    python scripts/smoke_test.py     # with the environment's python, outside the checkout
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

import qembed
from qembed import ops, reference


def main() -> int:
    print(f"qembed {qembed.__version__} from {os.path.dirname(qembed.__file__)}; "
          f"torch {torch.__version__}")
    if not ops.HAS_EXTENSION:
        sys.exit("smoke_test: qembed._C did not load")
    print(f"CPU kernels: {ops.cpu_capability()} (this CPU runs "
          f"{', '.join(ops._C.supported_cpu_capabilities())})")

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 64, generator=gen)
    fp32 = torch.nn.EmbeddingBag.from_pretrained(weight, mode="sum")
    table = qembed.QuantizedEmbeddingBag.from_float(fp32, bits=4)
    indices = torch.randint(0, 1000, (256,), generator=gen)
    offsets = torch.arange(0, 256, 8)
    got = table(indices, offsets)
    want = reference.embedding_bag(table.qweight, indices, offsets, 4, 64, table.format,
                                   table.step)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("lookup: matches the reference")

    emb = qembed.LowPrecisionEmbeddingBag(1000, 64, mode="sum", bits=8, optimizer="adagrad")
    before = emb.qweight.clone()
    emb(indices, offsets).sum().backward()
    changed = (emb.qweight != before).any(1)
    touched = torch.isin(torch.arange(1000), indices)
    assert changed.any() and not changed[~touched].any()
    print(f"training step: {int(changed.sum())} of the {int(touched.sum())} rows read changed, "
          "no other row")

    exe = shutil.which("qembed", path=os.path.dirname(sys.executable)) or shutil.which("qembed")
    if exe is None:
        sys.exit("smoke_test: no qembed command installed")
    out = subprocess.run([exe, "--help"], check=True, capture_output=True, text=True).stdout
    assert "usage" in out.lower(), out
    print(f"{exe} --help: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
