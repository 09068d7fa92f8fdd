"""Tables on transparent huge pages: values as torch.zeros, memory advised (Linux)."""
import sys

import pytest
import torch

import qembed
from qembed import ops

MiB = 1 << 20


def thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes of transparent huge pages in the mappings that hold t's memory."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.nbytes
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start < hi and end > lo
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total


needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or thp_mode() not in ("madvise", "always"),
    reason=f"transparent huge pages: {thp_mode()}")


@pytest.mark.parametrize("shape,dtype", [((7, 13), torch.uint8), ((3, 5), torch.float32),
                                         ((0, 4), torch.uint8), ((1 << 14, 300), torch.uint8)])
def test_table_zeros_is_zeros(shape, dtype):
    t = ops.table_zeros(*shape, dtype=dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros(shape, dtype=dtype))


@needs_thp
def test_table_zeros_on_huge_pages():
    t = ops.table_zeros(64 * MiB)
    # all but the partial 2 MiB pages at both ends
    assert huge_bytes(t) >= 60 * MiB


@needs_thp
@pytest.mark.parametrize("make", [
    lambda: ops.quantize(torch.randn(1 << 19, 128), 8, "affine"),
    lambda: qembed.nn.QuantizedEmbeddingBag(1 << 19, 128, bits=8).qweight,
    lambda: qembed.nn.LowPrecisionEmbeddingBag(1 << 19, 128, bits=8).qweight,
], ids=["quantize", "QuantizedEmbeddingBag", "LowPrecisionEmbeddingBag"])
def test_tables_on_huge_pages(make):
    t = make()  # 68 MiB of rows
    assert huge_bytes(t) >= 60 * MiB


@needs_thp
@pytest.mark.parametrize("result", ["lookup", "backward", "many-table lookup",
                                    "many-table backward"])
def test_large_results_on_huge_pages(result):
    """A batch of one id per bag gives a lookup output and row gradients of tens of MB, fresh
    each call: advised, so their first writes do not fault on every 4 KiB page."""
    # above glibc's largest mmap threshold (32 MiB), so fresh memory however the process ran
    rows, dim, bags = 1 << 17, 128, 1 << 18  # 128 MiB of fp32 output
    table = ops.quantize(torch.randn(rows, dim), 8, "affine")
    ids = torch.randperm(bags) % rows  # every row twice: 64 MiB of row gradients
    offsets = torch.arange(bags + 1)
    if result == "lookup":
        t = ops.embedding_bag(table, ids, offsets, bits=8, dim=dim, fmt="affine",
                              include_last_offset=True)
    elif result == "backward":
        t = ops.embedding_bag_backward(torch.randn(bags, dim), ids, offsets,
                                       include_last_offset=True)[1]
    elif result == "many-table lookup":
        t = ops.embedding_bags([table], [table.new_empty(0, dtype=torch.float32)], [8], [dim],
                               ["affine"], [0], [0], ["sum"], ids, offsets)
    else:
        t = ops.embedding_bags_backward(torch.randn(bags, dim), [dim], [0], [0], ["sum"], ids,
                                        offsets)[1][0]
    assert t.nbytes >= 64 * MiB and huge_bytes(t) >= t.nbytes - 4 * MiB  # less both ends


def test_advise_rejects_non_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.qembed.advise_huge_pages(torch.empty(8, 8).t())
