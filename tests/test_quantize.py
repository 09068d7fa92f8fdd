"""quantize and dequantize: the CPU and CUDA kernels bit-exact against the reference, error
bounds, stochastic rounding (unbiasedness, keying, thread independence), the Philox stream
checked against an independent pure-Python Philox4x32-10, and bad input."""
import contextlib

import pytest
import torch
from conftest import (
    BITS,
    COMPILED_BACKENDS,
    DIMS,
    FORMATS,
    backends,
    random_bags,
    random_steps,
    random_table,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from qembed import formats, ops, reference

# (format, how the step is given): symmetric takes a per-row [N] step or one [1] broadcast
STEP_KINDS = [("affine", None), ("symmetric", "row"), ("symmetric", "broadcast"),
              ("symmetric_table", "table")]
KIND_IDS = ["affine", "symmetric-row", "symmetric-broadcast", "symmetric_table"]
M32 = 0xFFFFFFFF


def make_step(weight, bits, how):
    return None if how is None else random_steps(weight, bits, per_row=how == "row")


def trained_weight(n, dim):
    """Rows of different scales, plus a constant row and a zero row."""
    w = torch.randn(n, dim) * torch.rand(n, 1) * 2
    w[0], w[1] = 0.37, 0.0
    return w


def row_scale_bias(weight, bits, fmt, step):
    """(scale [N], bias [N], code offset) from the SPEC's definitions, not from the rows."""
    n = weight.shape[0]
    if fmt == "affine":
        lo, hi = weight.amin(1), weight.amax(1)
        scale = (hi - lo) / ((1 << bits) - 1)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), lo, 0
    return step.expand(n), torch.zeros(n), formats.qmin(bits)


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("fmt,how", STEP_KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_quantize_dequantize_match_reference(backend, bits, fmt, how, stochastic, dim):
    """The same bytes as the reference for the same weights and seed (64-bit seed and
    counter), and the reference's values back."""
    w = trained_weight(33, dim)
    step = make_step(w, bits, how)
    seed, counter = torch.randint(0, 2**62, (2,)).tolist()
    rows = backend.run(ops.quantize, w, bits, fmt, step, stochastic, seed, counter)
    assert rows.shape == (33, formats.row_bytes(dim, bits, fmt)) and rows.dtype == torch.uint8
    assert rows.device.type == backend.device
    assert torch.equal(rows.cpu(), reference.quantize(w, bits, fmt, step, stochastic, seed,
                                                      counter))
    table_step = step if fmt == "symmetric_table" else None
    deq = backend.run(ops.dequantize, rows, bits, dim, fmt, table_step)
    assert torch.equal(deq.cpu(), reference.dequantize(rows.cpu(), bits, dim, fmt, table_step))


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_dequantize_random_table_matches_reference(backend, bits, fmt, dim):
    t = random_table(41, dim, bits, fmt)
    got = backend.run(ops.dequantize, t.rows, bits, dim, fmt, t.step)
    assert torch.equal(got.cpu(), t.dequantize())


@pytest.mark.parametrize("fmt,how", STEP_KINDS, ids=KIND_IDS)
def test_empty_table(fmt, how):
    w = torch.zeros(0, 16)
    step = None if how is None else torch.ones(1)
    for impl in (ops, reference):
        rows = impl.quantize(w, 4, fmt, step)
        assert rows.shape == (0, formats.row_bytes(16, 4, fmt))
        assert ops.dequantize(rows, 4, 16, fmt, step).shape == (0, 16)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("fmt,how", STEP_KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("bits", BITS)
def test_error_bounds(bits, fmt, how, stochastic):
    """Inside the range: nearest is within scale/2, stochastic within one scale (the code is
    floor or ceil of w/scale); outside (symmetric only): clamped to the end of the range.
    The stored parameters are the SPEC's (affine: scale = range/(2^b-1), bias = min)."""
    w = trained_weight(40, 64)
    step = make_step(w, bits, how)
    rows = ops.quantize(w, bits, fmt, step, stochastic, seed=3, counter=4)
    deq = ops.dequantize(rows, bits, 64, fmt, step if fmt == "symmetric_table" else None)
    scale, bias, offset = row_scale_bias(w, bits, fmt, step)
    stored_scale, stored_bias, _ = reference.row_params(rows, bits, 64, fmt, step)
    assert torch.equal(stored_scale, scale.float()) and torch.equal(stored_bias, bias.float())
    scale, bias = scale[:, None], bias[:, None]
    lo, hi = scale * offset + bias, scale * (offset + (1 << bits) - 1) + bias
    slack = 1e-5 * (w.abs() + bias.abs() + hi.abs())  # fp32 rounding of x and of the value
    inside = (w >= lo) & (w <= hi)
    err = (deq - w).abs()
    limit = scale if stochastic else scale / 2
    assert (err <= limit + slack)[inside].all()
    assert torch.allclose(deq[w < lo], lo.expand_as(w)[w < lo], rtol=1e-6, atol=0)
    assert torch.allclose(deq[w > hi], hi.expand_as(w)[w > hi], rtol=1e-6, atol=0)
    if fmt == "affine":  # constant and zero rows come back exactly
        assert torch.equal(deq[:2], w[:2])


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_nearest_rounds_half_to_even(bits):
    step = torch.full((1,), 0.25)
    q = torch.randint(formats.qmin(bits), formats.qmax(bits), (4, 32))
    w = (q.float() + 0.5) * step  # exact ties between two codes
    rows = ops.quantize(w, bits, "symmetric", step)
    codes = ops.unpack(rows, bits, 32).long() + formats.qmin(bits)
    assert ((codes - q == 0) | (codes - q == 1)).all()
    assert (codes % 2 == 0).all()


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(1, 8), fmt=st.sampled_from(["affine", "symmetric"]),
       seed=st.integers(0, 2**63 - 1))
def test_stochastic_rounding_is_unbiased(bits, fmt, seed):
    """The mean of K stochastic quantizations (counters 0..K-1) tends to w inside the range:
    each is w plus a zero-mean error of at most one scale, so the mean is within
    6 * scale / (2 sqrt K) of w (6 standard deviations); nearest rounding misses that."""
    torch.manual_seed(seed % 2**32)
    w = torch.randn(4, 64)
    step = w.abs().amax(1) / (1 << (bits - 1)) if fmt == "symmetric" else None
    if fmt == "symmetric":  # stay inside [Qn * step, Qp * step]
        w = w.clamp(max=step[:, None] * formats.qmax(bits))
    k = 400
    mean = sum(ops.dequantize(ops.quantize(w, bits, fmt, step, True, seed, c), bits, 64, fmt)
               for c in range(k)) / k
    scale = row_scale_bias(w, bits, fmt, step)[0][:, None]
    assert ((mean - w).abs() <= 6 * scale / (2 * k**0.5) + 1e-5).all()
    nearest = ops.dequantize(ops.quantize(w, bits, fmt, step), bits, 64, fmt)
    assert (nearest - w).abs().mean() > 3 * (mean - w).abs().mean()


@pytest.mark.parametrize("fmt", ["affine", "symmetric"])
def test_stochastic_keying(fmt):
    w = torch.randn(16, 64)
    w[1] = w[0]
    step = random_steps(w, 4, per_row=False) if fmt == "symmetric" else None
    seed, counter = 0x1234_5678_9ABC, 17

    def q(s=seed, c=counter):
        return ops.quantize(w, 4, fmt, step, True, s, c)

    base = q()
    assert torch.equal(base, q())  # same key, same codes
    assert not torch.equal(base, q(s=seed + 1))
    assert not torch.equal(base, q(s=seed + 2**32))  # the seed's high word is part of the key
    assert not torch.equal(base, q(c=counter + 1))
    assert torch.equal(base, q(c=counter + 2**32))  # the counter's low 32 bits are the key
    assert not torch.equal(base[0], base[1])  # the row is part of the key


def test_results_independent_of_thread_count():
    w = torch.randn(600, 64)
    step = random_steps(w, 3)
    t = random_table(1000, 64, 3, "affine")
    indices, offsets = random_bags(1000, 5000)
    psw = torch.randn(indices.numel())
    results = []
    for n in (1, 2):
        with num_threads(n):
            results.append([ops.quantize(w, 3, "symmetric", step, True, 5, 6),
                            ops.quantize(w, 5, "affine"),
                            t.lookup(indices, offsets, per_sample_weights=psw),
                            t.lookup(indices, offsets, mode="mean"),
                            t.lookup(indices, None, mode="none")])
    for one, two in zip(*results):
        assert torch.equal(one, two)
    # and the multi-threaded paths (split over bags and rows) are right
    torch.testing.assert_close(results[1][2], t.lookup(indices, offsets, impl=reference,
                                                       per_sample_weights=psw))
    assert torch.equal(results[1][0], reference.quantize(w, 3, "symmetric", step, True, 5, 6))


# --- Philox4x32-10, written here from the algorithm (Salmon et al., SC'11) ----------------

def philox4x32_10(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def uniform(seed, counter, row, d):
    """The uniform of element d of `row` (seed, counter: 64-bit two's complement)."""
    ctr = (d // 4, row & M32, (row >> 32) & M32, counter & M32)
    x = philox4x32_10(ctr, (seed & M32, (seed >> 32) & M32))[d % 4]
    return (x >> 8) / 2**24


def test_python_philox_known_answers():
    # Random123's kat_vectors for philox4x32 with 10 rounds
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((M32,) * 4, (M32, M32)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    pi = philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))
    assert pi == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def test_reference_stream_matches_python_philox():
    seed, counter, dim = 0x5EAD_BEEF_0123_4567, 2**32 + 9, 16
    rows = torch.tensor([0, 1, 7, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62 + 11])
    got = reference.sr_uniforms(seed, counter, rows, dim)
    want = torch.tensor([[uniform(seed, counter, r, d) for d in range(dim)] for r in rows.tolist()])
    assert torch.equal(got, want.float())


@pytest.mark.parametrize("seed", [2**40 + 77, 2**63 - 1, -5])
def test_kernel_stochastic_codes_follow_philox(seed):
    """With step 1 the kernel's code is floor(w + u) for the Python stream's u."""
    counter, n, dim, bits = 123456, 6, 24, 8
    w = torch.rand(n, dim) * 200 - 100
    u = torch.tensor([[uniform(seed, counter, r, d) for d in range(dim)] for r in range(n)])
    expected = torch.floor(w + u.float()).clamp(-128, 127)
    rows = ops.quantize(w, bits, "symmetric", torch.ones(1), True, seed, counter)
    codes = ops.unpack(rows, bits, dim).long() + formats.qmin(bits)
    assert torch.equal(codes, expected.long())


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends("cpu", "reference", "cuda"))
def test_quantize_rejects_non_finite(backend):
    weight = torch.randn(4, 8)
    weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        backend.run(ops.quantize, weight, 4)


# (id, call, exception, message)
ERRORS = [
    ("quantize-nan", lambda: ops.quantize(torch.tensor([[0.0] * 7 + [float("nan")]]), 4),
     ValueError, r"non-finite value at row 0, column 7"),
    ("quantize-float64", lambda: ops.quantize(torch.zeros(2, 8, dtype=torch.float64), 4),
     TypeError, r"weight must be float32, got Double"),
    ("quantize-no-step", lambda: ops.quantize(torch.zeros(2, 8), 4, "symmetric"), ValueError,
     r"symmetric formats need a step"),
    ("quantize-step-zero", lambda: ops.quantize(torch.zeros(2, 8), 4, "symmetric",
                                                torch.tensor([1.0, 0.0])),
     ValueError, r"steps must be positive and finite, got 0"),
    ("quantize-step-count", lambda: ops.quantize(torch.zeros(3, 8), 4, "symmetric",
                                                 torch.ones(2)),
     ValueError, r"step must have 1 or N elements, got 2"),
    ("quantize-table-step-count", lambda: ops.quantize(torch.zeros(3, 8), 4, "symmetric_table",
                                                       torch.ones(3)),
     ValueError, r"step must have 1 elements, got 3"),
    ("quantize-step-on-meta", lambda: ops.quantize(torch.zeros(3, 8), 4, "symmetric",
                                                   torch.ones(1, device="meta")),
     ValueError, r"step is on meta but weight is on cpu"),
    ("quantize-dim-0", lambda: ops.quantize(torch.zeros(2, 0), 4), ValueError,
     r"embedding dim must be positive, got 0"),
    ("dequantize-wrong-width", lambda: ops.dequantize(torch.zeros(2, 15, dtype=torch.uint8), 8,
                                                      8, "affine"),
     ValueError, r"packed rows have 15 bytes but dim=8, bits=8, format=2 needs 16"),
    ("dequantize-step-on-meta", lambda: ops.dequantize(
        torch.zeros(2, 4, dtype=torch.uint8), 4, 8, "symmetric_table",
        torch.ones(1, device="meta")), ValueError, r"step is on meta but rows is on cpu"),
]


@pytest.mark.parametrize("call,exc,match", [pytest.param(*c[1:], id=c[0]) for c in ERRORS])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
