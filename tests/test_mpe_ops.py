"""MPE ops: the search's forward and gradients against the pure-PyTorch reference (and
autograd through its straight-through fake quantizer), the mixed-width lookup against a
per-segment dequantization written here."""
import pytest
import torch
from conftest import random_bags

from qembed import formats, ops, reference

BITS = [0, 1, 2, 3, 4, 5, 6]


def search_inputs(rows=60, dim=16, groups=5, bits=BITS):
    weight = torch.randn(rows, dim) * 0.1
    alpha = (torch.rand(len(bits)) * 0.04 + 0.01)  # some values clip at every width
    beta = torch.randn(dim) * 0.02
    logits = torch.randn(groups, len(bits))
    row_group = torch.randint(0, groups, (rows,))
    return weight, row_group, logits, alpha, beta


def bags(rows, mode):
    indices, offsets = random_bags(rows, 7, max_len=6)
    return indices, (None if mode == "none" else offsets)


@pytest.mark.usefixtures("cpu_capability")
@pytest.mark.parametrize("mode", ["sum", "mean", "none"])
@pytest.mark.parametrize("bits", [BITS, [0, 2, 4, 8], [3]])
def test_search_forward_matches_reference(mode, bits):
    weight, row_group, logits, alpha, beta = search_inputs(bits=bits)
    indices, offsets = bags(weight.shape[0], mode)
    probs = torch.softmax(logits, 1)
    got = ops.mpe_search_forward(weight, indices, offsets, row_group, probs, alpha, beta, bits,
                                 mode)
    want = reference.mpe_search_forward(weight, indices, offsets, row_group, probs, alpha, beta,
                                        bits, mode)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_expected_value_is_probability_weighted_quantization():
    # Independent of the reference: Q_b written out with explicit integer codes.
    weight, row_group, logits, alpha, beta = search_inputs()
    probs = torch.softmax(logits, 1)
    ids = torch.arange(weight.shape[0])
    got = ops.mpe_search_forward(weight, ids, None, row_group, probs, alpha, beta, BITS, "none")
    want = torch.zeros_like(weight)
    for k, b in enumerate(BITS):
        if b:
            q = torch.round((weight - beta) / alpha[k]).clamp(-(2 ** (b - 1)), 2 ** (b - 1) - 1)
            want += probs[row_group, k: k + 1] * (alpha[k] * q + beta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("cpu_capability")
@pytest.mark.parametrize("mode", ["sum", "mean", "none"])
def test_search_gradients_match_autograd_through_reference(mode):
    weight, row_group, logits, alpha, beta = search_inputs()
    indices, offsets = bags(weight.shape[0], mode)
    grad_out = None
    grads = []
    for use_ref in (False, True):
        leaves = [t.clone().requires_grad_() for t in (weight, logits, alpha, beta)]
        w, lg, a, b = leaves
        with ops.use_reference(use_ref):
            out = ops.mpe_search_forward(w, indices, offsets, row_group, torch.softmax(lg, 1), a,
                                         b, BITS, mode)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        out.backward(grad_out)
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(["weight", "logits", "alpha", "beta"], *grads):
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.usefixtures("cpu_capability")
def test_search_backward_op_matches_reference():
    weight, row_group, logits, alpha, beta = search_inputs()
    probs = torch.softmax(logits, 1)
    unique = torch.unique(torch.randint(0, weight.shape[0], (30,)))
    grad_rows = torch.randn(unique.numel(), weight.shape[1])
    got = ops.mpe_search_backward(weight, unique, grad_rows, row_group, probs, alpha, beta, BITS,
                                  500)
    want = reference.mpe_search_backward(weight, unique, grad_rows, row_group, probs, alpha,
                                         beta, BITS, 500)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("cpu_capability")
def test_search_backward_independent_of_threads():
    weight, row_group, logits, alpha, beta = search_inputs(rows=400)
    unique = torch.arange(400)
    grad_rows = torch.randn(400, weight.shape[1])
    args = (weight, unique, grad_rows, row_group, torch.softmax(logits, 1), alpha, beta, BITS, 9)
    one = ops.mpe_search_backward(*args)
    torch.set_num_threads(2)
    try:
        two = ops.mpe_search_backward(*args)
    finally:
        torch.set_num_threads(1)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


LAYOUTS = ["map16", "map32", "ranges"]


def mixed_table(rows, dim, widths, layout="map32"):
    """Random segments (padded rows for some widths), steps, beta and the rows' locations:
    a row map with rows at random positions, or row ranges (random runs of one width, each
    run at a random place in its width's segment). Also returns the positions (int64 [R],
    -1 pruned) that the locations describe."""
    if layout == "ranges":
        cuts = torch.randperm(rows - 1)[: max(rows // 6, 1)].add(1).sort().values.tolist()
        runs = list(zip([0] + cuts, cuts + [rows]))
        run_bits = torch.tensor(widths)[torch.randint(0, len(widths), (len(runs),))].tolist()
    else:
        row_bits = torch.tensor(widths)[torch.randint(0, len(widths), (rows,))]
        perm = torch.randperm(rows)
    segments, steps, positions, start = [], [], torch.full((rows,), -1), 0
    seg_bits = sorted(set(widths) - {0})
    ranges = []
    for b in seg_bits:
        if layout == "ranges":
            mine = [runs[i] for i in torch.randperm(len(runs)).tolist() if run_bits[i] == b]
            for first, next_ in mine:
                positions[first:next_] = torch.arange(start, start + next_ - first)
                ranges.append((first, start))
                start += next_ - first
            n = sum(next_ - first for first, next_ in mine)
        else:
            members = perm[row_bits[perm] == b]
            positions[members] = torch.arange(start, start + members.numel())
            start += members.numel()
            n = members.numel()
        width = formats.code_bytes(dim, b) + int(torch.randint(0, 3, ()))
        segments.append(torch.randint(0, 256, (n, width), dtype=torch.uint8))
        steps.append(float(torch.rand(())) + 0.1)
    if layout == "ranges":
        ranges += [(first, -1) for (first, _), b in zip(runs, run_bits) if b == 0]
        location = torch.tensor(sorted(ranges) + [(rows, -1)], dtype=torch.int32)
    else:
        location = positions.to(torch.int16 if layout == "map16" else torch.int32)
    return segments, seg_bits, torch.tensor(steps), torch.randn(dim), location, positions


@pytest.mark.usefixtures("cpu_capability")
@pytest.mark.parametrize("mode", ["sum", "mean", "none"])
@pytest.mark.parametrize("psw", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_lookup_matches_per_segment_dequantization(mode, psw, layout):
    if psw and mode == "mean":
        pytest.skip("mean takes no per-sample weights")
    rows, dim = 80, 24
    segments, seg_bits, steps, beta, location, positions = mixed_table(rows, dim,
                                                                       [0, 1, 3, 4, 8], layout)
    indices, offsets = bags(rows, mode)
    weights = torch.randn(indices.numel()) if psw else None
    got = ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, indices, offsets,
                                weights, mode)
    # Every row's value from its own segment: unpacked codes, offset-binary, step, beta.
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
    values = table[indices] * (weights[:, None] if psw else 1)
    if mode == "none":
        want = values
    else:
        want = torch.zeros(offsets.numel(), dim)
        ends = torch.cat([offsets[1:], torch.tensor([indices.numel()])])
        for i, (a, e) in enumerate(zip(offsets.tolist(), ends.tolist())):
            want[i] = values[a:e].sum(0) / (max(e - a, 1) if mode == "mean" else 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with ops.use_reference():
        ref = ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, indices, offsets,
                                    weights, mode)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)


def lookup_and_reference(*args):
    """mpe_embedding_bag(*args) from the kernel and from the reference."""
    got = ops.mpe_embedding_bag(*args)
    with ops.use_reference():
        return got, ops.mpe_embedding_bag(*args)


@pytest.mark.usefixtures("cpu_capability")
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


@pytest.mark.usefixtures("cpu_capability")
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


@pytest.mark.usefixtures("cpu_capability")
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
    weight, row_group, logits, alpha, beta = search_inputs()
    probs = torch.softmax(logits, 1)
    ids = torch.arange(4)
    with pytest.raises(ValueError, match="alpha must be positive"):
        ops.mpe_search_forward(weight, ids, None, row_group, probs, -alpha, beta, BITS, "none")
    with pytest.raises(ValueError, match="bit widths"):
        ops.mpe_search_forward(weight, ids, None, row_group, probs, alpha, beta,
                               [0, 1, 2, 3, 4, 5, 9], "none")
    with pytest.raises(IndexError):
        ops.mpe_search_forward(weight, ids, None, row_group + 10, probs, alpha, beta, BITS, "none")
    segments, seg_bits, steps, beta, location, _ = mixed_table(20, 8, [1, 2])
    location[3] = 10_000
    with pytest.raises(ValueError, match="outside the segments"):
        ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, torch.tensor([3]), None,
                              None, "none")
    with pytest.raises(IndexError):
        ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, torch.tensor([20]),
                              None, None, "none")


@pytest.mark.usefixtures("cpu_capability")
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


def test_opcheck():
    weight, row_group, logits, alpha, beta = search_inputs()
    probs = torch.softmax(logits, 1)
    indices, offsets = random_bags(weight.shape[0], 5)
    torch.library.opcheck(torch.ops.qembed.mpe_search_forward.default,
                          (weight, indices, offsets, row_group, probs, alpha, beta, BITS, 1,
                           False))
    unique = torch.unique(indices)
    torch.library.opcheck(torch.ops.qembed.mpe_search_backward.default,
                          (weight, unique, torch.randn(unique.numel(), 16), row_group, probs,
                           alpha, beta, BITS, 100))
    segments, seg_bits, steps, beta, location, _ = mixed_table(30, 16, [0, 2, 5])
    indices, offsets = random_bags(30, 5)
    torch.library.opcheck(torch.ops.qembed.mpe_embedding_bag.default,
                          (segments, seg_bits, steps, beta, location, indices, offsets, None, 0,
                           False, torch.float32))
