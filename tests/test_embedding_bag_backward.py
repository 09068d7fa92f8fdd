"""embedding_bag's backward ops on the CPU and CUDA kernels: embedding_bag_backward (the
gradient of each distinct row read) and embedding_bag_psw_backward (the gradient of the
per-sample weights), bit for bit against each other and the reference, and against autograd
through torch.nn.functional on the dequantized table."""
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BACKENDS,
    BITS,
    COMPILED_BACKENDS,
    DIMS,
    FORMATS,
    INDEX_DTYPES,
    backends,
    make_batch,
    make_table,
    random_bags,
    random_psw,
    random_table,
    same,
)

from qembed import ops, reference

BACKWARD_CASES = [  # mode, with per-sample weights, include_last_offset, padding_idx
    ("sum", False, False, None), ("sum", True, True, 3), ("mean", False, False, 5),
    ("mean", False, True, None), ("none", True, False, 2), ("none", False, False, None)]


def bags_with_tail(num_rows, num_bags, index_dtype=torch.int64, include_last_offset=False,
                   padding_idx=None, hot=None):
    """random_bags, plus (with include_last_offset) indices past the last bag, which belong
    to none, and (with `hot`) every third index set to row `hot`, whose run of repeats spans
    several warps' worth of positions."""
    indices, offsets = random_bags(num_rows, num_bags, max_len=70, index_dtype=index_dtype,
                                   include_last_offset=include_last_offset,
                                   padding_idx=padding_idx)
    if hot is not None:
        indices[::3] = hot
    if include_last_offset:
        indices = torch.cat([indices, torch.randint(0, num_rows, (5,), dtype=index_dtype)])
    return indices, offsets


def backward_everywhere(backend, *args):
    """embedding_bag_backward(*args) on the backend, the CPU kernel and the reference."""
    return [b.run(ops.embedding_bag_backward, *args)
            for b in (backend, BACKENDS["cpu"], BACKENDS["reference"])]


@pytest.mark.parametrize("dim", DIMS + [520])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("mode,with_psw,include_last_offset,padding_idx", BACKWARD_CASES)
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_backward_equals_cpu_and_reference(backend, mode, with_psw, include_last_offset,
                                           padding_idx, index_dtype, dim):
    """Bit for bit: repeats (a hot row among them) are summed in batch order on every device;
    positions past the last bag belong to none."""
    indices, offsets = bags_with_tail(300, 60, index_dtype, include_last_offset, padding_idx,
                                      hot=7)
    psw = random_psw(indices.numel()) if with_psw else None
    num_out = indices.numel() if mode == "none" else offsets.numel() - include_last_offset
    grad_out = torch.randn(num_out, dim)
    (uniq, grad), (cpu_uniq, cpu_grad), (ref_uniq, ref_grad) = backward_everywhere(
        backend, grad_out, indices, offsets, psw, mode, include_last_offset, padding_idx)
    assert uniq.device.type == backend.device
    assert uniq.dtype == torch.int64 and grad.dtype == torch.float32
    assert torch.equal(uniq.cpu(), cpu_uniq) and same(grad, cpu_grad)
    assert torch.equal(cpu_uniq, ref_uniq) and same(cpu_grad, ref_grad)


@pytest.mark.parametrize("mode,psw,include_last,padding,dtype", [
    ("sum", False, False, None, torch.int64), ("sum", True, False, 3, torch.int32),
    ("mean", False, True, 5, torch.int64), ("mean", False, False, None, torch.int32),
    ("none", True, False, 2, torch.int64), ("none", False, False, None, torch.int64)])
def test_backward_matches_reference_and_autograd(mode, psw, include_last, padding, dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    rows, dim, bits, fmt = 40, 24, 4, "symmetric"
    table, step = make_table(rows, dim, bits, fmt, gen)
    indices, offsets = make_batch(rows, 17, gen, dtype)
    if include_last:
        offsets = torch.cat([offsets, offsets.new_tensor([indices.numel()])])
    weights = torch.randn(indices.numel(), generator=gen) if psw else None
    n_out = indices.numel() if mode == "none" else offsets.numel() - include_last
    grad_out = torch.randn(n_out, dim, generator=gen)

    uniq, grad = ops.embedding_bag_backward(grad_out, indices, offsets, weights, mode,
                                            include_last, padding)
    ref_uniq, ref_grad = reference.embedding_bag_backward(grad_out, indices, offsets, weights,
                                                          mode, include_last, padding)
    assert torch.equal(uniq, ref_uniq) and torch.equal(grad, ref_grad)
    assert uniq.dtype == torch.int64 and grad.shape == (uniq.numel(), dim)
    assert padding is None or padding not in uniq.tolist()

    dense = ops.dequantize(table, bits, dim, fmt, step).requires_grad_()
    if mode == "none":
        out = F.embedding(indices, dense, padding_idx=padding)
        if weights is not None:
            out = out * weights[:, None]
    else:
        out = F.embedding_bag(indices, dense, offsets, mode=mode, per_sample_weights=weights,
                              include_last_offset=include_last, padding_idx=padding)
    out.backward(grad_out)
    expect = dense.grad
    torch.testing.assert_close(grad, expect[uniq], rtol=1e-5, atol=1e-6)
    others = torch.ones(rows, dtype=torch.bool)
    others[uniq] = False
    assert not expect[others].any()


@pytest.mark.parametrize("offsets", [[], [0, 0, 0], [0, 2]])
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_backward_edge_batches(backend, offsets):
    """No bags, empty bags, an empty batch; a half-precision gradient."""
    for indices in (torch.tensor([4, 1, 4]), torch.zeros(0, dtype=torch.long)):
        off = torch.tensor(offsets, dtype=torch.long).clamp(max=indices.numel())
        for dtype in (torch.float32, torch.float16):
            grad_out = torch.randn(off.numel(), 8).to(dtype)
            results = backward_everywhere(backend, grad_out, indices, off)
            for uniq, grad in results[1:]:
                assert torch.equal(results[0][0].cpu(), uniq) and same(results[0][1], grad)


@pytest.mark.parametrize("backend", backends("cuda"))
def test_backward_is_deterministic_with_hot_rows(backend):
    """Zipf-like repeats: the same bits on every run."""
    indices = (torch.rand(20000) ** 4 * 1000).long()
    offsets = torch.arange(0, 20000, 20)
    grad_out = torch.randn(1000, 64)
    runs = [backend.run(ops.embedding_bag_backward, grad_out, indices, offsets) for _ in range(3)]
    for uniq, grad in runs[1:]:
        assert torch.equal(uniq, runs[0][0]) and same(grad, runs[0][1])
    cpu_uniq, cpu_grad = ops.embedding_bag_backward(grad_out, indices, offsets)
    assert torch.equal(runs[0][0].cpu(), cpu_uniq) and same(runs[0][1], cpu_grad)


@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_backward_rejects_bad_input(backend):
    grad_out = torch.randn(2, 8)
    with pytest.raises(IndexError, match="negative index"):
        backend.run(ops.embedding_bag_backward, grad_out, torch.tensor([1, -2, 3]),
                    torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="offsets"):
        backend.run(ops.embedding_bag_backward, grad_out, torch.tensor([1, 2, 3]),
                    torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="offsets"):
        backend.run(ops.embedding_bag_backward, grad_out, torch.tensor([1, 2, 3]),
                    torch.tensor([1, 2]))


# --- embedding_bag_psw_backward ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sum", "none"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_psw_backward_equals_cpu_and_reference(backend, bits, fmt, dim, mode):
    t = random_table(300, dim, bits, fmt)
    indices, offsets = random_bags(300, 40, max_len=40, padding_idx=3)
    grad_out = torch.randn(indices.numel() if mode == "none" else 40, dim)
    got, cpu, ref = (b.run(ops.embedding_bag_psw_backward, grad_out, t.rows, indices, offsets,
                           bits, dim, fmt, t.step, mode, padding_idx=3)
                     for b in (backend, BACKENDS["cpu"], BACKENDS["reference"]))
    assert got.device.type == backend.device and same(got, cpu) and same(cpu, ref)


@pytest.mark.parametrize("dim", [16, 520])
@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_psw_backward_options(backend, index_dtype, include_last_offset, dim):
    """Index dtypes, positions past the last bag, rows wider than a warp's groups, empty."""
    t = random_table(100, dim, 5, "symmetric")
    indices, offsets = bags_with_tail(100, 20, index_dtype, include_last_offset)
    grad_out = torch.randn(offsets.numel() - include_last_offset, dim)
    kw = dict(mode="sum", include_last_offset=include_last_offset)
    got, ref = (b.run(ops.embedding_bag_psw_backward, grad_out, t.rows, indices, offsets, 5, dim,
                      "symmetric", **kw) for b in (backend, BACKENDS["reference"]))
    assert same(got, ref)
    empty = torch.zeros(0, dtype=index_dtype)
    got = backend.run(ops.embedding_bag_psw_backward, torch.zeros(0, dim), t.rows, empty, empty, 5,
                      dim, "symmetric")
    assert got.shape == (0,) and got.device.type == backend.device


@pytest.mark.parametrize("backend", backends("cuda"))
def test_psw_backward_validated_in_debug_mode(backend, monkeypatch):
    t = random_table(10, 16, 4, "affine")
    args = (torch.randn(2, 16), t.rows, torch.tensor([1, 10, 2]), torch.tensor([0, 2]))
    got = backend.run(ops.embedding_bag_psw_backward, *args, 4, 16, "affine")  # skipped: zero
    assert got[1].item() == 0
    monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
    with pytest.raises(IndexError, match="out of range"):
        backend.run(ops.embedding_bag_psw_backward, *args, 4, 16, "affine")


@pytest.mark.parametrize("mode,fmt,bits", [("sum", "symmetric", 3), ("sum", "affine", 8),
                                           ("none", "symmetric_table", 5)])
def test_psw_gradient_matches_autograd(mode, fmt, bits):
    gen = torch.Generator().manual_seed(bits)
    rows, dim = 30, 16
    w = torch.randn(rows, dim, generator=gen)
    step = torch.full((1,), 0.3) if fmt == "symmetric_table" else torch.full((rows,), 0.3)
    table = ops.quantize(w, bits, fmt, None if fmt == "affine" else step)
    step = step if fmt == "symmetric_table" else None
    indices, offsets = make_batch(rows, 11, gen)
    psw = torch.randn(indices.numel(), generator=gen, requires_grad=True)
    psw_ref = psw.detach().clone().requires_grad_()
    out = ops.embedding_bag(table, indices, offsets, bits, dim, fmt, step, psw, mode,
                            padding_idx=4)
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    dense = ops.dequantize(table, bits, dim, fmt, step)
    if mode == "none":
        ref = F.embedding(indices, dense, padding_idx=4) * psw_ref[:, None]
        ref = ref * (indices != 4)[:, None]
    else:
        ref = F.embedding_bag(indices, dense, offsets, mode="sum", per_sample_weights=psw_ref,
                              padding_idx=4)
    ref.backward(grad_out)
    torch.testing.assert_close(psw.grad, psw_ref.grad, rtol=1e-5, atol=1e-5)
    direct = reference.embedding_bag_psw_backward(grad_out, table, indices, offsets, bits, dim,
                                                  fmt, step, mode, padding_idx=4)
    assert torch.equal(psw.grad, direct)


def test_half_precision_psw_gets_half_gradient():
    gen = torch.Generator().manual_seed(12)
    table, _ = make_table(30, 16, 4, "symmetric", gen)
    indices, offsets = make_batch(30, 6, gen)
    half = torch.randn(indices.numel(), generator=gen).half().requires_grad_()
    ops.embedding_bag(table, indices, offsets, 4, 16, "symmetric",
                      per_sample_weights=half).sum().backward()
    assert half.grad.dtype == torch.float16


@pytest.mark.parametrize("top", [2**20, 2**45])
def test_backward_sorts_wide_keys(top):
    """Indices whose (index, position) pairs fit one word, and ones that do not (the CPU
    sort's two paths), with many repeats."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    distinct = torch.randint(0, top, (300,), generator=gen)
    indices = distinct[torch.randint(0, 300, (5000,), generator=gen)]
    offsets = torch.arange(0, 5000, 7)
    grad_out = torch.randn(offsets.numel(), 16, generator=gen)
    got = ops.embedding_bag_backward(grad_out, indices, offsets)
    want = reference.embedding_bag_backward(grad_out, indices, offsets)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
