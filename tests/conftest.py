"""Shared parameter grids, random tables and random bags for qembed's tests.

Every test starts from torch's global generator seeded by its own node id (the autouse
fixture below), so each test case sees fresh random data that is reproducible run to run.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

# Triton reads its interpreter switch when first imported, and more than test_triton.py
# imports it (TorchRec's fbgemm_gpu does): set it before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qembed import formats, ops, reference

BITS = list(range(1, 9))
FORMATS = ["affine", "symmetric", "symmetric_table"]
DIMS = [8, 16, 64, 128, 136]
MODES = ["sum", "mean", "none"]

# One thread per test process: pytest-xdist already fills the cores, and two OpenMP threads
# per worker on a busy 2-core machine make small ops 100x slower. The multi-threaded paths of
# the kernels are exercised by test_quantize.py::test_results_independent_of_thread_count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@dataclass
class Table:
    """A packed table with what a lookup needs besides the rows."""

    rows: torch.Tensor
    bits: int
    dim: int
    fmt: str
    step: torch.Tensor | None = None  # only for "symmetric_table"

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize(self.rows, self.bits, self.dim, self.fmt, self.step)

    def lookup(self, indices, offsets, impl=ops, **kwargs) -> torch.Tensor:
        """``impl.embedding_bag`` (ops or reference) over this table."""
        return impl.embedding_bag(self.rows, indices, offsets, self.bits, self.dim, self.fmt,
                                  self.step, **kwargs)


def _f32_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous().view(torch.uint8)


def random_table(num_rows: int, dim: int, bits: int, fmt: str) -> Table:
    """Random bytes as codes (and padding), random positive steps/scales and biases, chosen
    so that values stay of order 1 at every bit width."""
    rows = torch.randint(0, 256, (num_rows, formats.row_bytes(dim, bits, fmt)), dtype=torch.uint8)
    po, levels = formats.param_offset(dim, bits), float(1 << bits)
    spread = torch.rand(num_rows, 1) + 0.5
    step = None
    if fmt == "affine":
        rows[:, po:] = _f32_bytes(torch.cat([spread / (levels - 1), torch.randn(num_rows, 1)], 1))
    elif fmt == "symmetric":
        rows[:, po:] = _f32_bytes(spread * 2 / levels)
    else:
        step = (torch.rand(1) + 0.5) * 2 / levels
    return Table(rows, bits, dim, fmt, step)


def random_steps(weight: torch.Tensor, bits: int, per_row: bool = True) -> torch.Tensor:
    """Symmetric steps that cover most of each row (some values clip), jittered at random."""
    peak = weight.abs().amax(1) if per_row else weight.abs().amax().reshape(1)
    jitter = 0.7 + 0.6 * torch.rand(peak.shape)
    return (peak * jitter / max(formats.qmax(bits), 1)).clamp(min=1e-3).to(torch.float32)


def random_bags(num_rows: int, num_bags: int, max_len: int = 5,
                index_dtype: torch.dtype = torch.int64, offset_dtype: torch.dtype | None = None,
                include_last_offset: bool = False, padding_idx: int | None = None):
    """indices, offsets of ``num_bags`` bags of 0..max_len random rows (so some bags are
    empty); about a quarter of the entries hit ``padding_idx`` when one is given."""
    lengths = torch.randint(0, max_len + 1, (num_bags,))
    starts = torch.cumsum(lengths, 0) - lengths
    offsets = torch.cat([starts, lengths.sum().reshape(1)]) if include_last_offset else starts
    indices = torch.randint(0, num_rows, (int(lengths.sum()),))
    if padding_idx is not None:
        indices[torch.rand(indices.shape) < 0.25] = padding_idx
    return indices.to(index_dtype), offsets.to(offset_dtype or index_dtype)


def random_psw(n: int) -> torch.Tensor:
    return torch.randn(n)


def bag_lengths(offsets: torch.Tensor, num_indices: int, include_last_offset: bool = False):
    """Length of each bag, as nn.EmbeddingBag reads ``offsets``."""
    if include_last_offset:
        return offsets[1:] - offsets[:-1]
    return torch.cat([offsets[1:], offsets.new_tensor([num_indices])]) - offsets


def pool_per_bag(per_index: torch.Tensor, offsets: torch.Tensor, mean: bool = False,
                 include_last_offset: bool = False) -> torch.Tensor:
    """Sum (or mean) over each bag of a per-index quantity, e.g. an error bound."""
    lengths = bag_lengths(offsets, per_index.numel(), include_last_offset)
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    out = torch.zeros(lengths.numel()).index_add_(0, bag, per_index[: bag.numel()])
    return out / lengths.clamp(min=1) if mean else out
