"""How calls reach the kernels: each op's kernel for a CUDA device (compiled, or Triton's where
the extension has none) and the routes that qembed.ops.use_reference and use_triton force."""
import importlib

import pytest
import torch
from conftest import backends, random_table

from qembed import ops

CUDA_OPS = ["pack", "unpack", "quantize", "dequantize", "embedding_bag",
            "embedding_bag_backward", "embedding_bag_psw_backward", "lowp_update",
            "mpe_search_forward", "mpe_search_backward", "mpe_embedding_bag"]


@pytest.mark.parametrize("op", CUDA_OPS)
@pytest.mark.parametrize("backend", backends("cuda"))
def test_compiled_cuda_kernels_are_registered(backend, op):
    assert ops.HAS_EXTENSION
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qembed::{op}", "CUDA"), (
        f"qembed::{op} has no CUDA kernel: build with QEMBED_CUDA=1")


@pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("op", ops.TRITON_OPS)
def test_triton_ops_have_a_cuda_kernel(op):
    """Compiled or, for an extension built without CUDA, the Triton one."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qembed::{op}", "CUDA")


@pytest.mark.parametrize("backend", backends("triton-interpreter"))
def test_use_triton_routes_both_ops(backend, monkeypatch):
    calls = []
    for op in ops.TRITON_OPS:
        module = importlib.import_module(f"qembed.triton.{op}")
        monkeypatch.setattr(module, op, lambda *a, _op=op: calls.append(_op))
    t = random_table(4, 8, 4, "symmetric")
    with backend.context():
        t.lookup(torch.tensor([1]), torch.tensor([0]))
        ops.lowp_update(t.rows, None, torch.zeros(4, 0), torch.zeros(4, 0), torch.tensor([1]),
                        torch.zeros(1, 8), 4, 8, optimizer="sgd")
        with ops.use_reference():  # the innermost choice wins
            t.lookup(torch.tensor([1]), torch.tensor([0]))
    assert calls == ["embedding_bag", "lowp_update"]
