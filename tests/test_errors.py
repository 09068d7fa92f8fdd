"""Bad input to the modules raises a Python exception of the right type that names the
problem, and leaves the table as it was (each op's own bad input: its test file)."""
import pytest
import torch
from torch import nn

import qembed
from qembed import QuantizedEmbedding, QuantizedEmbeddingBag


def params(cases):
    """pytest params from (id, *values) tuples."""
    return [pytest.param(*values, id=case_id) for case_id, *values in cases]


def bag(**kwargs):
    return QuantizedEmbeddingBag(10, 16, **{"mode": "sum", "bits": 4, **kwargs})


CONSTRUCTOR_ERRORS = [
    ("bits-0", lambda: bag(bits=0), ValueError, r"bits must be in 1..8, got 0"),
    ("bits-9", lambda: bag(bits=9), ValueError, r"bits must be in 1..8, got 9"),
    ("dim-0", lambda: QuantizedEmbeddingBag(10, 0), ValueError, r"dim must be positive, got 0"),
    ("dim-0-embedding", lambda: QuantizedEmbedding(10, 0), ValueError,
     r"dim must be positive, got 0"),
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
