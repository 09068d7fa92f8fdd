"""The CUDA kernels against the reference and the CPU kernels, on fresh random data. Needs a
CUDA device and an extension built with its CUDA kernels (QEMBED_CUDA=1); skipped otherwise."""
import itertools

import pytest
import torch
from conftest import BITS, FORMATS, MODES, random_bags, random_psw, random_steps, random_table
from test_mpe_ops import BITS as MPE_BITS
from test_mpe_ops import LAYOUTS, mixed_table, search_inputs
from test_train_ops import STATE_WIDTH, make_table, run_update, same

from qembed import LowPrecisionEmbeddingBag, QuantizedEmbeddingBag, formats, ops, reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DIMS = [8, 64, 128, 136]
OPS = ["pack", "unpack", "quantize", "dequantize", "embedding_bag", "embedding_bag_backward",
       "embedding_bag_psw_backward", "lowp_update", "mpe_search_forward", "mpe_search_backward",
       "mpe_embedding_bag"]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


def assert_close(actual, expected, dtype=torch.float32):
    """fp32: float reordering only; fp16/bf16: one rounding of the fp32 result (1 ulp)."""
    assert actual.dtype == dtype and actual.is_cuda
    actual, expected = actual.cpu(), expected.cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(actual.float(), expected.to(dtype).float(), rtol=eps, atol=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_kernels_are_registered(op):
    assert ops.HAS_EXTENSION
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qembed::{op}", "CUDA"), (
        f"qembed::{op} has no CUDA kernel: build with QEMBED_CUDA=1")


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack(bits, dim):
    codes = torch.randint(0, 1 << bits, (33, dim), dtype=torch.uint8)
    packed = ops.pack(codes.cuda(), bits)
    assert torch.equal(packed.cpu(), reference.pack(codes, bits))
    wide = torch.randint(0, 256, (33, packed.shape[1] + 5), dtype=torch.uint8)
    wide[:, : packed.shape[1]] = packed.cpu()
    assert torch.equal(ops.unpack(wide.cuda(), bits, dim).cpu(), codes)


def test_pack_rejects_wide_codes():
    with pytest.raises(ValueError, match="does not fit"):
        ops.pack(torch.full((2, 8), 4, dtype=torch.uint8, device="cuda"), 2)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "sr"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_equals_cpu(bits, fmt, dim, stochastic):
    """Same fp32 inputs and seed: the same bytes as the CPU kernel and the reference."""
    weight = torch.randn(37, dim) * 0.1
    weight[3] = 0.25  # a constant row
    step = None if fmt == "affine" else random_steps(weight, bits, per_row=fmt == "symmetric")
    args = (bits, fmt, step, stochastic, 1234567890123, 77)
    on_cpu = ops.quantize(weight, *args)
    on_gpu = ops.quantize(weight.cuda(), bits, fmt, *cuda(step), stochastic, 1234567890123, 77)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert torch.equal(on_cpu, reference.quantize(weight, *args))


def test_quantize_rejects_non_finite():
    weight = torch.randn(4, 8, device="cuda")
    weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ops.quantize(weight, 4)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_equals_cpu(bits, fmt, dim):
    t = random_table(41, dim, bits, fmt)
    on_gpu = ops.dequantize(*cuda(t.rows), bits, dim, fmt, *cuda(t.step))
    assert torch.equal(on_gpu.cpu(), ops.dequantize(t.rows, bits, dim, fmt, t.step))
    assert torch.equal(on_gpu.cpu(), t.dequantize())


def gpu_embedding_bag(*args, **kwargs):
    """The GPU lookup under test; tests/test_triton_cuda.py swaps in the Triton kernel to run
    the lookup tests of this file on it too."""
    return ops.embedding_bag(*args, **kwargs)


def lookup_both(t, indices, offsets, **kwargs):
    """(GPU result, reference result on CPU) of the same lookup."""
    psw = kwargs.pop("per_sample_weights", None)
    got = gpu_embedding_bag(*cuda(t.rows, indices, offsets), t.bits, t.dim, t.fmt,
                            *cuda(t.step), per_sample_weights=cuda(psw)[0], **kwargs)
    kwargs.pop("output_dtype", None)
    return got, t.lookup(indices, offsets, impl=reference, per_sample_weights=psw, **kwargs)


def check_lookup(t, mode, out_dtype):
    """Bags of 0 to 70 rows (longer than a warp) of table t on the GPU against the reference;
    mode none (no sums to reorder) in fp32 must give the CPU's exact values."""
    indices, offsets = random_bags(300, 50, max_len=70)
    psw = None if mode == "mean" else random_psw(indices.numel())
    got, expected = lookup_both(t, indices, offsets, per_sample_weights=psw, mode=mode,
                                output_dtype=out_dtype)
    assert_close(got, expected, out_dtype)
    if mode == "none" and out_dtype == torch.float32:
        assert torch.equal(got.cpu(), t.lookup(indices, offsets, per_sample_weights=psw,
                                               mode=mode))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_embedding_bag_matches_reference(bits, fmt, mode, dim, out_dtype):
    check_lookup(random_table(300, dim, bits, fmt), mode, out_dtype)


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["idx32", "idx64"])
@pytest.mark.parametrize("mode,with_psw", [("sum", True), ("mean", False), ("none", True)])
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_embedding_bag_options(bits, mode, with_psw, index_dtype, include_last_offset,
                               padding_idx):
    t = random_table(40, 24, bits, "affine")
    indices, offsets = random_bags(40, 30, max_len=40, index_dtype=index_dtype,
                                   offset_dtype=torch.int64 if index_dtype == torch.int32 else
                                   torch.int32, include_last_offset=include_last_offset,
                                   padding_idx=padding_idx)
    psw = random_psw(indices.numel()) if with_psw else None
    got, expected = lookup_both(t, indices, offsets, per_sample_weights=psw, mode=mode,
                                include_last_offset=include_last_offset,
                                padding_idx=padding_idx)
    assert_close(got, expected)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_embedding_bag_wide_rows(bits):
    """Rows wider than one pass of a warp's registers go in column chunks."""
    t = random_table(50, 2056, bits, "symmetric")
    indices, offsets = random_bags(50, 9, max_len=40)
    got, expected = lookup_both(t, indices, offsets, mode="sum")
    assert_close(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_embedding_bag_empty(mode):
    t = random_table(20, 64, 4, "symmetric")
    offsets = torch.tensor([0, 0, 3, 3, 7, 7])
    got, expected = lookup_both(t, torch.randint(0, 20, (7,)), offsets, mode=mode)
    assert_close(got, expected)
    empty = torch.zeros(0, dtype=torch.long)
    got, _ = lookup_both(t, empty, torch.zeros(4, dtype=torch.long), mode=mode)
    assert got.shape == ((0 if mode == "none" else 4), 64) and not got.any()
    got, _ = lookup_both(t, empty, empty, mode=mode)
    assert got.shape == (0, 64)


def test_embedding_bag_unaligned_view():
    """A table view that starts off a 4-byte boundary is read correctly."""
    t = random_table(30, 16, 6, "affine")
    flat = torch.zeros(t.rows.numel() + 1, dtype=torch.uint8)
    flat[1:] = t.rows.flatten()
    view = flat.cuda()[1:].view(t.rows.shape)
    indices, offsets = random_bags(30, 10)
    got = gpu_embedding_bag(view, *cuda(indices, offsets), 6, 16, "affine")
    assert_close(got, t.lookup(indices, offsets, impl=reference))


def test_bad_input_validated_in_debug_mode(monkeypatch):
    t = random_table(10, 16, 4, "affine")
    rows, offsets = cuda(t.rows, torch.tensor([0, 2]))
    bad = torch.tensor([1, 10, 2], device="cuda")
    # default: no synchronisation, the bad index is skipped as padding
    got = ops.embedding_bag(rows, bad, offsets, 4, 16, "affine")
    assert_close(got, t.lookup(torch.tensor([1, 0, 2]), offsets.cpu(), impl=reference,
                               padding_idx=0))
    monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
    with pytest.raises(IndexError, match="out of range"):
        ops.embedding_bag(rows, bad, offsets, 4, 16, "affine")
    with pytest.raises(ValueError, match="offsets"):
        ops.embedding_bag(rows, bad[[0, 2]], torch.tensor([0, 5], device="cuda"), 4, 16,
                          "affine")


def test_current_stream_is_used():
    t = random_table(100, 64, 4, "affine")
    indices, offsets = random_bags(100, 64)
    expected = t.lookup(indices, offsets, impl=reference)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        args = cuda(t.rows, indices, offsets)
        got = ops.embedding_bag(*args, 4, 64, "affine")
    stream.synchronize()
    assert_close(got, expected)


def test_opcheck_embedding_bag():
    t = random_table(20, 16, 4, "symmetric_table")
    indices, offsets = random_bags(20, 6, padding_idx=2)
    args = (*cuda(t.rows, indices, offsets, torch.randn(indices.numel()), t.step), 4, 16,
            formats.FORMATS["symmetric_table"], 0, False, 2, torch.float16)
    torch.library.opcheck(torch.ops.qembed.embedding_bag.default, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_module(backend):
    torch._dynamo.reset()
    weight = torch.randn(1000, 64)
    module = QuantizedEmbeddingBag(1000, 64, mode="sum", padding_idx=0, bits=4,
                                   format="affine")
    module.load_float_weight(weight)
    module = module.cuda()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    indices, offsets = cuda(*random_bags(1000, 128, padding_idx=0))
    psw = torch.randn(indices.numel(), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(compiled(indices, offsets, psw), module(indices, offsets, psw))


# --- training ops ------------------------------------------------------------------------

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


def backward_all(grad_out, indices, offsets, psw, mode, include_last_offset, padding_idx):
    """(CUDA, CPU, reference) results of embedding_bag_backward on the same inputs."""
    args = (mode, include_last_offset, padding_idx)
    got = ops.embedding_bag_backward(*cuda(grad_out, indices, offsets, psw), *args)
    return (got, ops.embedding_bag_backward(grad_out, indices, offsets, psw, *args),
            reference.embedding_bag_backward(grad_out, indices, offsets, psw, *args))


@pytest.mark.parametrize("dim", DIMS + [520])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["idx32", "idx64"])
@pytest.mark.parametrize("mode,with_psw,include_last_offset,padding_idx", [
    ("sum", False, False, None), ("sum", True, True, 3), ("mean", False, False, 5),
    ("mean", False, True, None), ("none", True, False, 2), ("none", False, False, None)])
def test_backward_equals_cpu(mode, with_psw, include_last_offset, padding_idx, index_dtype, dim):
    """Bit for bit: repeats are summed in batch order on every device."""
    indices, offsets = bags_with_tail(300, 60, index_dtype, include_last_offset, padding_idx,
                                      hot=7)
    psw = random_psw(indices.numel()) if with_psw else None
    num_out = indices.numel() if mode == "none" else offsets.numel() - include_last_offset
    grad_out = torch.randn(num_out, dim)
    (uniq, grad), (cpu_uniq, cpu_grad), (ref_uniq, ref_grad) = backward_all(
        grad_out, indices, offsets, psw, mode, include_last_offset, padding_idx)
    assert uniq.is_cuda and uniq.dtype == torch.int64 and grad.dtype == torch.float32
    assert torch.equal(uniq.cpu(), cpu_uniq) and same(grad.cpu(), cpu_grad)
    assert torch.equal(cpu_uniq, ref_uniq) and same(cpu_grad, ref_grad)


def test_backward_is_deterministic_with_hot_rows():
    """Zipf-like repeats: the same bits on every run."""
    indices = (torch.rand(20000) ** 4 * 1000).long()
    offsets = torch.arange(0, 20000, 20)
    grad_out = torch.randn(1000, 64)
    runs = [ops.embedding_bag_backward(*cuda(grad_out, indices, offsets)) for _ in range(3)]
    for uniq, grad in runs[1:]:
        assert torch.equal(uniq, runs[0][0]) and same(grad.cpu(), runs[0][1].cpu())
    cpu_uniq, cpu_grad = ops.embedding_bag_backward(grad_out, indices, offsets)
    assert torch.equal(runs[0][0].cpu(), cpu_uniq) and same(runs[0][1].cpu(), cpu_grad)


@pytest.mark.parametrize("offsets", [[], [0, 0, 0], [0, 2]])
def test_backward_edge_batches(offsets):
    """No bags, empty bags, an empty batch; a half-precision gradient."""
    for indices in (torch.tensor([4, 1, 4]), torch.zeros(0, dtype=torch.long)):
        off = torch.tensor(offsets, dtype=torch.long).clamp(max=indices.numel())
        for dtype in (torch.float32, torch.float16):
            grad_out = torch.randn(off.numel(), 8).to(dtype)
            (uniq, grad), (cpu_uniq, cpu_grad), _ = backward_all(grad_out, indices, off, None,
                                                                 "sum", False, None)
            assert torch.equal(uniq.cpu(), cpu_uniq) and same(grad.cpu(), cpu_grad)


def test_backward_rejects_bad_input():
    grad_out = torch.randn(2, 8, device="cuda")
    with pytest.raises(IndexError, match="negative index"):
        ops.embedding_bag_backward(grad_out, *cuda(torch.tensor([1, -2, 3]), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="offsets"):
        ops.embedding_bag_backward(grad_out, *cuda(torch.tensor([1, 2, 3]), torch.tensor([0, 5])))
    with pytest.raises(ValueError, match="offsets"):
        ops.embedding_bag_backward(grad_out, *cuda(torch.tensor([1, 2, 3]), torch.tensor([1, 2])))


@pytest.mark.parametrize("mode", ["sum", "none"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_psw_backward_equals_cpu(bits, fmt, dim, mode):
    t = random_table(300, dim, bits, fmt)
    indices, offsets = random_bags(300, 40, max_len=40, padding_idx=3)
    grad_out = torch.randn(indices.numel() if mode == "none" else 40, dim)
    args = (bits, dim, fmt)
    got = ops.embedding_bag_psw_backward(*cuda(grad_out, t.rows, indices, offsets), *args,
                                         *cuda(t.step), mode, padding_idx=3)
    cpu = ops.embedding_bag_psw_backward(grad_out, t.rows, indices, offsets, *args, t.step, mode,
                                         padding_idx=3)
    ref = reference.embedding_bag_psw_backward(grad_out, t.rows, indices, offsets, *args, t.step,
                                               mode, padding_idx=3)
    assert got.is_cuda and same(got.cpu(), cpu) and same(cpu, ref)


@pytest.mark.parametrize("dim", [16, 520])
@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["idx32", "idx64"])
def test_psw_backward_options(index_dtype, include_last_offset, dim):
    """Index dtypes, positions past the last bag, rows wider than a warp's groups, empty."""
    t = random_table(100, dim, 5, "symmetric")
    indices, offsets = bags_with_tail(100, 20, index_dtype, include_last_offset)
    grad_out = torch.randn(offsets.numel() - include_last_offset, dim)
    kw = dict(mode="sum", include_last_offset=include_last_offset)
    got = ops.embedding_bag_psw_backward(*cuda(grad_out, t.rows, indices, offsets), 5, dim,
                                         "symmetric", **kw)
    cpu = ops.embedding_bag_psw_backward(grad_out, t.rows, indices, offsets, 5, dim,
                                         "symmetric", **kw)
    assert same(got.cpu(), cpu)
    empty = torch.zeros(0, dtype=index_dtype)
    got = ops.embedding_bag_psw_backward(*cuda(torch.zeros(0, dim), t.rows, empty, empty), 5, dim,
                                         "symmetric")
    assert got.shape == (0,) and got.is_cuda


def test_psw_backward_validated_in_debug_mode(monkeypatch):
    t = random_table(10, 16, 4, "affine")
    args = cuda(torch.randn(2, 16), t.rows, torch.tensor([1, 10, 2]), torch.tensor([0, 2]))
    got = ops.embedding_bag_psw_backward(*args, 4, 16, "affine")  # skipped: zero
    assert got[1].item() == 0
    monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
    with pytest.raises(IndexError, match="out of range"):
        ops.embedding_bag_psw_backward(*args, 4, 16, "affine")


UPDATE_CASES = list(itertools.product(
    ["sgd", "adagrad", "adam", "none"], [(False, "sgd"), (True, "sgd"), (True, "adam")],
    [True, False], ["symmetric", "symmetric_table"]))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("optimizer,learn,stochastic,fmt", UPDATE_CASES)
def test_update_equals_cpu(optimizer, learn, stochastic, fmt, bits):
    """Same inputs and seed: the same codes, steps, state, weights_out and skipped count on
    CUDA as on the CPU (and in the reference), non-finite rows included."""
    learn_step, step_optimizer = learn
    dim = DIMS[bits % len(DIMS)]
    gen = torch.Generator().manual_seed(bits)
    rows = 200
    table, step = make_table(rows, dim, bits, fmt, gen)
    indices, offsets = random_bags(rows, 40, max_len=8)
    uniq, grad = ops.embedding_bag_backward(torch.randn(40, dim), indices, offsets)
    grad[0, 1] = float("inf")
    grad[min(5, uniq.numel() - 1)] = float("nan")
    state = torch.rand(rows, STATE_WIDTH[optimizer](dim))
    step_state = torch.rand(rows if fmt == "symmetric" else 1, 2)
    kw = dict(bits=bits, dim=dim, fmt=fmt, optimizer=optimizer, lr=0.05, eps=1e-6,
              weight_decay=0.01, betas=(0.8, 0.99), iteration=bits, learn_step=learn_step,
              step_optimizer=step_optimizer, step_lr=1e-3, stochastic=stochastic,
              seed=2**40 + bits, counter=17)
    with_out = bits % 2 == 0
    results = []
    for impl, device in [(ops.lowp_update, "cuda"), (ops.lowp_update, "cpu"),
                         (reference.lowp_update, "cpu")]:
        wout = torch.zeros(uniq.numel(), dim, device=device) if with_out else None
        moved = [None if t is None else t.to(device)
                 for t in (table, step, state, step_state, uniq, grad)]
        t, s, st, sst, skipped = run_update(impl, *moved, weights_out=wout, **kw)
        results.append([None if x is None else x.cpu() for x in (t, s, st, sst, wout)]
                       + [skipped])
    assert results[0][-1] == 2
    assert all(same(a, b) for a, b in zip(results[0], results[1]))
    assert all(same(a, b) for a, b in zip(results[1], results[2]))


@pytest.mark.parametrize("fmt", ["symmetric", "symmetric_table"])
def test_update_from_given_weights(fmt):
    """The two-pass pieces on CUDA: weights_out, then an optimizer-free update from given
    weights (a non-finite weight skips its row); rows wider than a warp's groups."""
    gen = torch.Generator().manual_seed(5)
    rows, dim, bits = 500, 520, 4
    table, step = make_table(rows, dim, bits, fmt, gen)
    uniq = torch.randperm(rows, generator=gen)[:300].sort().values
    grad = torch.randn(300, dim, generator=gen)
    weights = torch.randn(300, dim, generator=gen) * 0.05
    weights[7, 3] = float("inf")
    state = torch.rand(rows, 1, generator=gen)
    step_state = torch.rand(rows if fmt == "symmetric" else 1, 2, generator=gen)
    kw = dict(bits=bits, dim=dim, fmt=fmt, optimizer="none", learn_step=True,
              step_optimizer="adam", step_lr=1e-3, seed=3, counter=9)
    outs = []
    for device in ("cuda", "cpu"):
        moved = [None if t is None else t.to(device)
                 for t in (table, step, state, step_state, uniq, grad, weights)]
        res = run_update(ops.lowp_update, *moved[:6], weights=moved[6], **kw)
        outs.append([None if x is None else x.cpu() for x in res[:4]] + [res[4]])
    assert outs[0][-1] == 1
    assert all(same(a, b) for a, b in zip(*outs))


def test_update_returns_count_on_device():
    table, _ = make_table(10, 16, 4, "symmetric", torch.Generator().manual_seed(0))
    skipped = ops.lowp_update(table.cuda(), None, torch.zeros(10, 1, device="cuda"),
                              torch.zeros(10, 0, device="cuda"), torch.tensor([1, 4], device="cuda"),
                              torch.randn(2, 16, device="cuda"), 4, 16)
    assert skipped.is_cuda and skipped.dtype == torch.int64 and skipped.dim() == 0
    assert int(skipped) == 0


def test_update_bad_rows(monkeypatch):
    """Out-of-range or repeated rows are left alone; QEMBED_CUDA_VALIDATE=1 raises."""
    table, _ = make_table(10, 16, 4, "symmetric", torch.Generator().manual_seed(0))
    table = table.cuda()
    empty = torch.zeros(10, 0, device="cuda")
    grad = torch.randn(2, 16, device="cuda")
    for uniq, error, match in [([3, 10], IndexError, "out of range"),
                               ([3, 3], ValueError, "strictly increasing")]:
        rows = torch.tensor(uniq, device="cuda")
        t = table.clone()
        ops.lowp_update(t, None, empty, empty, rows, grad, 4, 16, optimizer="sgd")
        assert torch.equal(t[4:], table[4:]) and torch.equal(t[:3], table[:3])
        monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
        with pytest.raises(error, match=match):
            ops.lowp_update(t, None, empty, empty, rows, grad, 4, 16, optimizer="sgd")
        monkeypatch.delenv("QEMBED_CUDA_VALIDATE")


def test_opcheck_training_ops():
    gen = torch.Generator().manual_seed(12)
    rows, dim, bits = 30, 16, 4
    table, _ = make_table(rows, dim, bits, "symmetric", gen)
    indices, offsets = random_bags(rows, 6)
    grad_out = torch.randn(6, dim)
    psw = torch.randn(indices.numel())
    torch.library.opcheck(torch.ops.qembed.embedding_bag_psw_backward.default,
                          (*cuda(grad_out, table, indices, offsets), None, bits, dim, 0, 0, False,
                           -1))
    torch.library.opcheck(torch.ops.qembed.embedding_bag_backward.default,
                          (*cuda(grad_out, indices, offsets, psw), 0, False, -1),
                          test_utils=("test_schema", "test_faketensor"))
    uniq, grad = ops.embedding_bag_backward(*cuda(grad_out, indices, offsets))
    torch.library.opcheck(torch.ops.qembed.lowp_update.default,
                          (table.cuda(), None, torch.zeros(rows, 1, device="cuda"),
                           torch.zeros(rows, 0, device="cuda"), uniq, grad, None, None, bits, dim,
                           0, 1, 0.1, 1e-8, 0.0, 0.9, 0.999, 1, True, 0, 1e-3, True, 0, 1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("step_per", ["row", "table"])
def test_training_module_equals_cpu(step_per):
    """LowPrecisionEmbeddingBag trained on CUDA (lookup, both backwards, fused update) ends
    bit for bit where the same module trained on the CPU does."""
    torch.manual_seed(0)
    module = LowPrecisionEmbeddingBag(500, 64, mode="sum", bits=4, optimizer="adagrad",
                                      step_per=step_per)
    on_gpu = LowPrecisionEmbeddingBag(500, 64, mode="sum", bits=4, optimizer="adagrad",
                                      step_per=step_per)
    on_gpu.load_state_dict(module.state_dict())
    on_gpu = on_gpu.cuda()
    for _ in range(3):
        indices, offsets = random_bags(500, 64, max_len=30)
        psw = torch.rand(indices.numel())
        grad_out = torch.randn(64, 64)
        for m, dev in ((module, "cpu"), (on_gpu, "cuda")):
            w = psw.to(dev).requires_grad_()
            m(indices.to(dev), offsets.to(dev), w).backward(grad_out.to(dev))
    for name, buf in module.state_dict().items():
        assert same(on_gpu.state_dict()[name].cpu(), buf), name


# --- mixed-precision embeddings ------------------------------------------------------------

SEARCH_BITS = [MPE_BITS, [0, 2, 4, 8], [3]]


@pytest.mark.parametrize("dim", [16, 40])
@pytest.mark.parametrize("bits", SEARCH_BITS, ids=["0-6", "0248", "3"])
@pytest.mark.parametrize("mode", MODES)
def test_search_forward_equals_cpu(mode, bits, dim):
    weight, row_group, logits, alpha, beta = search_inputs(rows=60, dim=dim, bits=bits)
    probs = torch.softmax(logits, 1)
    indices, offsets = random_bags(60, 20, max_len=40)
    offsets = None if mode == "none" else offsets
    args = (row_group, probs, alpha, beta)
    got = ops.mpe_search_forward(*cuda(weight, indices, offsets, *args), bits, mode)
    assert same(got.cpu(), ops.mpe_search_forward(weight, indices, offsets, *args, bits, mode))


@pytest.mark.parametrize("dim", [16, 40])
@pytest.mark.parametrize("bits", SEARCH_BITS, ids=["0-6", "0248", "3"])
def test_search_backward_equals_cpu(bits, dim):
    """Every gradient bit for bit: the partial sums are added in the CPU's row order."""
    weight, row_group, logits, alpha, beta = search_inputs(rows=300, dim=dim, groups=7,
                                                           bits=bits)
    unique = torch.unique(torch.randint(0, 300, (200,)))
    args = (weight, unique, torch.randn(unique.numel(), dim), row_group,
            torch.softmax(logits, 1), alpha, beta)
    got = ops.mpe_search_backward(*cuda(*args), bits, 500)
    want = ops.mpe_search_backward(*args, bits, 500)
    assert all(g.is_cuda and same(g.cpu(), w) for g, w in zip(got, want))
    empty = ops.mpe_search_backward(*cuda(weight, unique[:0], args[2][:0], *args[3:]), bits, 0)
    assert [tuple(t.shape) for t in empty] == [(0, dim), (len(bits),), (dim,), (7, len(bits))]


def test_search_validated_in_debug_mode(monkeypatch):
    weight, row_group, logits, alpha, beta = search_inputs()
    args = cuda(weight, torch.tensor([1, 60]), None, row_group, torch.softmax(logits, 1), alpha,
                beta)
    got = ops.mpe_search_forward(*args, MPE_BITS, "none")  # row 60 skipped: zeros
    assert not got[1].any()
    monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
    with pytest.raises(IndexError, match="out of range"):
        ops.mpe_search_forward(*args, MPE_BITS, "none")
    args[5] = -args[5]
    with pytest.raises(ValueError, match="alpha must be positive"):
        ops.mpe_search_forward(*cuda(weight, torch.tensor([1])), *args[2:], MPE_BITS, "none")


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode,with_psw", [("sum", False), ("sum", True), ("mean", False),
                                           ("none", True)])
@pytest.mark.parametrize("dim", [24, 136])
def test_mixed_lookup_matches_cpu(dim, mode, with_psw, layout, out_dtype):
    segments, seg_bits, steps, beta, location, _ = mixed_table(200, dim, [0, 1, 3, 4, 5, 8],
                                                               layout)
    indices, offsets = random_bags(200, 30, max_len=40)
    offsets = None if mode == "none" else offsets
    psw = random_psw(indices.numel()) if with_psw else None
    got = ops.mpe_embedding_bag(cuda(*segments), seg_bits,
                                *cuda(steps, beta, location, indices, offsets, psw), mode,
                                output_dtype=out_dtype)
    want = ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, indices, offsets, psw,
                                 mode)
    assert_close(got, want, out_dtype)


@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
def test_mixed_lookup_options(include_last_offset):
    """int32 indices, include_last_offset, an all-pruned table, empty batches."""
    segments, seg_bits, steps, beta, location, _ = mixed_table(50, 16, [0, 2, 7])
    indices, offsets = random_bags(50, 12, max_len=40, index_dtype=torch.int32,
                                   include_last_offset=include_last_offset)
    args = (indices, offsets, None, "sum", include_last_offset)
    got = ops.mpe_embedding_bag(cuda(*segments), seg_bits, *cuda(steps, beta, location), *cuda(
        *args[:2]), *args[2:])
    assert_close(got, ops.mpe_embedding_bag(segments, seg_bits, steps, beta, location, *args))
    pruned = torch.full((50,), -1, dtype=torch.int32)
    got = ops.mpe_embedding_bag([], [], *cuda(torch.zeros(0), beta, pruned, indices, offsets),
                                None, "mean", include_last_offset)
    assert got.shape == (12, 16) and not got.any()
    empty = torch.zeros(0, dtype=torch.long)
    got = ops.mpe_embedding_bag(cuda(*segments), seg_bits, *cuda(steps, beta, location, empty,
                                                                  empty), None, "sum")
    assert got.shape == (0, 16)


@pytest.mark.parametrize("layout", ["map32", "ranges"])
def test_mixed_lookup_validated_in_debug_mode(monkeypatch, layout):
    segments, seg_bits, steps, beta, location, _ = mixed_table(20, 8, [1, 2], layout)
    if layout == "ranges":  # the range holding row 3 placed past the segments
        location[int(torch.searchsorted(location[:, 0], 3, right=True)) - 1, 1] = 10_000
    else:
        location[3] = 10_000
    table = (cuda(*segments), seg_bits, *cuda(steps, beta, location))
    got = ops.mpe_embedding_bag(*table, torch.tensor([3], device="cuda"), None, None, "none")
    assert not got.any()  # skipped
    monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
    with pytest.raises(ValueError, match="outside the segments"):
        ops.mpe_embedding_bag(*table, torch.tensor([3], device="cuda"), None, None, "none")
    with pytest.raises(IndexError, match="out of range"):
        ops.mpe_embedding_bag(*table, torch.tensor([20], device="cuda"), None, None, "none")


def test_opcheck_mpe_ops():
    weight, row_group, logits, alpha, beta = search_inputs()
    probs = torch.softmax(logits, 1)
    indices, offsets = random_bags(weight.shape[0], 5)
    torch.library.opcheck(torch.ops.qembed.mpe_search_forward.default,
                          (*cuda(weight, indices, offsets, row_group, probs, alpha, beta),
                           MPE_BITS, 1, False))
    unique = torch.unique(indices)
    torch.library.opcheck(torch.ops.qembed.mpe_search_backward.default,
                          (*cuda(weight, unique, torch.randn(unique.numel(), 16), row_group,
                                 probs, alpha, beta), MPE_BITS, 100))
    segments, seg_bits, steps, beta, location, _ = mixed_table(30, 16, [0, 2, 5])
    indices, offsets = random_bags(30, 5)
    torch.library.opcheck(torch.ops.qembed.mpe_embedding_bag.default,
                          (cuda(*segments), seg_bits, *cuda(steps, beta, location, indices,
                                                            offsets), None, 0, False,
                           torch.float32))
