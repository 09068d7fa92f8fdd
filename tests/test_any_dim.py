"""Rows of any embedding dim: every op takes the true D, stores rows padded to whole groups
of 8 codes, returns exactly D columns, and agrees with the reference at D not a multiple of
8, on every device (the compiled kernels) and in Triton's interpreter (the Triton kernels)."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import random_bags, random_psw, random_table

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

from qembed import formats, ops, reference  # noqa: E402

ODD_DIMS = [1, 3, 12, 100]
SYMMETRIC = ["symmetric", "symmetric_table"]
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]
needs_triton_interpreter = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton's interpreter on CPU tensors")


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def same(a, b):
    """Bit-exact equality of tensors (floats by their bits, on the CPU), or both None."""
    if a is None or b is None:
        return a is None and b is None
    a, b = torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        a, b = a.view(torch.int32), b.view(torch.int32)
    return torch.equal(a, b)


def pad_codes(rows, bits, dim):
    """The codes of the pad columns of packed rows: [N, padded_dim - dim]."""
    return reference.unpack(rows, bits, formats.padded_dim(dim))[:, dim:]


def zero_code(bits, fmt):
    return 0 if fmt == "affine" else -formats.qmin(bits)


@pytest.mark.parametrize("dim", ODD_DIMS)
def test_layout_pads_to_whole_groups(dim):
    for bits in range(1, 9):
        assert formats.code_bytes(dim, bits) == -(-dim // 8) * bits
        assert formats.row_bytes(dim, bits, "symmetric") % 4 == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_pack_unpack(bits, dim, device):
    codes = torch.randint(0, 1 << bits, (9, dim), dtype=torch.uint8)
    packed = ops.pack(codes.to(device), bits)
    assert same(packed, reference.pack(codes, bits))
    assert packed.shape == (9, formats.code_bytes(dim, bits))
    assert same(ops.unpack(packed, bits, dim), codes)
    assert not pad_codes(packed.cpu(), bits, dim).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("fmt", ["affine", "symmetric", "symmetric_table"])
@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "sr"])
def test_quantize_and_dequantize(bits, fmt, dim, stochastic, device):
    w = torch.randn(11, dim) + 0.5  # rows whose minimum is not 0: the pad must not move it
    step = None
    if fmt != "affine":
        peak = w.abs().amax(1) if fmt == "symmetric" else w.abs().amax().reshape(1)
        step = peak / max(formats.qmax(bits), 1)
    rows = ops.quantize(*on(device, w), bits, fmt, *on(device, step), stochastic, seed=3,
                        counter=7)
    assert same(rows, reference.quantize(w, bits, fmt, step, stochastic, 3, 7))
    rows = rows.cpu()
    assert rows.shape == (11, formats.row_bytes(dim, bits, fmt))
    assert (pad_codes(rows, bits, dim) == zero_code(bits, fmt)).all()
    table_step = step if fmt == "symmetric_table" else None
    values = ops.dequantize(*on(device, rows), bits, dim, fmt, *on(device, table_step))
    assert same(values, reference.dequantize(rows, bits, dim, fmt, table_step))
    values = values.cpu()
    scale = reference.row_params(rows, bits, dim, fmt, table_step)[0]
    if fmt == "affine":  # the row's own range: within one step of w everywhere
        assert ((values - w).abs() <= scale[:, None] * (1 + 1e-5)).all()
        torch.testing.assert_close(values.amin(1), w.amin(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("fmt", ["affine", "symmetric", "symmetric_table"])
@pytest.mark.parametrize("mode,psw", [("sum", False), ("sum", True), ("mean", False),
                                      ("none", True)])
def test_lookup_and_psw_gradient(mode, psw, fmt, dim, device):
    """Random bytes, pad codes included: whatever the pad holds never reaches a result."""
    bits = 1 + dim % 8
    t = random_table(40, dim, bits, fmt)
    indices, offsets = random_bags(40, 13, padding_idx=2)
    weights = random_psw(indices.numel()) if psw else None
    rows, step, idx, off, psw_d = on(device, t.rows, t.step, indices, offsets, weights)
    out = ops.embedding_bag(rows, idx, off, bits, dim, fmt, step, psw_d, mode, padding_idx=2)
    want = t.lookup(indices, offsets, impl=reference, per_sample_weights=weights, mode=mode,
                    padding_idx=2)
    assert out.shape == (indices.numel() if mode == "none" else 13, dim) and out.is_contiguous()
    out = out.cpu()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    dense = t.dequantize()
    if mode != "none":
        torch.testing.assert_close(out, F.embedding_bag(indices, dense, offsets, mode=mode,
                                                        per_sample_weights=weights,
                                                        padding_idx=2), rtol=1e-5, atol=1e-5)
    if mode != "mean":
        grad_out = torch.randn(out.shape)
        got = ops.embedding_bag_psw_backward(*on(device, grad_out), rows, idx, off, bits, dim,
                                             fmt, step, mode, padding_idx=2).cpu()
        expect = reference.embedding_bag_psw_backward(grad_out, t.rows, indices, offsets, bits,
                                                      dim, fmt, t.step, mode, padding_idx=2)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def update_case(bits, fmt, optimizer, dim, rows=30, seed=0):
    """A symmetric table (pad codes as random as the rest), its state and a batch's rows."""
    gen = torch.Generator().manual_seed(seed)
    table = random_table(rows, dim, bits, fmt)
    width = {"sgd": 0, "adagrad": 1, "adam": 2 * dim, "none": 0}[optimizer]
    state = torch.rand(rows, width, generator=gen)
    step_state = torch.rand(rows if fmt == "symmetric" else 1, 2, generator=gen)
    uniq = torch.randperm(rows, generator=gen)[:12].sort().values
    grad = torch.randn(12, dim, generator=gen)
    grad[5, 0] = float("nan")
    return table, state, step_state, uniq, grad


def run_update(impl, table, state, step_state, uniq, grad, device="cpu", **kw):
    rows, step, st, sst, uniq, grad = on(device, table.rows, table.step, state, step_state, uniq,
                                         grad)
    rows, st, sst = rows.clone(), st.clone(), sst.clone()
    step = None if step is None else step.clone()
    for name in ("weights", "weights_out"):
        if kw.get(name) is not None:
            kw[name] = kw[name].to(device)
    skipped = impl(rows, step, st, sst, uniq, grad, table.bits, table.dim, table.fmt, **kw)
    return rows, step, st, sst, skipped, kw.get("weights_out")


UPDATES = [("sgd", False, "sgd", True), ("adagrad", True, "sgd", True),
           ("adam", True, "adam", False), ("adagrad", True, "adam", True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("fmt", SYMMETRIC)
@pytest.mark.parametrize("optimizer,learn_step,step_optimizer,stochastic", UPDATES)
def test_update_matches_reference(optimizer, learn_step, step_optimizer, stochastic, fmt, dim,
                                  device):
    bits = 1 + (dim + len(optimizer)) % 8
    case = update_case(bits, fmt, optimizer, dim, seed=dim)
    kw = dict(optimizer=optimizer, lr=0.05, eps=1e-6, weight_decay=0.01, betas=(0.8, 0.99),
              iteration=2, learn_step=learn_step, step_optimizer=step_optimizer, step_lr=1e-3,
              stochastic=stochastic, seed=2**40 + dim, counter=5)
    got = run_update(ops.lowp_update, *case, device=device, **kw)
    want = run_update(reference.lowp_update, *case, **kw)
    assert [i for i, (a, b) in enumerate(zip(got, want)) if not same(a, b)] == []
    touched = case[3][torch.arange(12) != 5]
    assert (pad_codes(got[0].cpu()[touched], bits, dim) == zero_code(bits, fmt)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("fmt", SYMMETRIC)
def test_update_with_given_and_kept_weights(fmt, dim, device):
    """The two-pass pieces: weights_out of a first update, then a step update from them."""
    case = update_case(4, fmt, "adagrad", dim, seed=1)
    outs = []
    for impl, dev in ((ops.lowp_update, device), (reference.lowp_update, "cpu")):
        first = run_update(impl, *case, device=dev, stochastic=False,
                           weights_out=torch.zeros(12, dim))
        kept = first[5]
        g2 = torch.randn(12, dim, generator=torch.Generator().manual_seed(2)).to(dev)
        second = impl(*first[:4], case[3].to(dev), g2, 4, dim, fmt, optimizer="none",
                      learn_step=True, step_lr=1e-3, weights=kept, seed=3, counter=9)
        outs.append((kept,) + first[:4] + (second,))
    assert outs[0][0][5].isnan().all() and not outs[0][0][:5].isnan().any()
    assert [i for i, (a, b) in enumerate(zip(*outs)) if not same(a, b)] == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", ODD_DIMS)
def test_search_ops_match_reference(dim, device):
    bits = [0, 1, 3, 6]
    weight, beta = torch.randn(25, dim) * 0.1, torch.randn(dim) * 0.02
    alpha = torch.rand(len(bits)) * 0.04 + 0.01
    row_group = torch.randint(0, 4, (25,))
    probs = torch.softmax(torch.randn(4, len(bits)), 1)
    indices, offsets = random_bags(25, 9)
    args = on(device, weight, indices, offsets, row_group, probs, alpha, beta)
    got = ops.mpe_search_forward(*args, bits, "sum").cpu()
    want = reference.mpe_search_forward(weight, indices, offsets, row_group, probs, alpha, beta,
                                        bits, "sum")
    assert got.shape == (9, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    uniq, grad = reference.embedding_bag_backward(torch.randn(9, dim), indices, offsets)
    numel = indices.numel() * dim
    got = ops.mpe_search_backward(*on(device, weight, uniq, grad, row_group, probs, alpha, beta),
                                  bits, numel)
    want = reference.mpe_search_backward(weight, uniq, grad, row_group, probs, alpha, beta,
                                         bits, numel)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("mode,psw", [("sum", True), ("mean", False), ("none", False)])
def test_mixed_width_lookup_matches_reference(mode, psw, dim, device):
    widths = [1, 3, 8]
    row_bits = torch.tensor([0, 1, 3, 8] * 6)
    segments = [torch.randint(0, 256, (int((row_bits == b).sum()), formats.code_bytes(dim, b)),
                              dtype=torch.uint8) for b in widths]
    location = torch.full((24,), -1, dtype=torch.int32)
    start = 0
    for b in widths:
        ids = torch.nonzero(row_bits == b).flatten()
        location[ids] = torch.arange(start, start + ids.numel(), dtype=torch.int32)
        start += ids.numel()
    steps, beta = torch.rand(3) * 0.1 + 0.01, torch.randn(dim)
    indices, offsets = random_bags(24, 10)
    weights = random_psw(indices.numel()) if psw else None
    offsets = None if mode == "none" else offsets
    got = ops.mpe_embedding_bag(on(device, *segments), widths,
                                *on(device, steps, beta, location, indices, offsets, weights),
                                mode).cpu()
    want = reference.mpe_embedding_bag(segments, widths, steps, beta, location, indices, offsets,
                                       weights, mode)
    assert got.shape == want.shape and got.shape[1] == dim
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_triton_interpreter
@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("fmt", ["affine", "symmetric_table"])
def test_triton_lookup_matches_cpu(fmt, dim):
    t = random_table(30, dim, 3, fmt)
    indices, offsets = random_bags(30, 9)
    weights = random_psw(indices.numel())
    for mode in ("sum", "none"):
        with ops.use_triton():
            got = t.lookup(indices, offsets, per_sample_weights=weights, mode=mode)
        torch.testing.assert_close(got, t.lookup(indices, offsets, per_sample_weights=weights,
                                                 mode=mode), rtol=1e-5, atol=1e-5)


@needs_triton_interpreter
@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("fmt", SYMMETRIC)
@pytest.mark.parametrize("optimizer,learn_step,step_optimizer,stochastic",
                         [UPDATES[1], UPDATES[2]])
def test_triton_update_equals_cpu(optimizer, learn_step, step_optimizer, stochastic, fmt, dim):
    case = update_case(5, fmt, optimizer, dim, seed=dim + 1)
    kw = dict(optimizer=optimizer, lr=0.05, weight_decay=0.01, iteration=3,
              learn_step=learn_step, step_optimizer=step_optimizer, step_lr=1e-3,
              stochastic=stochastic, seed=11, counter=2)
    with ops.use_triton():
        got = run_update(ops.lowp_update, *case, **kw)
    want = run_update(ops.lowp_update, *case, **kw)
    assert [i for i, (a, b) in enumerate(zip(got, want)) if not same(a, b)] == []
