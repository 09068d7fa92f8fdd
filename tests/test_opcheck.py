"""torch.library.opcheck on every qembed operator (schema, fake tensor, autograd
registration, AOT dispatch with dynamic shapes) with a few representative argument sets."""
import pytest
import torch
from conftest import random_bags, random_table

from qembed import formats, ops

FMT = formats.FORMATS


def codes(n, dim, bits):
    return torch.randint(0, 1 << bits, (n, dim), dtype=torch.uint8)


def raw_bytes(n, width):
    return torch.randint(0, 256, (n, width), dtype=torch.uint8)


def dequantize_args(bits, fmt):
    t = random_table(7, 24, bits, fmt)
    return t.rows, bits, 24, FMT[fmt], t.step


def embedding_bag_args(bits, fmt, mode, with_psw, ilo, padding_idx, dtype, index_dtype):
    t = random_table(20, 16, bits, fmt)
    indices, offsets = random_bags(20, 6, index_dtype=index_dtype, include_last_offset=ilo,
                                   padding_idx=None if padding_idx < 0 else padding_idx)
    psw = torch.randn(indices.numel()) if with_psw else None
    return (t.rows, indices, offsets, psw, t.step, bits, 16, FMT[fmt], mode, ilo, padding_idx,
            dtype)


# argument sets, built inside the test (so from its seeded generator)
CASES = {
    "pack": [lambda: (codes(5, 16, 4), 4), lambda: (codes(3, 136, 3), 3),
             lambda: (codes(0, 8, 8), 8)],
    "unpack": [lambda: (raw_bytes(5, 12), 4, 16),  # rows wider than their codes
               lambda: (raw_bytes(4, 119), 7, 136), lambda: (raw_bytes(6, 1), 1, 8)],
    "quantize": [lambda: (torch.randn(6, 32), 8, FMT["affine"], None, False, 0, 0),
                 lambda: (torch.randn(6, 32), 4, FMT["symmetric"], torch.rand(6) + 0.1, True,
                          2**40 + 3, 9),
                 lambda: (torch.randn(6, 32), 3, FMT["symmetric_table"], torch.tensor([0.2]),
                          True, 1, 2)],
    "dequantize": [lambda: dequantize_args(8, "affine"), lambda: dequantize_args(5, "symmetric"),
                   lambda: dequantize_args(2, "symmetric_table")],
    "embedding_bag": [
        lambda: embedding_bag_args(4, "affine", 0, True, False, -1, torch.float32, torch.int64),
        lambda: embedding_bag_args(3, "symmetric", 1, False, True, 2, torch.float32, torch.int32),
        lambda: embedding_bag_args(6, "symmetric_table", 2, True, False, 5, torch.float16,
                                   torch.int64),
        lambda: embedding_bag_args(8, "affine", 0, False, True, -1, torch.bfloat16, torch.int32),
    ],
    "advise_huge_pages": [lambda: (torch.empty(3 << 20, dtype=torch.uint8),),
                          lambda: (torch.empty(5, 16),)],
}


@pytest.mark.parametrize("name,case", [(n, i) for n in CASES for i in range(len(CASES[n]))])
def test_opcheck(name, case):
    assert ops.HAS_EXTENSION
    torch.library.opcheck(getattr(torch.ops.qembed, name).default, CASES[name][case]())
