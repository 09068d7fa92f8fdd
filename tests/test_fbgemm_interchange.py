"""Interchange with FBGEMM's inference tables and TorchRec's QuantEmbeddingBagCollection:
round trips bit-exact where the format allows, the fp16 rounding of scale and bias bounded,
FBGEMM's TBE and TorchRec's collection serving converted tables against qembed's lookups,
and clear errors for what does not convert. Tests that run FBGEMM or TorchRec skip where
they are not installed."""
import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import BITS, FORMATS, random_bags, random_psw, random_table

import qembed
from qembed import fbgemm, formats, ops

HAS_FBGEMM = importlib.util.find_spec("fbgemm_gpu") is not None
HAS_TORCHREC = HAS_FBGEMM and importlib.util.find_spec("torchrec") is not None
needs_fbgemm = pytest.mark.skipif(not HAS_FBGEMM, reason="fbgemm_gpu is not installed")
needs_torchrec = pytest.mark.skipif(not HAS_TORCHREC, reason="torchrec is not installed")


# --- tables -----------------------------------------------------------------------------------


def random_module(num_rows, dim, bits, fmt, mode="sum", fp16_params=False, wide=False):
    """A QuantizedEmbeddingBag with random codes and parameters (conftest.random_table).
    fp16_params: parameters rounded to fp16 values, so that FBGEMM holds them exactly.
    wide: each row's parameters scaled by 10^k, k uniform in [-8, 3], reaching fp16's
    subnormals."""
    table = random_table(num_rows, dim, bits, fmt)
    rows, po = table.rows.clone(), formats.param_offset(dim, bits)
    rows[:, formats.code_bytes(dim, bits):po] = 0  # qembed writes zeros between codes and params
    params = rows[:, po:].contiguous().view(torch.float32)
    step = table.step
    if wide:
        params = params * 10.0 ** (torch.rand(num_rows, 1) * 11 - 8)
        step = None if step is None else step * 10.0 ** (torch.rand(1) * 11 - 8)
    if fp16_params:
        params = params.half().float()
        step = None if step is None else step.half().float()
    rows[:, po:] = params.contiguous().view(torch.uint8)
    module = qembed.QuantizedEmbeddingBag(num_rows, dim, bits=bits, format=fmt, mode=mode)
    with torch.no_grad():
        module.qweight.copy_(rows)
        if step is not None:
            module.step.copy_(step)
    return module


def trained_lowp_table(bits, step_per, num_rows=60, dim=16, steps=3):
    """A LowPrecisionEmbeddingBag after a few optimizer steps on random bags."""
    table = qembed.LowPrecisionEmbeddingBag(num_rows, dim, mode="sum", bits=bits,
                                            step_per=step_per, optimizer="adagrad", lr=0.05,
                                            init_std=0.1, seed=int(torch.randint(0, 1000, ())))
    for _ in range(steps):
        indices, offsets = random_bags(num_rows, 16)
        out = table(indices, offsets)
        (out * torch.randn_like(out)).sum().backward()
    return table


def fp16_error(x):
    """The most that rounding to fp16 moves x (in fp16's range)."""
    return torch.maximum(x.abs() * 2.0 ** -11, torch.full_like(x, 2.0 ** -25))


def value_error_bound(table):
    """[R, D] bound on how far each value of a qembed table moves in FBGEMM's rows (the
    module docstring's), plus the fp32 rounding of computing each value twice."""
    scale, bias, offset = qembed.reference.row_params(table.qweight, table.bits,
                                                      table.embedding_dim, table.format, table.step)
    u = ops.unpack(table.qweight, table.bits, table.embedding_dim).float()
    if table.format == "affine":
        bound = u * fp16_error(scale)[:, None] + fp16_error(bias)[:, None]
    else:
        bound = (u + offset).abs() * fp16_error(scale)[:, None]
    magnitude = (u + offset) * scale[:, None].abs() + bias[:, None].abs()
    return bound + 2.0 ** -21 * magnitude.abs()


def fp16_rounded(table):
    """The table FBGEMM holds for `table`: its parameters rounded to fp16 as the docstring
    says, built here independently of qembed.fbgemm."""
    rows, po = table.qweight.clone(), formats.param_offset(table.embedding_dim, table.bits)
    step = table.step
    if table.format == "affine":
        rows[:, po:] = rows[:, po:].contiguous().view(torch.float32).half().float().view(torch.uint8)
    elif table.format == "symmetric":
        rows[:, po:po + 4] = rows[:, po:po + 4].contiguous().view(torch.float32).half().float() \
            .view(torch.uint8)
    else:
        step = step.half().float()
    return rows, step


def assert_same_table(a, b):
    assert (a.bits, a.embedding_dim, a.format) == (b.bits, b.embedding_dim, b.format)
    assert torch.equal(a.qweight, b.qweight)
    assert (a.step is None) == (b.step is None)
    if a.step is not None:
        assert torch.equal(a.step, b.step)


# --- one table, no FBGEMM needed ------------------------------------------------------------


def test_storage_bits():
    assert [fbgemm.storage_bits(b) for b in BITS] == [2, 2, 4, 4, 8, 8, 8, 8]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_bit_exact(bits, fmt):
    """qembed -> FBGEMM -> qembed at the table's own bits and format: identical rows where
    the parameters are fp16 values; codes widened to the storage width and narrowed back."""
    for dim in (8, 24, 64):
        table = random_module(37, dim, bits, fmt, fp16_params=True)
        codes, scale_bias = fbgemm.to_fbgemm(table)
        stored = fbgemm.storage_bits(bits)
        assert codes.shape == (37, dim * stored // 8) and scale_bias.shape == (37, 4)
        assert torch.equal(ops.unpack(codes, stored, dim), ops.unpack(table.qweight, bits, dim))
        back = fbgemm.from_fbgemm(codes, scale_bias, stored, bits=bits, format=fmt)
        assert_same_table(back, table)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_fp16_rounding_is_the_only_loss(bits, fmt):
    """Parameters over 11 decades (down to fp16's subnormals): every value moves by at most
    the docstring's bound, and the converted table is exactly the table with fp16-rounded
    parameters."""
    table = random_module(64, 16, bits, fmt, wide=True)
    back = fbgemm.from_fbgemm(*fbgemm.to_fbgemm(table), fbgemm.storage_bits(bits), bits=bits)
    moved = (back.dequantize() - table.dequantize()).abs()
    bound = value_error_bound(table)
    assert (moved <= bound).all(), float((moved - bound).max())
    rows, step = fp16_rounded(table)
    expect = ops.dequantize(rows, bits, 16, fmt, step)
    torch.testing.assert_close(back.dequantize(), expect, rtol=2.0 ** -21, atol=0)


@pytest.mark.parametrize("step_per", ["row", "table"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_low_precision_table_round_trip(bits, step_per):
    """A trained LowPrecisionEmbeddingBag goes to FBGEMM's rows and back into a
    LowPrecisionEmbeddingBag with the same codes and fp16-rounded steps."""
    table = trained_lowp_table(bits, step_per)
    fmt = table.format
    codes, scale_bias = fbgemm.to_fbgemm(table)
    back = fbgemm.from_fbgemm(codes, scale_bias, fbgemm.storage_bits(bits), bits=bits,
                              format=fmt, cls=qembed.LowPrecisionEmbeddingBag, mode="sum")
    assert isinstance(back, qembed.LowPrecisionEmbeddingBag) and back.step_per == step_per
    rows, step = fp16_rounded(table)
    assert torch.equal(back.qweight, rows)
    if step is not None:
        assert torch.equal(back.step, step)
    assert not back.state.any() and int(back.num_updates) == 0
    moved = (back.dequantize() - table.dequantize()).abs()
    assert (moved <= value_error_bound(table)).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fbgemm_rows_round_trip_bit_exact(bits):
    """FBGEMM -> qembed -> FBGEMM: identical bytes, for random codes and random fp16 scales
    and biases (negative, zero, subnormal), read at every width that holds the codes."""
    dim, num_rows = 32, 50
    params = (torch.randn(num_rows, 2) * 10.0 ** (torch.rand(num_rows, 2) * 12 - 8)).half()
    params[:3] = torch.tensor([[0.0, -1.5], [6e-8, 0.0], [-2.0, 65504.0]]).half()
    for narrow in range(1, bits + 1):
        if fbgemm.storage_bits(narrow) != bits:
            continue
        codes = ops.pack(torch.randint(0, 1 << narrow, (num_rows, dim), dtype=torch.uint8), bits)
        rows = torch.zeros(num_rows, 16 * -(-(4 + codes.shape[1]) // 16), dtype=torch.uint8)
        rows[:, :4] = params.view(torch.uint8)
        rows[:, 4:4 + codes.shape[1]] = codes
        table = fbgemm.from_fbgemm_rows(rows, bits, dim, bits=narrow)
        assert table.bits == narrow and table.format == "affine"
        assert torch.equal(fbgemm.to_fbgemm_rows(table, row_alignment=16), rows)
        values = ops.unpack(codes, bits, dim).float() * params[:, :1].float() + params[:, 1:].float()
        torch.testing.assert_close(table.dequantize(), values, rtol=0, atol=0)


def test_symmetric_rows_read_back_as_symmetric():
    """Rows whose bias is scale * Qn read as 'symmetric' (any scales) and as
    'symmetric_table' (one scale); the steps are the scales."""
    for bits in (3, 4):
        q = torch.randint(0, 1 << bits, (20, 16), dtype=torch.uint8)
        scale = (torch.rand(20) + 0.1).half().float()
        for fmt, s in (("symmetric", scale), ("symmetric_table", scale[:1].expand(20))):
            scale_bias = torch.stack([s, s * formats.qmin(bits)], 1).half().view(torch.uint8)
            table = fbgemm.from_fbgemm(ops.pack(q, 4), scale_bias, 4, bits=bits, format=fmt)
            assert table.format == fmt
            expect = (q.float() + formats.qmin(bits)) * s[:, None]
            torch.testing.assert_close(table.dequantize(), expect, rtol=0, atol=0)


# --- errors -------------------------------------------------------------------------------


def test_what_cannot_convert_is_refused():
    padded = qembed.QuantizedEmbeddingBag(10, 8, bits=4, padding_idx=0)
    with pytest.raises(ValueError, match="padding_idx"):
        fbgemm.to_fbgemm(padded)
    with pytest.raises(TypeError, match="EmbeddingBag"):
        fbgemm.to_fbgemm(torch.nn.EmbeddingBag(10, 8))
    with pytest.raises(TypeError, match="MixedPrecision"):
        fbgemm.to_fbgemm(qembed.MixedPrecisionEmbeddingBag(10, 8, bits=[4]))
    huge = qembed.QuantizedEmbeddingBag(10, 8, bits=8, _weight=torch.randn(10, 8) * 1e6)
    with pytest.raises(ValueError, match="beyond fp16's range"):
        fbgemm.to_fbgemm(huge)

    table = random_module(10, 16, 4, "affine")
    codes, scale_bias = fbgemm.to_fbgemm(table)
    with pytest.raises(ValueError, match="not a symmetric 4-bit row"):
        fbgemm.from_fbgemm(codes, scale_bias, 4, format="symmetric")
    with pytest.raises(ValueError, match="8, 4 or 2 bits"):
        fbgemm.from_fbgemm(codes, scale_bias, 3)
    with pytest.raises(ValueError, match="bits must be in 1..4"):
        fbgemm.from_fbgemm(codes, scale_bias, 4, bits=5)
    with pytest.raises(ValueError, match="low-precision tables hold symmetric codes"):
        fbgemm.from_fbgemm(codes, scale_bias, 4, cls=qembed.LowPrecisionEmbeddingBag)
    with pytest.raises(ValueError, match=r"scale_bias must be \[10, 4\]"):
        fbgemm.from_fbgemm(codes, scale_bias[:, :2], 4)
    wide_codes = ops.pack(torch.full((10, 16), 9, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="row 0 has a code that does not fit in 3 bits"):
        fbgemm.from_fbgemm(wide_codes, scale_bias, 4, bits=3)

    symmetric = random_module(10, 16, 4, "symmetric")
    codes, scale_bias = fbgemm.to_fbgemm(symmetric)
    with pytest.raises(ValueError, match="one step per table"):
        fbgemm.from_fbgemm(codes, scale_bias, 4, format="symmetric_table")
    with pytest.raises(ValueError, match="too narrow"):
        fbgemm.from_fbgemm_rows(torch.zeros(4, 7, dtype=torch.uint8), 4, 8)


# --- FBGEMM's own kernels (fbgemm_gpu installed) ---------------------------------------------


@needs_fbgemm
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rows_of_fbgemm_quantizer(bits):
    """FBGEMM's own row-wise quantizer (codes, then fp16 scale and bias) read by qembed gives
    FBGEMM's dequantized values, and converts back to the same bytes."""
    import fbgemm_gpu  # noqa: F401

    weight = torch.randn(40, 32) * torch.rand(40, 1) * 3
    rows = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(weight, bits)
    cb = 32 * bits // 8
    table = fbgemm.from_fbgemm(rows[:, :cb], rows[:, cb:], bits)
    expect = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(rows, bits)
    torch.testing.assert_close(table.dequantize(), expect, rtol=1e-6, atol=1e-6)
    codes, scale_bias = fbgemm.to_fbgemm(table)
    assert torch.equal(codes, rows[:, :cb]) and torch.equal(scale_bias, rows[:, cb:])


def mixed_tables(mode="sum"):
    """Tables of every width and format, some dimensions shared, some not."""
    specs = [(1, "affine", 16), (2, "symmetric", 8), (3, "symmetric_table", 24),
             (4, "affine", 64), (5, "symmetric", 16), (6, "affine", 8),
             (7, "symmetric_table", 32), (8, "symmetric", 16), (8, "affine", 40)]
    return [random_module(int(torch.randint(5, 60, ())), dim, bits, fmt, mode=mode)
            for bits, fmt, dim in specs]


def feature_batches(tables, feature_table_map, num_bags, index_dtype, weighted):
    """Per feature: (indices, offsets, per-sample weights or None) of its table."""
    out = []
    for t in feature_table_map:
        indices, offsets = random_bags(tables[t].num_embeddings, num_bags, max_len=4,
                                       index_dtype=index_dtype)
        out.append((indices, offsets, random_psw(indices.numel()) if weighted else None))
    return out


def tbe_inputs(batches):
    """The TBE's flat indices, offsets [F * B + 1] and weights."""
    indices = torch.cat([i for i, _, _ in batches])
    starts, offsets = 0, []
    for i, o, _ in batches:
        offsets.append(o + starts)
        starts += i.numel()
    offsets = torch.cat(offsets + [offsets[0].new_tensor([starts])])
    weights = None if batches[0][2] is None else torch.cat([w for _, _, w in batches])
    return indices, offsets, weights


def qembed_lookup(tables, feature_table_map, batches):
    return torch.cat([tables[t](i, o, w) for t, (i, o, w) in zip(feature_table_map, batches)], 1)


def pooled_bound(table, indices, offsets, weights, mode):
    """Bound on a pooled output's move: the value bounds pooled with |weights|, plus fp32
    summation slack."""
    bound = value_error_bound(table)
    magnitude = table.dequantize().abs()
    w = None if weights is None else weights.abs()
    pooled = [F.embedding_bag(indices.long(), x, offsets.long(), mode=mode, per_sample_weights=w)
              for x in (bound, magnitude)]
    return pooled[0] + 1e-5 * pooled[1]


@needs_fbgemm
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_tbe_serves_qembed_tables(mode, weighted, index_dtype):
    """FBGEMM's TBE filled from qembed tables of widths 1..8 and every format, one table read
    by two features: its output equals qembed's lookup on the tables read back from it, and
    qembed's lookup on the original tables up to the bounded fp16 rounding."""
    tables = mixed_tables(mode)
    feature_table_map = list(range(len(tables))) + [3]
    tbe = fbgemm.to_tbe(tables, feature_table_map=feature_table_map)
    batches = feature_batches(tables, feature_table_map, 13, index_dtype, weighted)
    out = tbe(*tbe_inputs(batches))
    served = fbgemm.from_tbe(tbe, bits=[t.bits for t in tables],
                             format=[t.format for t in tables])
    for a, b in zip(served, tables):
        rows, step = fp16_rounded(b)
        assert torch.equal(a.qweight[:, :formats.code_bytes(b.embedding_dim, b.bits)],
                           rows[:, :formats.code_bytes(b.embedding_dim, b.bits)])
        torch.testing.assert_close(a.dequantize(), ops.dequantize(
            rows, b.bits, b.embedding_dim, b.format, step), rtol=2.0 ** -21, atol=0)
    torch.testing.assert_close(out, qembed_lookup(served, feature_table_map, batches),
                               rtol=1e-5, atol=1e-5)
    original = qembed_lookup(tables, feature_table_map, batches)
    bounds = torch.cat([pooled_bound(tables[t], i, o, w, mode)
                        for t, (i, o, w) in zip(feature_table_map, batches)], 1)
    assert ((out - original).abs() <= bounds).all()


@needs_fbgemm
@pytest.mark.parametrize("output_dtype", [torch.float16, torch.bfloat16])
def test_tbe_output_dtypes(output_dtype):
    tables = mixed_tables()[:4]
    tbe = fbgemm.to_tbe(tables, output_dtype=output_dtype)
    batches = feature_batches(tables, range(len(tables)), 9, torch.int64, False)
    out = tbe(*tbe_inputs(batches))
    assert out.dtype == output_dtype
    served = fbgemm.from_tbe(tbe)
    torch.testing.assert_close(out.float(), qembed_lookup(served, range(4), batches),
                               rtol=1e-2, atol=1e-2)


@needs_fbgemm
def test_tbe_rows_are_fbgemm_rows():
    """The bytes a TBE with 16-byte rows holds are to_fbgemm_rows'; read back, they give the
    TBE's tables; a TBE of FBGEMM's random rows goes to qembed and into another TBE
    unchanged."""
    tables = mixed_tables()
    tbe = fbgemm.to_tbe(tables, row_alignment=16)
    stored = tbe.split_embedding_weights(split_scale_shifts=False)
    for table, (rows, _) in zip(tables, stored):
        assert rows.shape[1] % 16 == 0
        assert torch.equal(rows, fbgemm.to_fbgemm_rows(table, row_alignment=16))
        back = fbgemm.from_fbgemm_rows(rows, fbgemm.storage_bits(table.bits),
                                       table.embedding_dim, bits=table.bits, format=table.format)
        assert torch.equal(back.qweight, fp16_rounded(table)[0])

    tbe.fill_random_weights()
    copy = fbgemm.to_tbe(fbgemm.from_tbe(tbe), row_alignment=4)
    for (a, sa), (b, sb) in zip(tbe.split_embedding_weights(), copy.split_embedding_weights()):
        assert torch.equal(a, b) and torch.equal(sa, sb)


@needs_fbgemm
def test_tbe_errors():
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    sums = random_module(10, 16, 4, "affine", mode="sum")
    means = random_module(10, 16, 4, "affine", mode="mean")
    with pytest.raises(ValueError, match="pool differently"):
        fbgemm.to_tbe([sums, means])
    with pytest.raises(ValueError, match="at least one table"):
        fbgemm.to_tbe([])
    tbe = fbgemm.to_tbe([sums, means], pooling="sum", names=["a", "b"])
    with pytest.raises(ValueError, match="TBE table 'b' is 10 x 16 INT4; the qembed table is "
                                         "10 x 16 at 8 bits, stored as INT8"):
        fbgemm.fill_tbe(tbe, [sums, random_module(10, 16, 8, "affine")])
    with pytest.raises(ValueError, match="1 tables for a TBE of 2"):
        fbgemm.fill_tbe(tbe, [sums])
    with pytest.raises(ValueError, match="TBE table 'a': .*not a symmetric"):
        fbgemm.from_tbe(tbe, format="symmetric")
    halves = IntNBitTableBatchedEmbeddingBagsCodegen(
        [("h", 10, 16, SparseType.FP16, EmbeddingLocation.HOST)], device="cpu")
    halves.initialize_weights()
    with pytest.raises(ValueError, match="'h' is FP16"):
        fbgemm.from_tbe(halves)


# --- TorchRec (torchrec installed) ------------------------------------------------------------


def _interchange():
    from qembed.torchrec import interchange

    return interchange


def kjt_batch(configs, num_bags, weighted):
    """A KeyedJaggedTensor over the configs' features (some bags empty) and, per feature,
    (indices, offsets, weights) for qembed."""
    from torchrec import KeyedJaggedTensor

    keys, lengths, values, weights, per_feature = [], [], [], [], {}
    for c in configs:
        for name in c.feature_names:
            length = torch.randint(0, 4, (num_bags,))
            indices = torch.randint(0, c.num_embeddings, (int(length.sum()),))
            w = random_psw(indices.numel()) if weighted else None
            keys.append(name)
            lengths.append(length)
            values.append(indices)
            weights.append(w)
            per_feature[name] = (c.name, indices, torch.cumsum(length, 0) - length, w)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys, torch.cat(values), torch.cat(lengths),
        weights=torch.cat(weights) if weighted else None)
    return kjt, per_feature


def torchrec_configs():
    from torchrec import EmbeddingBagConfig, PoolingType

    specs = [("user", 40, 16, ["user_id", "friend_id"], PoolingType.SUM),
             ("item", 70, 24, ["item_id"], PoolingType.MEAN),
             ("city", 9, 8, ["city"], PoolingType.SUM),
             ("tag", 25, 64, ["tag"], PoolingType.MEAN)]
    return [EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f,
                               pooling=p) for n, r, d, f, p in specs]


def check_served(qebc, tables, kjt, per_feature):
    """The collection's output, key by key, against qembed's lookups on `tables`, up to the
    bounded fp16 rounding; returns the output."""
    served = qebc(kjt)
    out = served.to_dict()
    assert sorted(out) == sorted(per_feature)
    for key, (name, indices, offsets, weights) in per_feature.items():
        table = tables[name]
        with torch.no_grad():
            expect = table(indices, offsets, weights)
        bound = pooled_bound(table, indices, offsets, weights, table.mode)
        assert ((out[key] - expect).abs() <= bound).all(), key
    return served


@needs_torchrec
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_quant_ebc_serves_qembed_tables(weighted):
    """TorchRec's QuantEmbeddingBagCollection built from qembed tables (3, 4, 6 and 8 bits,
    every format, a table read by two features, sum and mean pooling) gives qembed's lookups
    up to the bounded fp16 rounding, and reads back as the fp16-rounded tables."""
    configs = torchrec_configs()
    if weighted:  # TorchRec's weighted tables pool by sum, as qembed's
        configs = [dataclasses.replace(c, pooling=configs[0].pooling) for c in configs]
    kinds = {"user": (3, "symmetric"), "item": (4, "affine"), "city": (6, "symmetric_table"),
             "tag": (8, "affine")}
    tables = {c.name: random_module(c.num_embeddings, c.embedding_dim, *kinds[c.name],
                                    mode=c.pooling.name.lower()) for c in configs}
    qebc = _interchange().to_quant_ebc(configs, tables, is_weighted=weighted)
    assert [c.data_type.name for c in qebc.embedding_bag_configs()] == ["INT4", "INT4", "INT8", "INT8"]
    assert all(c.data_type.name == "FP32" for c in configs)  # the caller's configs unchanged
    kjt, per_feature = kjt_batch(configs, 11, weighted)
    check_served(qebc, tables, kjt, per_feature)
    back = _interchange().from_quant_ebc(qebc, bits={n: b for n, (b, _) in kinds.items()},
                                         format={n: f for n, (_, f) in kinds.items()})
    assert list(back) == [c.name for c in configs]
    for name, table in back.items():
        assert table.mode == tables[name].mode
        rows, step = fp16_rounded(tables[name])
        assert torch.equal(table.qweight, rows)
        assert step is None or torch.equal(table.step, step)


@needs_torchrec
def test_low_precision_tables_served_by_torchrec():
    """Tables trained in low precision by qembed (per-row and per-table steps) are served by
    TorchRec's QuantEmbeddingBagCollection as they look up in qembed, up to the bounded fp16
    rounding of their steps, and read back as low-precision tables."""
    from torchrec import EmbeddingBagConfig

    tables = {"clicks": trained_lowp_table(4, "row", num_rows=50, dim=16),
              "ads": trained_lowp_table(2, "table", num_rows=30, dim=8)}
    configs = [EmbeddingBagConfig(name=n, num_embeddings=t.num_embeddings,
                                  embedding_dim=t.embedding_dim, feature_names=[n + "_id"])
               for n, t in tables.items()]
    qebc = _interchange().to_quant_ebc(configs, tables)
    kjt, per_feature = kjt_batch(configs, 17, False)
    check_served(qebc, tables, kjt, per_feature)
    back = _interchange().from_quant_ebc(
        qebc, bits={n: t.bits for n, t in tables.items()},
        format={n: t.format for n, t in tables.items()}, cls=qembed.LowPrecisionEmbeddingBag)
    for name, table in back.items():
        assert isinstance(table, qembed.LowPrecisionEmbeddingBag)
        rows, step = fp16_rounded(tables[name])
        assert torch.equal(table.qweight, rows)
        assert step is None or torch.equal(table.step, step)


@needs_torchrec
def test_torchrec_errors():
    from torchrec import DataType, EmbeddingBagConfig, PoolingType
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    interchange = _interchange()
    config = EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=16, feature_names=["f"])
    table = random_module(10, 16, 4, "affine", mode="sum")
    with pytest.raises(ValueError, match="'t' is configured 10 x 16; its qembed table is 10 x 8"):
        interchange.to_quant_ebc([config], [random_module(10, 8, 4, "affine")])
    with pytest.raises(ValueError, match="'t' pools by MEAN; its qembed table's mode is 'sum'"):
        interchange.to_quant_ebc([dataclasses.replace(config, pooling=PoolingType.MEAN)], [table])
    with pytest.raises(ValueError, match=r"missing for \['t'\]"):
        interchange.to_quant_ebc([config], {"u": table})
    with pytest.raises(ValueError, match="table 't': .*padding_idx"):
        interchange.to_quant_ebc([config], [qembed.QuantizedEmbeddingBag(10, 16, mode="sum",
                                                                         padding_idx=3)])
    halves = QuantEBC([dataclasses.replace(config, data_type=DataType.FP16)], is_weighted=False,
                      device=torch.device("cpu"))
    with pytest.raises(ValueError, match="'t' is FP16"):
        interchange.from_quant_ebc(halves)
    with pytest.raises(TypeError, match="QuantEmbeddingBagCollection"):
        interchange.from_quant_ebc(torch.nn.Linear(2, 2))
