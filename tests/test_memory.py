"""Tables and large op results on transparent huge pages (values as torch.zeros, memory
advised, Linux), and the reuse of freed results' memory."""
import os
import subprocess
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


def mapped_bytes(t: torch.Tensor) -> tuple[int, int]:
    """(bytes of t in mappings advised for huge pages, bytes of transparent huge pages in the
    mappings that hold t's memory)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.nbytes
    advised = huge = 0
    inside, overlap = False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start < hi and end > lo
                overlap = min(end, hi) - max(start, lo)
            elif inside and head == "AnonHugePages:":
                huge += int(line.split()[1]) * 1024
            elif inside and head == "VmFlags:" and "hg" in line.split()[1:]:
                advised += overlap
    return advised, huge


def vmstat() -> dict[str, int]:
    """The kernel's memory counters, system-wide (thp_fault_fallback: huge page faults served
    with small pages, no huge page being free)."""
    with open("/proc/vmstat") as f:
        return {name: int(value) for name, value in (line.split() for line in f)}


def check_huge_pages(make, slack: int) -> torch.Tensor:
    """t = make(): all but `slack` bytes of it advised for huge pages, and on them unless the
    kernel had none free meanwhile (its fallback count moved: a busy or fragmented machine,
    not the code)."""
    before = vmstat()
    t = make()
    advised, huge = mapped_bytes(t)
    at_least = t.nbytes - slack
    assert advised >= at_least
    after = vmstat()
    if after.get("thp_fault_fallback", 0) == before.get("thp_fault_fallback", 0):
        moved = {k: after[k] - before.get(k, 0) for k in after
                 if (k.startswith(("thp", "compact")) and after[k] != before.get(k, 0))}
        assert huge >= at_least, f"{huge} of {advised} advised bytes on huge pages; {moved}"
    return t


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
    # all but the partial 2 MiB pages at both ends
    check_huge_pages(lambda: ops.table_zeros(64 * MiB), 4 * MiB)


@needs_thp
@pytest.mark.parametrize("make", [
    lambda: ops.quantize(torch.randn(1 << 19, 128), 8, "affine"),
    lambda: qembed.nn.QuantizedEmbeddingBag(1 << 19, 128, bits=8).qweight,
    lambda: qembed.nn.LowPrecisionEmbeddingBag(1 << 19, 128, bits=8).qweight,
], ids=["quantize", "QuantizedEmbeddingBag", "LowPrecisionEmbeddingBag"])
def test_tables_on_huge_pages(make):
    check_huge_pages(make, 8 * MiB)  # 68 MiB of rows


@needs_thp
@pytest.mark.parametrize("result", ["lookup", "backward", "many-table lookup",
                                    "many-table backward"])
def test_large_results_on_huge_pages(result):
    """A batch of one id per bag gives a lookup output and row gradients of tens of MB: on
    huge pages, so the first writes to fresh memory do not fault on every 4 KiB page."""
    # above glibc's largest mmap threshold (32 MiB), so fresh memory however the process ran
    rows, dim, bags = 1 << 17, 128, 1 << 18  # 128 MiB of fp32 output
    table = ops.quantize(torch.randn(rows, dim), 8, "affine")
    ids = torch.randperm(bags) % rows  # every row twice: 64 MiB of row gradients
    offsets = torch.arange(bags + 1)
    grad_out = torch.randn(bags, dim)

    def make():
        if result == "lookup":
            return ops.embedding_bag(table, ids, offsets, bits=8, dim=dim, fmt="affine",
                                     include_last_offset=True)
        if result == "backward":
            return ops.embedding_bag_backward(grad_out, ids, offsets,
                                              include_last_offset=True)[1]
        if result == "many-table lookup":
            return ops.embedding_bags([table], [table.new_empty(0, dtype=torch.float32)], [8],
                                      [dim], ["affine"], [0], [0], ["sum"], ids, offsets)
        return ops.embedding_bags_backward(grad_out, [dim], [0], [0], ["sum"], ids,
                                           offsets)[1][0]
    t = check_huge_pages(make, 4 * MiB)  # less both ends
    assert t.nbytes >= 64 * MiB


def test_advise_rejects_non_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.qembed.advise_huge_pages(torch.empty(8, 8).t())


def many_table_lookup(bags: int, dim: int = 128, rows: int = 1000) -> torch.Tensor:
    table = ops.quantize(torch.randn(rows, dim), 8, "affine")
    ids = torch.randint(0, rows, (bags,))
    return ops.embedding_bags([table], [torch.empty(0)], [8], [dim], ["affine"], [0], [0],
                              ["sum"], ids, torch.arange(bags + 1))


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="needs the compiled extension")
def test_freed_results_memory_is_reused_then_released():
    """A large result's memory, once freed, serves the next result of about its size; the
    cache is emptied on request."""
    ops.empty_result_cache()
    first = many_table_lookup(1 << 13)  # 4 MiB of fp32 output
    address, size = first.data_ptr(), first.nbytes
    del first
    assert ops.cached_result_bytes() >= size
    again = many_table_lookup(1 << 13)
    assert again.data_ptr() == address
    assert ops.cached_result_bytes() == 0
    del again
    held = ops.cached_result_bytes()
    assert ops.empty_result_cache() == held >= size and ops.cached_result_bytes() == 0
    small = many_table_lookup(16)  # small results come from torch's allocator, never cached
    del small
    assert ops.cached_result_bytes() == 0


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="needs the compiled extension")
@pytest.mark.parametrize("limit,held", [("0", False), ("64", True)])
def test_result_cache_limit_from_environment(limit, held):
    code = ("import torch, qembed\n"
            "t = qembed.ops.quantize(torch.randn(10, 128), 8, 'affine')\n"
            "out = qembed.ops.embedding_bags([t], [torch.empty(0)], [8], [128], ['affine'], [0],"
            " [0], ['sum'], torch.zeros(8192, dtype=torch.long), torch.arange(8193))\n"
            "del out\nprint(qembed.ops.cached_result_bytes())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, QEMBED_RESULT_CACHE_MB=limit))
    assert run.returncode == 0, run.stderr
    assert (int(run.stdout) >= 4 * MiB) == held


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="needs the compiled extension")
def test_bad_result_cache_limit_fails_the_import():
    run = subprocess.run([sys.executable, "-c", "import qembed"], capture_output=True, text=True,
                         env=dict(os.environ, QEMBED_RESULT_CACHE_MB="lots"))
    assert run.returncode != 0 and "QEMBED_RESULT_CACHE_MB" in run.stderr and "lots" in run.stderr
