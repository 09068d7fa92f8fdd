"""QuantizedEmbeddingBag / QuantizedEmbedding as drop-in replacements of nn.EmbeddingBag /
nn.Embedding, quantize_, state_dict round trips and memory accounting."""
import inspect
import io
import math

import pytest
import torch
from conftest import BITS, FORMATS, pool_per_bag, random_bags, random_psw
from torch import nn

import qembed
from qembed import QuantizedEmbedding, QuantizedEmbeddingBag, formats

QUANTIZED = {nn.EmbeddingBag: QuantizedEmbeddingBag, nn.Embedding: QuantizedEmbedding}


def trained_weight(rows, dim):
    """Rows of varied scale and offset with a few outliers, like a trained table."""
    w = torch.randn(rows, dim) * 0.05 * torch.rand(rows, 1).exp() + 0.01 * torch.randn(rows, 1)
    w[torch.rand(rows, dim) < 0.002] *= 4
    return w


def float_twin(q):
    """The fp32 module that computes exactly what ``q`` should: same arguments, the
    dequantized table as weight."""
    if isinstance(q, QuantizedEmbeddingBag):
        return nn.EmbeddingBag.from_pretrained(q.dequantize(), mode=q.mode,
                                               include_last_offset=q.include_last_offset,
                                               padding_idx=q.padding_idx)
    return nn.Embedding.from_pretrained(q.dequantize(), padding_idx=q.padding_idx)


@pytest.mark.parametrize("fp_cls", [nn.EmbeddingBag, nn.Embedding])
def test_constructor_signature_extends_torch(fp_cls):
    fp = list(inspect.signature(fp_cls.__init__).parameters.values())
    q = list(inspect.signature(QUANTIZED[fp_cls].__init__).parameters.values())
    assert [(p.name, p.default) for p in fp] == [(p.name, p.default) for p in q[: len(fp)]]
    assert all(p.kind == p.KEYWORD_ONLY for p in q[len(fp):])


def test_same_positional_arguments():
    args = (30, 16, None, 2.0, False, "sum", False, None, True, 4)
    fp, q = nn.EmbeddingBag(*args), QuantizedEmbeddingBag(*args, bits=6)
    for name in ("num_embeddings", "embedding_dim", "mode", "include_last_offset", "padding_idx"):
        assert getattr(fp, name) == getattr(q, name)
    fp, q = nn.Embedding(30, 16, -2), QuantizedEmbedding(30, 16, -2, bits=6)
    assert fp.padding_idx == q.padding_idx == 28


def half_steps(weight, bits, fmt):
    """Half the quantization step of each row as from_float calibrates it (affine: min/max;
    symmetric: the largest magnitude maps to Qp): nearest rounding is within it, as
    nothing clips."""
    w = weight.detach()
    if fmt == "affine":
        return (w.amax(1) - w.amin(1)) / ((1 << bits) - 1) / 2
    peak = w.abs().amax(1) if fmt == "symmetric" else w.abs().amax().expand(w.shape[0])
    return peak / formats.qmax(bits) / 2


# relative error of pooled outputs: 8 bits tight, 4 bits looser; one step for the whole
# table is coarse for rows of different scales
REL_TOL = {(8, "affine"): 0.01, (8, "symmetric"): 0.01, (8, "symmetric_table"): 0.05,
           (4, "affine"): 0.15, (4, "symmetric"): 0.2, (4, "symmetric_table"): 0.6}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("bits", [8, 4])
def test_from_float_is_close_to_fp32(bits, mode, fmt):
    """Each quantized element is within half a step of the fp32 one, so a bag is within
    the (weighted) sum of its rows' half steps; and the outputs are close in norm."""
    fp = nn.EmbeddingBag(200, 64, mode=mode, _weight=trained_weight(200, 64))
    q = QuantizedEmbeddingBag.from_float(fp, bits=bits, format=fmt)
    half_step = half_steps(fp.weight, bits, fmt)
    assert ((q.dequantize() - fp.weight).abs() <= half_step[:, None] * 1.001 + 1e-7).all()

    indices, offsets = random_bags(200, 64, max_len=8)
    psw = random_psw(indices.numel()) if mode == "sum" else None
    with torch.no_grad():
        expected = fp(indices, offsets, psw)
    out = q(indices, offsets, psw)
    terms = half_step[indices] * (psw.abs() if psw is not None else 1)
    bound = pool_per_bag(terms, offsets, mean=mode == "mean")
    assert ((out - expected).abs() <= bound[:, None] * 1.001 + 1e-6).all()
    assert (out - expected).norm() <= REL_TOL[bits, fmt] * expected.norm()


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_bag_input_forms(fmt, mode, include_last_offset, padding_idx):
    q = QuantizedEmbeddingBag(40, 24, mode=mode, include_last_offset=include_last_offset,
                              padding_idx=padding_idx, bits=5, format=fmt)
    pad = None if padding_idx is None else padding_idx % 40
    assert q.padding_idx == pad
    fp = float_twin(q)
    # 1-D input with offsets
    indices, offsets = random_bags(40, 9, include_last_offset=include_last_offset, padding_idx=pad)
    torch.testing.assert_close(q(indices, offsets), fp(indices, offsets))
    # 2-D input: fixed-length bags, no offsets
    batch = torch.randint(0, 40, (6, 4))
    if pad is not None:
        batch[0, 1] = batch[3, :] = pad
    torch.testing.assert_close(q(batch), fp(batch))
    torch.testing.assert_close(q(batch.int()), fp(batch.int()))
    if mode == "sum":  # per_sample_weights, 1-D and 2-D
        psw = random_psw(indices.numel())
        torch.testing.assert_close(q(indices, offsets, psw), fp(indices, offsets, psw))
        psw = random_psw(batch.numel()).view(6, 4)
        torch.testing.assert_close(q(batch, per_sample_weights=psw),
                                   fp(batch, per_sample_weights=psw))


@pytest.mark.parametrize("padding_idx", [None, 0, -3])
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_input_forms(fmt, padding_idx):
    fp32 = nn.Embedding(30, 16, padding_idx=padding_idx)
    q = QuantizedEmbedding.from_float(fp32, bits=7, format=fmt)
    fp = float_twin(q)
    for shape in [(11,), (3, 5), (2, 3, 4), (0,)]:
        x = torch.randint(0, 30, shape)
        if padding_idx is not None and x.numel():
            x.view(-1)[0] = padding_idx % 30
        out = q(x)
        assert out.shape == (*shape, 16)
        torch.testing.assert_close(out, fp(x), rtol=0, atol=0)
        bound = half_steps(fp32.weight, 7, fmt)[x][..., None] * 1.001 + 1e-7
        assert ((out - fp32(x)).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype(dtype):
    fp = nn.EmbeddingBag(30, 32, mode="sum")
    q32 = QuantizedEmbeddingBag.from_float(fp, bits=8)
    q = QuantizedEmbeddingBag.from_float(fp, bits=8, dtype=dtype)
    indices, offsets = random_bags(30, 8)
    out = q(indices, offsets)
    assert out.dtype == dtype
    torch.testing.assert_close(out, q32(indices, offsets).to(dtype))
    e = QuantizedEmbedding(30, 32, dtype=dtype)
    assert e(torch.tensor([[1, 2]])).dtype == dtype


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.user = nn.EmbeddingBag(50, 16, mode="sum")
        self.towers = nn.ModuleDict({
            "item": nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 16)),
            "ctx": nn.EmbeddingBag(20, 16, mode="mean", padding_idx=0),
        })
        self.head = nn.Linear(16, 1)

    def forward(self, users, user_offsets, items, ctx):
        x = self.user(users, user_offsets) + self.towers["item"](items) + self.towers["ctx"](ctx)
        return self.head(x)


def test_quantize_swaps_nested_modules():
    model = Model()
    users, user_offsets = random_bags(50, 6)
    args = (users, user_offsets, torch.randint(0, 40, (6,)), torch.randint(0, 20, (6, 3)))
    with torch.no_grad():
        expected = model(*args)
    head, linear = model.head, model.towers["item"][1]
    assert qembed.quantize_(model, bits=8) is model
    assert isinstance(model.user, QuantizedEmbeddingBag) and model.user.bits == 8
    assert isinstance(model.towers["item"][0], QuantizedEmbedding)
    assert isinstance(model.towers["ctx"], QuantizedEmbeddingBag)
    assert model.towers["ctx"].mode == "mean" and model.towers["ctx"].padding_idx == 0
    assert model.head is head and model.towers["item"][1] is linear
    with torch.no_grad():
        torch.testing.assert_close(model(*args), expected, rtol=0.02, atol=0.02)


def test_quantize_respects_filter_fn():
    model = Model()
    seen = []

    def only_bags(module, name):
        seen.append(name)
        return isinstance(module, nn.EmbeddingBag) and name != "towers.ctx"

    qembed.quantize_(model, bits=4, format="symmetric", filter_fn=only_bags)
    assert sorted(seen) == ["towers.ctx", "towers.item.0", "user"]
    assert isinstance(model.user, QuantizedEmbeddingBag) and model.user.format == "symmetric"
    assert type(model.towers["ctx"]) is nn.EmbeddingBag
    assert type(model.towers["item"][0]) is nn.Embedding


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_state_dict_round_trip(bits, fmt):
    src = QuantizedEmbeddingBag(30, 24, mode="sum", bits=bits, format=fmt,
                                _weight=trained_weight(30, 24))
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    dst = QuantizedEmbeddingBag(30, 24, mode="sum", bits=bits, format=fmt)  # other random init
    assert not torch.equal(dst.qweight, src.qweight)
    if fmt == "symmetric_table":
        assert not torch.equal(dst.step, src.step)
    dst.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(src.state_dict()) == set(dst.state_dict())
    for name, tensor in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], tensor), name
    indices, offsets = random_bags(30, 10)
    assert torch.equal(dst(indices, offsets), src(indices, offsets))


@pytest.mark.parametrize("cls", [QuantizedEmbeddingBag, QuantizedEmbedding])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", [8, 24, 136])
def test_memory(cls, bits, fmt, dim):
    rows = 37
    q = cls(rows, dim, bits=bits, format=fmt)
    row = formats.row_bytes(dim, bits, fmt)
    assert q.nbytes == rows * row + (4 if fmt == "symmetric_table" else 0)
    # independently: D*b/8 bytes of codes, padded to 4, then the format's fp32 parameters
    params = {"affine": 8, "symmetric": 4, "symmetric_table": 0}[fmt]
    assert row == math.ceil(dim * bits / 8 / 4) * 4 + params
    assert 0 <= q.nbytes - rows * (dim * bits / 8 + params) - (4 if params == 0 else 0) < 4 * rows
    assert q.qweight.untyped_storage().nbytes() == rows * row
    tensors = list(q.parameters()) + list(q.buffers())
    assert sum(t.numel() * t.element_size() for t in tensors) == q.nbytes
    assert not any(t.is_floating_point() and t.numel() >= rows * dim for t in tensors)
