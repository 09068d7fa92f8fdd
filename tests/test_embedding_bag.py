"""The fused lookup against the reference and against torch.nn.functional.embedding_bag
on the dequantized table (PyTorch's own semantics), under every CPU kernel variant the
machine runs."""
import pytest
import torch
import torch.nn.functional as F
from conftest import BITS, DIMS, FORMATS, MODES, random_bags, random_psw, random_table

from qembed import ops, reference

INDEX_DTYPES = [torch.int32, torch.int64]
# (mode, with per_sample_weights): not with mean
MODE_PSW = [("sum", False), ("sum", True), ("mean", False), ("none", False), ("none", True)]
MODE_PSW_IDS = ["sum", "sum-psw", "mean", "none", "none-psw"]

pytestmark = pytest.mark.usefixtures("cpu_capability")


def assert_close(actual, expected, dtype=torch.float32):
    """fp32: float reordering only; fp16/bf16: one rounding of the fp32 result (1 ulp)."""
    assert actual.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(actual.float(), expected.to(dtype).float(), rtol=eps, atol=1e-4)


def torch_embedding_bag(weight, indices, offsets, mode, psw, include_last_offset, padding_idx):
    """What PyTorch computes on an fp32 table; "none" is nn.Embedding with the padding row
    reading as zeros (as a freshly initialised nn.Embedding(padding_idx=...))."""
    if mode == "none":
        if padding_idx is not None:
            weight = weight.clone()
            weight[padding_idx] = 0
        out = F.embedding(indices.long(), weight)
        return out if psw is None else out * psw[:, None]
    return F.embedding_bag(indices, weight, offsets, mode=mode, per_sample_weights=psw,
                           include_last_offset=include_last_offset, padding_idx=padding_idx)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_matches_reference(bits, fmt, mode, dim):
    t = random_table(50, dim, bits, fmt)
    indices, offsets = random_bags(50, 20)
    psw = None if mode == "mean" else random_psw(indices.numel())
    out = t.lookup(indices, offsets, per_sample_weights=psw, mode=mode)
    expected = t.lookup(indices, offsets, impl=reference, per_sample_weights=psw, mode=mode)
    assert out.shape == ((indices.numel() if mode == "none" else 20), dim)
    assert_close(out, expected)


@pytest.mark.parametrize("dim", [192, 256, 264])
@pytest.mark.parametrize("bits", BITS)
def test_wide_rows_in_several_column_blocks(bits, dim):
    """Rows wider than one accumulator block (64 columns with AVX2, 128 with AVX-512): later
    blocks re-read the rows; full and partial blocks."""
    t = random_table(40, dim, bits, "affine")
    indices, offsets = random_bags(40, 15)
    psw = random_psw(indices.numel())
    for mode, w in (("sum", psw), ("mean", None)):
        out = t.lookup(indices, offsets, per_sample_weights=w, mode=mode)
        assert_close(out, t.lookup(indices, offsets, impl=reference, per_sample_weights=w,
                                   mode=mode))


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("offset_dtype", INDEX_DTYPES, ids=["off32", "off64"])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=["idx32", "idx64"])
@pytest.mark.parametrize("mode,with_psw", MODE_PSW, ids=MODE_PSW_IDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_options_match_reference_and_torch(bits, fmt, mode, with_psw, index_dtype,
                                           offset_dtype, include_last_offset, padding_idx):
    t = random_table(30, 16, bits, fmt)
    indices, offsets = random_bags(30, 12, index_dtype=index_dtype, offset_dtype=offset_dtype,
                                   include_last_offset=include_last_offset,
                                   padding_idx=padding_idx)
    psw = random_psw(indices.numel()) if with_psw else None
    kwargs = dict(per_sample_weights=psw, mode=mode, include_last_offset=include_last_offset,
                  padding_idx=padding_idx)
    out = t.lookup(indices, offsets, **kwargs)
    assert_close(out, t.lookup(indices, offsets, impl=reference, **kwargs))
    assert_close(out, torch_embedding_bag(t.dequantize(), indices, offsets.to(index_dtype), mode,
                                          psw, include_last_offset, padding_idx))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_low_precision_output(bits, fmt, mode, dtype):
    t = random_table(40, 64, bits, fmt)
    indices, offsets = random_bags(40, 16, padding_idx=5)
    psw = None if mode == "mean" else random_psw(indices.numel())
    kwargs = dict(per_sample_weights=psw, mode=mode, padding_idx=5)
    out = t.lookup(indices, offsets, output_dtype=dtype, **kwargs)
    assert_close(out, t.lookup(indices, offsets, impl=reference, **kwargs), dtype)


@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_empty_bags(mode, include_last_offset):
    t = random_table(20, 24, 5, "affine")
    indices = torch.randint(0, 20, (7,))
    offsets = torch.tensor([0, 0, 3, 3, 3, 6, 7] + [7] * include_last_offset)
    out = t.lookup(indices, offsets, mode=mode, include_last_offset=include_last_offset)
    empty = [0, 2, 3, 6]
    assert out.shape == (7, 24)
    assert torch.equal(out[empty], torch.zeros(len(empty), 24))
    assert_close(out, t.lookup(indices, offsets, impl=reference, mode=mode,
                               include_last_offset=include_last_offset))
    assert_close(out, F.embedding_bag(indices, t.dequantize(), offsets, mode=mode,
                                      include_last_offset=include_last_offset))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=["idx32", "idx64"])
@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_batch(fmt, mode, include_last_offset, index_dtype):
    t = random_table(10, 16, 3, fmt)
    indices = torch.zeros(0, dtype=index_dtype)
    no_bags = torch.zeros(int(include_last_offset), dtype=index_dtype)
    psw = torch.zeros(0) if mode != "mean" else None
    kwargs = dict(mode=mode, include_last_offset=include_last_offset, per_sample_weights=psw)
    assert t.lookup(indices, no_bags, **kwargs).shape == (0, 16)
    if mode != "none":  # bags that are all empty
        three = torch.zeros(3 + int(include_last_offset), dtype=index_dtype)
        assert torch.equal(t.lookup(indices, three, **kwargs), torch.zeros(3, 16))


def test_non_contiguous_inputs():
    t = random_table(30, 32, 3, "symmetric")
    indices, offsets = random_bags(30, 10)
    psw = random_psw(indices.numel())
    wide = torch.randint(0, 256, (30, 2 * t.rows.shape[1]), dtype=torch.uint8)
    wide[:, ::2] = t.rows
    strided_indices = torch.stack([indices, indices], 1).reshape(-1)[::2]
    strided_psw = torch.stack([psw, psw], 1).reshape(-1)[::2]
    args = (wide[:, ::2], strided_indices, offsets[None].expand(2, -1)[1])
    assert not (args[0].is_contiguous() or args[1].is_contiguous() or strided_psw.is_contiguous())
    got = ops.embedding_bag(*args, 3, 32, "symmetric", per_sample_weights=strided_psw)
    assert torch.equal(got, t.lookup(indices, offsets, per_sample_weights=psw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_per_sample_weights(dtype):
    t = random_table(30, 16, 4, "affine")
    indices, offsets = random_bags(30, 10)
    psw = random_psw(indices.numel()).to(dtype)
    assert torch.equal(t.lookup(indices, offsets, per_sample_weights=psw),
                       t.lookup(indices, offsets, per_sample_weights=psw.float()))


def test_trailing_indices_after_last_offset_are_ignored():
    # with include_last_offset, PyTorch ignores indices past offsets[-1]
    t = random_table(20, 16, 6, "symmetric_table")
    indices = torch.randint(0, 20, (9,))
    offsets = torch.tensor([0, 2, 5])
    out = t.lookup(indices, offsets, include_last_offset=True)
    assert out.shape == (2, 16)
    assert_close(out, F.embedding_bag(indices, t.dequantize(), offsets, mode="sum",
                                      include_last_offset=True))
