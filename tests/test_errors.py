"""Bad input raises a Python exception of the right type that names the problem, through the
ops and the modules, and leaves the table as it was."""
import pytest
import torch
from conftest import random_table
from torch import nn

import qembed
from qembed import QuantizedEmbedding, QuantizedEmbeddingBag, ops


def params(cases):
    """pytest params from (id, *values) tuples."""
    return [pytest.param(*values, id=case_id) for case_id, *values in cases]

# (id, change to a valid lookup's arguments, exception, message). The valid lookup: a
# 10-row 4-bit symmetric_table table of dim 16, indices [0, 9, 3, 3], offsets [0, 1, 4].
LOOKUP_ERRORS = [
    ("index-too-large", lambda a: dict(indices=torch.tensor([0, 10, 3, 3])), IndexError,
     r"index 10 at position 1 is out of range for a table of 10 rows"),
    ("index-negative", lambda a: dict(indices=torch.tensor([0, 9, -1, 3])), IndexError,
     r"index -1 at position 2 is out of range"),
    ("index32-too-large", lambda a: dict(indices=torch.tensor([0, 9, 3, 12], dtype=torch.int32)),
     IndexError, r"index 12 at position 3 is out of range"),
    ("offsets-not-from-0", lambda a: dict(offsets=torch.tensor([1, 1, 4])), ValueError,
     r"offsets\[0\] must be 0, got 1"),
    ("offsets-decreasing", lambda a: dict(offsets=torch.tensor([0, 3, 2])), ValueError,
     r"offsets must be non-decreasing, but offsets\[2\] = 2 < offsets\[1\] = 3"),
    ("offsets-past-end", lambda a: dict(offsets=torch.tensor([0, 1, 5])), ValueError,
     r"offsets\[2\] = 5 is past the end of indices \(4\)"),
    ("last-offset-missing", lambda a: dict(offsets=torch.zeros(0, dtype=torch.long),
                                           include_last_offset=True), ValueError,
     r"include_last_offset, offsets needs at least one element"),
    ("no-offsets", lambda a: dict(offsets=None), ValueError, r"offsets is required"),
    ("psw-too-short", lambda a: dict(per_sample_weights=torch.ones(3)), ValueError,
     r"per_sample_weights must have the shape of indices \(4,\), got \[3\]"),
    ("psw-2d", lambda a: dict(per_sample_weights=torch.ones(4, 1)), ValueError,
     r"per_sample_weights must have the shape of indices"),
    ("psw-with-mean", lambda a: dict(per_sample_weights=torch.ones(4), mode="mean"), ValueError,
     r"per_sample_weights are only supported with mode 'sum' or 'none'"),
    ("psw-integer", lambda a: dict(per_sample_weights=torch.ones(4, dtype=torch.long)),
     TypeError, r"per_sample_weights must be floating point"),
    ("bits-0", lambda a: dict(bits=0), ValueError, r"bits must be in 1..8, got 0"),
    ("bits-9", lambda a: dict(bits=9), ValueError, r"bits must be in 1..8, got 9"),
    ("dim-0", lambda a: dict(dim=0), ValueError, r"embedding dim must be positive, got 0"),
    ("float-indices", lambda a: dict(indices=torch.tensor([0.0, 9.0, 3.0, 3.0])), TypeError,
     r"indices must be int32 or int64, got Float"),
    ("float-offsets", lambda a: dict(offsets=torch.tensor([0.0, 1.0, 4.0])), TypeError,
     r"offsets must be int32 or int64, got Float"),
    ("indices-2d", lambda a: dict(indices=torch.tensor([[0, 9], [3, 3]])), ValueError,
     r"indices must be 1-D, got 2-D"),
    ("rows-not-uint8", lambda a: dict(rows=a["rows"].to(torch.int8)), TypeError,
     r"packed rows must be uint8, got Char"),
    ("rows-float", lambda a: dict(rows=a["rows"].float()), TypeError,
     r"packed rows must be uint8, got Float"),
    ("rows-too-narrow", lambda a: dict(rows=a["rows"][:, :-1]), ValueError,
     r"packed rows have 7 bytes but dim=16, bits=4, format=1 needs 8"),
    ("rows-of-other-format", lambda a: dict(fmt="affine"), ValueError,
     r"packed rows have 8 bytes but dim=16, bits=4, format=2 needs 16"),
    ("rows-1d", lambda a: dict(rows=a["rows"].reshape(-1)), ValueError,
     r"packed rows must be 2-D, got 1-D"),
    ("unknown-format", lambda a: dict(fmt="int4"), ValueError, r"unknown format 'int4'"),
    ("unknown-mode", lambda a: dict(mode="max"), ValueError, r"unsupported mode 'max'"),
    ("output-float64", lambda a: dict(output_dtype=torch.float64), TypeError,
     r"output dtype must be float32, float16 or bfloat16, got Double"),
    ("no-step", lambda a: dict(step=None), ValueError, r"per-table step\) needs a step tensor"),
    ("step-float64", lambda a: dict(step=a["step"].double()), TypeError,
     r"step must be float32, got Double"),
    ("indices-on-meta", lambda a: dict(indices=a["indices"].to("meta")), ValueError,
     r"indices is on meta but the table is on cpu"),
    ("offsets-on-meta", lambda a: dict(offsets=a["offsets"].to("meta")), ValueError,
     r"offsets is on meta but the table is on cpu"),
    ("psw-on-meta", lambda a: dict(per_sample_weights=torch.ones(4, device="meta")), ValueError,
     r"per_sample_weights is on meta but the table is on cpu"),
    ("step-on-meta", lambda a: dict(step=a["step"].to("meta")), ValueError,
     r"step is on meta but rows is on cpu"),
    ("rows-on-meta", lambda a: dict(rows=a["rows"].to("meta")), ValueError,
     r"step is on cpu but rows is on meta"),
    ("affine-rows-on-meta", lambda a: dict(rows=torch.zeros(10, 16, dtype=torch.uint8,
                                                            device="meta"),
                                           fmt="affine", step=None), ValueError,
     r"indices is on cpu but the table is on meta"),
]


def valid_lookup():
    t = random_table(10, 16, 4, "symmetric_table")
    return dict(rows=t.rows, indices=torch.tensor([0, 9, 3, 3]), offsets=torch.tensor([0, 1, 4]),
                bits=4, dim=16, fmt="symmetric_table", step=t.step)


@pytest.mark.parametrize("change,exc,match", params(LOOKUP_ERRORS))
def test_lookup_errors(change, exc, match):
    args = valid_lookup()
    table, step = args["rows"], args["step"]
    saved = table.clone(), step.clone()
    assert ops.embedding_bag(**args).shape == (3, 16)  # the unchanged lookup is fine
    args.update(change(args))
    with pytest.raises(exc, match=match):
        ops.embedding_bag(**args)
    assert torch.equal(table, saved[0]) and torch.equal(step, saved[1])


# the reference (the fallback without a build) rejects the same inputs the same way
SHARED = {"index-too-large", "index-negative", "offsets-not-from-0", "offsets-decreasing",
          "offsets-past-end", "last-offset-missing", "no-offsets", "psw-with-mean", "bits-0",
          "bits-9", "dim-0", "rows-too-narrow", "unknown-format", "unknown-mode"}


@pytest.mark.parametrize("change,exc", params(c[:3] for c in LOOKUP_ERRORS if c[0] in SHARED))
def test_reference_lookup_errors(change, exc):
    args = valid_lookup()
    args.update(change(args))
    with pytest.raises(exc):
        with ops.use_reference():
            ops.embedding_bag(**args)


# (id, call, exception, message) for the other ops
OP_ERRORS = [
    ("pack-code-too-large", lambda: ops.pack(torch.full((2, 8), 16, dtype=torch.uint8), 4),
     ValueError, r"code 16 does not fit in 4 bits"),
    ("pack-not-uint8", lambda: ops.pack(torch.zeros(2, 8, dtype=torch.int32), 4), TypeError,
     r"codes must be uint8, got Int"),
    ("pack-bits-9", lambda: ops.pack(torch.zeros(2, 8, dtype=torch.uint8), 9), ValueError,
     r"bits must be in 1..8, got 9"),
    ("pack-dim-0", lambda: ops.pack(torch.zeros(2, 0, dtype=torch.uint8), 4), ValueError,
     r"embedding dim must be positive, got 0"),
    ("unpack-too-narrow", lambda: ops.unpack(torch.zeros(2, 7, dtype=torch.uint8), 4, 16),
     ValueError, r"rows of 7 bytes cannot hold 16 codes of 4 bits"),
    ("unpack-bits-0", lambda: ops.unpack(torch.zeros(2, 8, dtype=torch.uint8), 0, 16),
     ValueError, r"bits must be in 1..8, got 0"),
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


@pytest.mark.parametrize("call,exc,match", params(OP_ERRORS))
def test_op_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- modules ------------------------------------------------------------------------------

def bag(**kwargs):
    return QuantizedEmbeddingBag(10, 16, **{"mode": "sum", "bits": 4, **kwargs})


CONSTRUCTOR_ERRORS = [
    ("bits-0", lambda: bag(bits=0), ValueError, r"bits must be an integer in 1..8, got 0"),
    ("bits-9", lambda: bag(bits=9), ValueError, r"bits must be an integer in 1..8, got 9"),
    ("dim-0", lambda: QuantizedEmbeddingBag(10, 0), ValueError, r"dim must be positive, got 0"),
    ("dim-0-embedding", lambda: QuantizedEmbedding(10, 0), ValueError, r"dim must be positive, got 0"),
    ("format", lambda: bag(format="nf4"), ValueError, r"unknown format 'nf4'"),
    ("mode-max", lambda: bag(mode="max"), ValueError, r"mode 'sum' or 'mean', got 'max'"),
    ("padding-idx-10", lambda: bag(padding_idx=10), ValueError, r"padding_idx 10 is out of range"),
    ("padding-idx--11", lambda: QuantizedEmbedding(10, 16, padding_idx=-11), ValueError,
     r"padding_idx -11 is out of range"),
    ("max-norm", lambda: bag(max_norm=1.0), ValueError, r"max_norm is not supported"),
    ("dtype-float64", lambda: bag(dtype=torch.float64), TypeError,
     r"output dtype must be float32, float16 or bfloat16"),
    ("weight-shape", lambda: bag(_weight=torch.zeros(10, 8)), ValueError,
     r"weight of shape \(10, 8\) does not match \(10, 16\)"),
    ("from-torch-ao-3-bits", lambda: QuantizedEmbeddingBag.from_torch_ao(
        torch.zeros(4, 20, dtype=torch.uint8), 3), ValueError,
     r"torch.ao rows exist at 8, 4 or 2 bits"),
    ("to-torch-ao-symmetric", lambda: bag(format="symmetric").to_torch_ao(), ValueError,
     r"affine format at 8, 4 or 2 bits"),
    ("quantize-lone-module", lambda: qembed.quantize_(nn.EmbeddingBag(10, 16)), ValueError,
     r"pass the model containing the embedding"),
]


@pytest.mark.parametrize("call,exc,match", params(CONSTRUCTOR_ERRORS))
def test_module_construction_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def as_mean(module):
    module.mode = "mean"
    return module


FORWARD_ERRORS = [
    ("index-too-large", lambda m: m(torch.tensor([1, 10]), torch.tensor([0])), IndexError,
     r"index 10 at position 1 is out of range for a table of 10 rows"),
    ("index-negative", lambda m: m(torch.tensor([[1, -2]])), IndexError, r"index -2 at position 1"),
    ("offsets-decreasing", lambda m: m(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1])),
     ValueError, r"non-decreasing"),
    ("offsets-not-from-0", lambda m: m(torch.tensor([1, 2, 3]), torch.tensor([2])), ValueError,
     r"offsets\[0\] must be 0"),
    ("offsets-past-end", lambda m: m(torch.tensor([1, 2, 3]), torch.tensor([0, 4])), ValueError,
     r"past the end"),
    ("psw-shape", lambda m: m(torch.tensor([1, 2, 3]), torch.tensor([0]), torch.ones(2)),
     ValueError, r"per_sample_weights must have the shape of indices"),
    ("psw-with-mean", lambda m: as_mean(m)(torch.tensor([1, 2]), torch.tensor([0]), torch.ones(2)),
     ValueError, r"per_sample_weights are only supported"),
    ("2d-with-offsets", lambda m: m(torch.tensor([[1, 2]]), torch.tensor([0])), ValueError,
     r"offsets must be None when input is 2-D"),
    ("1d-without-offsets", lambda m: m(torch.tensor([1, 2])), ValueError, r"offsets is required"),
    ("3d-input", lambda m: m(torch.zeros(1, 1, 1, dtype=torch.long)), ValueError,
     r"input must be 1-D \(with offsets\) or 2-D, got 3-D"),
    ("float-input", lambda m: m(torch.tensor([[1.0, 2.0]])), TypeError,
     r"indices must be int32 or int64, got Float"),
    ("input-on-meta", lambda m: m(torch.tensor([[1, 2]], device="meta")), ValueError,
     r"indices is on meta but the table is on cpu"),
    ("embedding-index-too-large", lambda m: QuantizedEmbedding(10, 16)(torch.tensor([[3, 11]])),
     IndexError, r"index 11 at position 1 is out of range"),
    ("embedding-float-input", lambda m: QuantizedEmbedding(10, 16)(torch.tensor([1.0])),
     TypeError, r"indices must be int32 or int64"),
]


@pytest.mark.parametrize("fmt", ["affine", "symmetric_table"])
@pytest.mark.parametrize("call,exc,match", params(FORWARD_ERRORS))
def test_module_forward_errors(call, exc, match, fmt):
    module = bag(format=fmt)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(exc, match=match):
        call(module)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.parametrize("fmt", ["affine", "symmetric", "symmetric_table"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_leaves_table_unchanged(fmt, bad):
    module = bag(format=fmt)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    weight = torch.randn(10, 16)
    weight[4, 5] = bad
    with pytest.raises(ValueError, match=r"non-finite value at row 4, column 5"):
        module.load_float_weight(weight)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.parametrize("mode", ["sum", "mean", "none"])
@pytest.mark.parametrize("where", ["in-a-bag", "after-the-last-bag"])
def test_bad_index_found_anywhere_in_a_large_batch(mode, where):
    """The pooled lookup checks indices as it reads them, on every thread; an index past the
    last bag (include_last_offset) is never read but must raise all the same."""
    table = random_table(100, 16, 4, "affine")
    n = 4000
    indices = torch.randint(0, 100, (n,))
    offsets = torch.arange(0, n - 50, 10)  # with include_last_offset: the last 50 are unused
    position = int(torch.randint(0, n - 50, ())) if where == "in-a-bag" else n - 7
    indices[position] = 100 + position
    with pytest.raises(IndexError, match=f"index {100 + position} at position {position} "):
        ops.embedding_bag(table.rows, indices, offsets, 4, 16, "affine", mode=mode,
                          include_last_offset=True)
