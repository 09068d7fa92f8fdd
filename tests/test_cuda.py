"""The CUDA kernels against the reference and the CPU kernels, on fresh random data. Needs a
CUDA device and an extension built with its CUDA kernels (QEMBED_CUDA=1); skipped otherwise."""
import pytest
import torch
from conftest import BITS, FORMATS, MODES, random_bags, random_psw, random_steps, random_table

from qembed import QuantizedEmbeddingBag, formats, ops, reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DIMS = [8, 64, 128, 136]
OPS = ["pack", "unpack", "quantize", "dequantize", "embedding_bag"]
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


def lookup_both(t, indices, offsets, **kwargs):
    """(CUDA result, reference result on CPU) of the same lookup."""
    psw = kwargs.pop("per_sample_weights", None)
    got = ops.embedding_bag(*cuda(t.rows, indices, offsets), t.bits, t.dim, t.fmt,
                            *cuda(t.step), per_sample_weights=cuda(psw)[0], **kwargs)
    kwargs.pop("output_dtype", None)
    return got, t.lookup(indices, offsets, impl=reference, per_sample_weights=psw, **kwargs)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_embedding_bag_matches_reference(bits, fmt, mode, dim, out_dtype):
    t = random_table(300, dim, bits, fmt)
    indices, offsets = random_bags(300, 50, max_len=70)  # bags longer than a warp
    psw = None if mode == "mean" else random_psw(indices.numel())
    got, expected = lookup_both(t, indices, offsets, per_sample_weights=psw, mode=mode,
                                output_dtype=out_dtype)
    assert_close(got, expected, out_dtype)
    if mode == "none" and out_dtype == torch.float32:  # no pooling: the CPU's exact values
        assert torch.equal(got.cpu(), t.lookup(indices, offsets, per_sample_weights=psw,
                                               mode=mode))


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
    got = ops.embedding_bag(view, *cuda(indices, offsets), 6, 16, "affine")
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
