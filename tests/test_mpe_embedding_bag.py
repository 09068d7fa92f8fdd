"""mpe_embedding_bag, the lookup over a table of mixed widths (a row map or row ranges), on
the CPU and CUDA kernels and the reference: against a per-segment dequantization written
here, against each other, and its bad input."""
import pytest
import torch
from conftest import (
    BACKENDS,
    LAYOUTS,
    OUT_DTYPES,
    assert_close,
    backends,
    mixed_table,
    random_bags,
    random_psw,
)

from qembed import ops, reference

MODE_PSW = [("sum", False), ("sum", True), ("mean", False), ("none", False), ("none", True)]


def bags(rows, mode):
    indices, offsets = random_bags(rows, 7, max_len=6)
    return indices, (None if mode == "none" else offsets)


def per_segment_values(segments, seg_bits, steps, beta, positions, rows, dim):
    """Every row's value from its own segment: unpacked codes, offset-binary, step, beta."""
    table = torch.zeros(rows, dim)
    for r in range(rows):
        loc = int(positions[r])
        if loc < 0:
            continue
        for seg, b, s in zip(segments, seg_bits, steps):
            if loc < seg.shape[0]:
                codes = reference.unpack(seg[loc: loc + 1], b, dim)[0].float()
                table[r] = s * (codes - 2 ** (b - 1)) + beta
                break
            loc -= seg.shape[0]
    return table


def batch(backend, rows, mode):
    """Short bags for the CPU and the reference, which the test compares with sums written
    out here; on a GPU bags longer than a warp, compared with the CPU kernel's sums."""
    bags, max_len = (30, 40) if backend.device == "cuda" else (7, 6)
    indices, offsets = random_bags(rows, bags, max_len=max_len)
    return indices, (None if mode == "none" else offsets)


def oracle(backend):
    return BACKENDS["cpu"] if backend.device == "cuda" else BACKENDS["reference"]


def assert_sums_close(got, want, dtype=torch.float32):
    """assert_close for sums of values up to ~150 (8-bit codes): float reordering moves them
    by ~1e-5 of the largest term, whatever the (possibly cancelling) result."""
    if dtype == torch.float32:
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-4)
    else:
        assert_close(got, want, dtype)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dim", [24, 136])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode,psw", MODE_PSW, ids=["sum", "sum-psw", "mean", "none", "none-psw"])
@pytest.mark.parametrize("backend", backends("cpu", "reference", "cuda"))
def test_matches_per_segment_dequantization(backend, mode, psw, layout, dim, out_dtype):
    rows = 80
    segments, seg_bits, steps, beta, location, positions = mixed_table(
        rows, dim, [0, 1, 3, 4, 5, 8], layout)
    indices, offsets = batch(backend, rows, mode)
    weights = random_psw(indices.numel()) if psw else None
    args = (segments, seg_bits, steps, beta, location, indices, offsets, weights, mode)
    got = backend.run(ops.mpe_embedding_bag, *args, output_dtype=out_dtype)
    if backend.device == "cuda":
        want = BACKENDS["cpu"].run(ops.mpe_embedding_bag, *args)
    else:
        values = per_segment_values(segments, seg_bits, steps, beta, positions, rows, dim)
        values = values[indices] * (weights[:, None] if psw else 1)
        if mode == "none":
            want = values
        else:
            want = torch.zeros(offsets.numel(), dim)
            ends = torch.cat([offsets[1:], torch.tensor([indices.numel()])])
            for i, (a, e) in enumerate(zip(offsets.tolist(), ends.tolist())):
                want[i] = values[a:e].sum(0) / (max(e - a, 1) if mode == "mean" else 1)
    assert_sums_close(got, want, out_dtype)


@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("backend", backends("cpu", "cuda"))
def test_options(backend, include_last_offset):
    """int32 indices, include_last_offset, an all-pruned table, empty batches."""
    segments, seg_bits, steps, beta, location, _ = mixed_table(50, 16, [0, 2, 7])
    bags, max_len = (12, 40) if backend.device == "cuda" else (12, 6)
    indices, offsets = random_bags(50, bags, max_len=max_len, index_dtype=torch.int32,
                                   include_last_offset=include_last_offset)
    args = (segments, seg_bits, steps, beta, location, indices, offsets, None, "sum",
            include_last_offset)
    got, want = (b.run(ops.mpe_embedding_bag, *args) for b in (backend, oracle(backend)))
    assert_sums_close(got, want)
    pruned = torch.full((50,), -1, dtype=torch.int32)
    got = backend.run(ops.mpe_embedding_bag, [], [], torch.zeros(0), beta, pruned, indices,
                      offsets, None, "mean", include_last_offset)
    assert got.shape == (12, 16) and not got.any()
    empty = torch.zeros(0, dtype=torch.long)
    got = backend.run(ops.mpe_embedding_bag, segments, seg_bits, steps, beta, location, empty,
                      empty, None, "sum")
    assert got.shape == (0, 16)


def lookup_and_reference(*args):
    """mpe_embedding_bag(*args) from the kernel and from the reference."""
    got = ops.mpe_embedding_bag(*args)
    with ops.use_reference():
        return got, ops.mpe_embedding_bag(*args)


@pytest.mark.parametrize("dim", [8, 16, 32, 64, 128, 136, 200])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_lookup_across_widths_of_rows(dim, layout):
    """Every column-block shape of the CPU kernel (the fixed 16/32/64/128-column ones, other
    multiples of 8, and rows of several blocks), all widths, against the reference."""
    rows = 300
    segments, seg_bits, steps, beta, location, _ = mixed_table(
        rows, dim, [0, 1, 2, 3, 4, 5, 6, 7, 8], layout)
    indices, offsets = bags(rows, "sum")
    weights = torch.randn(indices.numel())
    got, want = lookup_and_reference(segments, seg_bits, steps, beta, location, indices,
                                     offsets, weights, "sum")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("rows", [1000, 100_000, 300_000])
def test_row_ranges_of_very_uneven_lengths(rows):
    """Runs of one row beside one long run: the lookup's buckets must find each (the largest
    table has more single-row runs per bucket than the buckets allow, and searches)."""
    firsts = list(range(12)) + [rows // 2, rows // 2 + 1]
    bits = [1, 8, 2, 0, 4, 8, 1, 2, 8, 0, 4, 1, 2, 8]
    starts = {b: 0 for b in (1, 2, 4, 8)}
    lengths = [n - f for f, n in zip(firsts, firsts[1:] + [rows])]
    ranges, sizes = [], {b: 0 for b in starts}
    for b, length in zip(bits, lengths):
        if b:
            sizes[b] += length
    offset, seg_start = 0, {}
    for b in (1, 2, 4, 8):
        seg_start[b] = offset
        offset += sizes[b]
    for f, b, length in zip(firsts, bits, lengths):
        ranges.append((f, seg_start[b] + starts[b] if b else -1))
        if b:
            starts[b] += length
    location = torch.tensor(ranges + [(rows, -1)], dtype=torch.int32)
    dim = 8
    segments = [torch.randint(0, 256, (sizes[b], dim * b // 8), dtype=torch.uint8)
                for b in (1, 2, 4, 8)]
    steps, beta = torch.rand(4) + 0.1, torch.randn(dim)
    indices = torch.cat([torch.arange(14), torch.tensor(firsts), torch.randint(0, rows, (500,))])
    got, want = lookup_and_reference(segments, [1, 2, 4, 8], steps, beta, location, indices,
                                     None, None, "none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_row_ranges_outnumbering_the_buckets():
    """More ranges than the CPU lookup's bucket index holds buckets (at most 2^16): every
    bucket holds several range starts, searched within the bucket."""
    rows, dim = 1_200_000, 8
    segments, seg_bits, steps, beta, location, _ = mixed_table(rows, dim, [0, 1, 2, 4, 8],
                                                               "ranges")
    assert location.shape[0] > 3 * 2 ** 16
    indices = torch.cat([location[:-1, 0].long(), location[1:-1, 0].long() - 1,
                         torch.randint(0, rows, (5000,))])
    indices = indices[torch.randperm(indices.numel())]
    offsets = torch.arange(0, indices.numel(), 7)
    got, want = lookup_and_reference(segments, seg_bits, steps, beta, location, indices,
                                     offsets, None, "sum")
    # sums of up to ~10^3 (8-bit codes): the kernel and the reference round differently
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


def test_row_ranges_expand_to_their_map():
    _, _, _, _, location, positions = mixed_table(500, 8, [0, 1, 2, 8], "ranges")
    assert torch.equal(reference.row_map(location), positions)


@pytest.mark.parametrize("change,message", [
    (lambda r: r.__setitem__((0, 0), 1), "start at row 0"),
    (lambda r: r.__setitem__((2, 0), int(r[1, 0])), "must increase"),
    (lambda r: r.__setitem__((-1, 0), int(r[-2, 0])), "must increase"),
    (lambda r: r.__setitem__((int((r[:-1, 1] >= 0).nonzero()[0]), 1), 100_000), "outside"),
    (lambda r: r.__setitem__((int((r[:-1, 1] >= 0).nonzero()[-1]), 1), 490), "crosses"),
])
def test_bad_row_ranges_raise(change, message):
    segments, seg_bits, steps, beta, location, _ = mixed_table(500, 8, [0, 1, 2, 8], "ranges")
    change(location)
    with pytest.raises(ValueError, match=message):
        ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, torch.tensor([3]), None,
                              None, "none")
    with pytest.raises(TypeError, match="int32"):
        ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location.long(),
                              torch.tensor([3]), None, None, "none")


def test_rows_without_ranges_raise():
    beta = torch.randn(8)
    with pytest.raises(ValueError, match="start at row 0"):  # 5 rows, no range for them
        ops.mpe_embedding_bag([], [], torch.zeros(0), beta, torch.tensor([[5, -1]], dtype=torch.int32),
                              torch.tensor([1]), None, None, "none")
    empty = ops.mpe_embedding_bag([], [], torch.zeros(0), beta,
                                  torch.tensor([[0, -1]], dtype=torch.int32),
                                  torch.zeros(0, dtype=torch.long), None, None, "none")
    assert empty.shape == (0, 8)


def test_index_past_row_ranges_raises():
    segments, seg_bits, steps, beta, location, _ = mixed_table(300, 16, [0, 2, 8], "ranges")
    indices = torch.randint(0, 300, (3000,))
    indices[2222] = 300
    with pytest.raises(IndexError, match="index 300 at position 2222 "):
        ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, indices,
                              torch.arange(0, 3000, 6), None, "sum")


def test_bad_inputs_raise():
    segments, seg_bits, steps, beta, location, _ = mixed_table(20, 8, [1, 2])
    location[3] = 10_000
    with pytest.raises(ValueError, match="outside the segments"):
        ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, torch.tensor([3]), None,
                              None, "none")
    with pytest.raises(IndexError):
        ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, torch.tensor([20]),
                              None, None, "none")


@pytest.mark.parametrize("mode", ["sum", "none"])
def test_bad_map_entry_found_in_a_large_batch(mode):
    """Index and map entry checks happen inside the (threaded) lookup; the first offender is
    named, wherever it sits."""
    segments, seg_bits, steps, beta, location, _ = mixed_table(300, 16, [0, 2, 8])
    indices = torch.randint(0, 300, (3000,))
    offsets = torch.arange(0, 3000, 6)
    bad_row = int(indices[1234])
    location[bad_row] = 100_000
    with pytest.raises(ValueError, match=f"location\\[{bad_row}\\] = 100000 is outside"):
        ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, indices, offsets, None,
                              mode)
    location[bad_row] = -1
    indices[2000] = 300
    with pytest.raises(IndexError, match="index 300 at position 2000 "):
        ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, indices, offsets, None,
                              mode)


@pytest.mark.parametrize("layout", ["map32", "ranges"])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_validated_in_debug_mode(backend, monkeypatch, layout):
    segments, seg_bits, steps, beta, location, _ = mixed_table(20, 8, [1, 2], layout)
    if layout == "ranges":  # the range holding row 3 placed past the segments
        location[int(torch.searchsorted(location[:, 0], 3, right=True)) - 1, 1] = 10_000
    else:
        location[3] = 10_000
    table = (segments, seg_bits, steps, beta, location)
    got = backend.run(ops.mpe_embedding_bag, *table, torch.tensor([3]), None, None, "none")
    assert not got.any()  # skipped
    monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
    with pytest.raises(ValueError, match="outside the segments"):
        backend.run(ops.mpe_embedding_bag, *table, torch.tensor([3]), None, None, "none")
    with pytest.raises(IndexError, match="out of range"):
        backend.run(ops.mpe_embedding_bag, *table, torch.tensor([20]), None, None, "none")
