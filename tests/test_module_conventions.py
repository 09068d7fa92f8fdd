"""PyTorch conventions of the modules: seeds follow torch's default generator (an explicit
seed wins and travels in state_dict), and any embedding_dim works as in nn.EmbeddingBag,
training included (divisors count the real columns, never the pad)."""
import pytest
import torch
from torch import nn

from qembed import formats, reference
from qembed.nn import (
    LowPrecisionEmbedding,
    LowPrecisionEmbeddingBag,
    MixedPrecisionEmbedding,
    MixedPrecisionEmbeddingBag,
    MixedPrecisionSearchEmbedding,
    MixedPrecisionSearchEmbeddingBag,
    QuantizedEmbedding,
    QuantizedEmbeddingBag,
)

ODD_DIMS = [1, 3, 12, 100]


def built_under(seed, make):
    torch.manual_seed(seed)
    return make()


def one_step(module, indices, offsets):
    """One training step of a self-updating table on a fixed loss."""
    module.train()
    out = module(indices, offsets)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()


# --- seeds -------------------------------------------------------------------------------

SEEDED = {
    "lowp-bag": lambda **kw: LowPrecisionEmbeddingBag(200, 16, bits=4, **kw),
    "lowp-table-step": lambda **kw: LowPrecisionEmbeddingBag(200, 16, bits=2, step_per="table",
                                                             **kw),
    "lowp": lambda **kw: LowPrecisionEmbedding(200, 16, bits=4, **kw),
}


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_low_precision_seed_follows_torch_generator(name):
    make = SEEDED[name]
    a, b, c = (built_under(s, make) for s in (1, 1, 2))
    assert torch.equal(a.qweight, b.qweight) and int(a.seed) == int(b.seed)
    assert not torch.equal(a.qweight, c.qweight) and int(a.seed) != int(c.seed)
    # same initial values, different seeds: the stochastic rounding streams differ
    weight = torch.randn(200, 16) * 0.01
    a, b, c = (built_under(s, lambda: make(_weight=weight)) for s in (1, 1, 2))
    assert torch.equal(a.qweight, b.qweight) and not torch.equal(a.qweight, c.qweight)


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_low_precision_explicit_seed_wins_and_is_saved(name):
    make = SEEDED[name]
    a, b = (built_under(s, lambda: make(seed=77)) for s in (1, 2))
    assert torch.equal(a.qweight, b.qweight) and a.state_dict()["seed"].item() == 77
    ids = torch.randint(0, 200, (24,))
    bags = torch.arange(0, 24, 4)
    other = built_under(3, make)
    other.load_state_dict(a.state_dict())
    for m in (a, other):
        if isinstance(m, LowPrecisionEmbedding):
            m(ids).sum().backward()
        else:
            one_step(m, ids, bags)
    assert int(other.seed) == 77 and torch.equal(a.qweight, other.qweight)


def mixed(**kw):
    row_bits = torch.tensor([0, 2, 3, 8] * 40)
    table = MixedPrecisionEmbeddingBag(160, 16, row_bits, mode="sum", optimizer="sgd", lr=0.3,
                                       **kw)
    table.load_float_weight(torch.randn(160, 16, generator=torch.Generator().manual_seed(0)),
                            torch.tensor([0.3, 0.1, 0.01]), torch.zeros(16))
    return table


def test_mixed_precision_seed_follows_torch_generator():
    ids, bags = torch.randint(0, 160, (60,), generator=torch.Generator().manual_seed(1)), \
        torch.arange(0, 60, 3)
    tables = [built_under(s, mixed) for s in (1, 1, 2)]
    for t in tables:
        one_step(t, ids, bags)
    a, b, c = (t.dequantize() for t in tables)
    assert torch.equal(a, b) and int(tables[0].seed) == int(tables[1].seed)
    assert not torch.equal(a, c) and int(tables[0].seed) != int(tables[2].seed)
    fixed = [built_under(s, lambda: mixed(seed=5)) for s in (1, 2)]
    for t in fixed:
        one_step(t, ids, bags)
    assert torch.equal(fixed[0].dequantize(), fixed[1].dequantize())
    assert fixed[0].state_dict()["seed"].item() == 5
    assert "seed" not in fixed[0].export().state_dict()  # inference copies do not round


@pytest.mark.parametrize("cls", [MixedPrecisionSearchEmbeddingBag, MixedPrecisionSearchEmbedding,
                                 QuantizedEmbeddingBag, QuantizedEmbedding])
def test_initial_tables_follow_torch_generator(cls):
    make = lambda: cls(300, 8)  # noqa: E731
    a, b, c = (built_under(s, make).state_dict() for s in (1, 1, 2))
    key = "weight" if "weight" in a else "qweight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


# --- any embedding_dim -------------------------------------------------------------------

def random_bags(rows, bags, gen):
    lengths = torch.randint(0, 5, (bags,), generator=gen)
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.randint(0, rows, (int(lengths.sum()),), generator=gen), offsets


def check_against_torch(module, dim, modes_psw, padding_idx=None):
    """module's lookups = nn.EmbeddingBag / nn.Embedding over its dequantized table."""
    gen = torch.Generator().manual_seed(dim)
    weight = module.dequantize()
    assert weight.shape == (module.num_embeddings, dim)
    indices, offsets = random_bags(module.num_embeddings, 17, gen)
    psw = torch.randn(indices.numel(), generator=gen)
    if isinstance(module, (QuantizedEmbedding, LowPrecisionEmbedding, MixedPrecisionEmbedding)):
        ids = indices.view(-1, 1)
        torch_ref = nn.Embedding.from_pretrained(weight, padding_idx=padding_idx)
        out = module(ids)
        assert out.shape == (ids.shape[0], 1, dim)
        torch.testing.assert_close(out, torch_ref(ids), rtol=1e-5, atol=1e-5)
        return
    for mode, with_psw in modes_psw:
        module.mode = mode
        torch_ref = nn.EmbeddingBag.from_pretrained(weight, mode=mode, padding_idx=padding_idx)
        w = psw if with_psw else None
        out = module(indices, offsets, per_sample_weights=w)
        assert out.shape == (17, dim) and out.is_contiguous()
        torch.testing.assert_close(out, torch_ref(indices, offsets, per_sample_weights=w),
                                   rtol=1e-5, atol=1e-5)


BAG_MODES = [("sum", False), ("sum", True), ("mean", False)]


@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("fmt", ["affine", "symmetric", "symmetric_table"])
@pytest.mark.parametrize("bag", [True, False], ids=["bag", "embedding"])
def test_quantized_modules_any_dim(dim, fmt, bag):
    bits = 1 + dim % 8
    cls = QuantizedEmbeddingBag if bag else QuantizedEmbedding
    module = cls(50, dim, padding_idx=4, bits=bits, format=fmt)
    check_against_torch(module, dim, BAG_MODES, padding_idx=4)
    per_table = 4 if fmt == "symmetric_table" else 0
    assert module.qweight.shape == (50, formats.row_bytes(dim, bits, fmt))
    assert module.nbytes == 50 * formats.row_bytes(dim, bits, fmt) + per_table
    # from an fp32 table: the dequantized rows are within a step of it
    fp32 = torch.randn(50, dim)
    module = cls(50, dim, _weight=fp32, bits=8, format=fmt)
    scale = reference.row_params(module.qweight, 8, dim, fmt, module.step)[0]
    assert ((module.dequantize() - fp32).abs() <= scale[:, None] * (1 + 1e-5)).all()


@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("bag", [True, False], ids=["bag", "embedding"])
def test_low_precision_modules_any_dim(dim, bag):
    cls = LowPrecisionEmbeddingBag if bag else LowPrecisionEmbedding
    module = cls(40, dim, padding_idx=1, bits=3, init_std=0.1, optimizer="adam")
    check_against_torch(module, dim, BAG_MODES, padding_idx=1)
    rb = formats.row_bytes(dim, 3, "symmetric")
    assert module.qweight.shape == (40, rb) and module.state.shape == (40, 2 * dim)
    assert module.nbytes == 40 * rb + 40 * 2 * dim * 4


@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("bag", [True, False], ids=["bag", "embedding"])
def test_mixed_precision_modules_any_dim(dim, bag):
    row_bits = torch.tensor([0, 1, 3, 5, 8] * 8)
    cls = MixedPrecisionEmbeddingBag if bag else MixedPrecisionEmbedding
    module = cls(40, dim, row_bits)
    module.load_float_weight(torch.randn(40, dim), torch.tensor([0.5, 0.2, 0.05, 0.01]),
                             torch.randn(dim) * 0.1)
    for table in (module, module.export()):
        check_against_torch(table, dim, BAG_MODES)
    exported = module.export()
    codes = sum(8 * formats.code_bytes(dim, b) for b in (1, 3, 5, 8))
    assert exported.nbytes == codes + exported.location.numel() * 2 + 4 * 4 + dim * 4
    search_cls = MixedPrecisionSearchEmbeddingBag if bag else MixedPrecisionSearchEmbedding
    search = search_cls(40, dim, candidate_bits=[0, 2, 4], init_std=0.1)
    ids = torch.randint(0, 40, (12,))
    out = search(ids, torch.arange(0, 12, 3)) if bag else search(ids.view(4, 3))
    assert out.shape == ((4, dim) if bag else (4, 3, dim))


# --- training counts the real columns ------------------------------------------------------

def test_training_divides_by_the_true_dim():
    """Row-wise Adagrad's mean of squares and ALPT's gradient scale 1/sqrt(Qp * D) use D, not
    the padded width: one step checked in float64 against the formulas, pad left at zero."""
    dim, bits, lr, step_lr, eps = 12, 4, 0.05, 0.05, 1e-8
    qp, qn = formats.qmax(bits), formats.qmin(bits)
    m = LowPrecisionEmbeddingBag(30, dim, mode="sum", bits=bits, optimizer="adagrad", lr=lr,
                                 eps=eps, learn_step=True, step_lr=step_lr, rounding="nearest",
                                 init_std=0.05)
    w0 = m.dequantize().double()
    s0 = reference.row_params(m.qweight, bits, dim, "symmetric")[0].double()
    ids, offsets = torch.tensor([3, 7, 7, 20]), torch.tensor([0, 2])
    grad_out = torch.randn(2, dim)
    m(ids, offsets).backward(grad_out)
    g = torch.zeros(30, dim, dtype=torch.float64).index_add_(
        0, ids, grad_out.double()[torch.tensor([0, 0, 1, 1])])
    rows = torch.tensor([3, 7, 20])
    acc = (g[rows] ** 2).sum(1) / dim
    torch.testing.assert_close(m.state[rows, 0].double(), acc, rtol=1e-5, atol=0)
    w1 = w0[rows] - lr * g[rows] / (acc.sqrt() + eps)[:, None]
    x = w1 / s0[rows, None]
    dq = torch.where(x < qn, float(qn), torch.where(x > qp, float(qp), torch.round(x) - x))
    s1 = s0[rows] - step_lr * (g[rows] * dq).sum(1) / (qp * dim) ** 0.5
    new_steps = reference.row_params(m.qweight, bits, dim, "symmetric")[0].double()
    torch.testing.assert_close(new_steps[rows], s1, rtol=1e-4, atol=0)
    pad = reference.unpack(m.qweight, bits, 16)[:, dim:]
    assert (pad == -qn).all()  # the code of zero, on every row
