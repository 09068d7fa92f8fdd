"""PyTorch conventions of the modules: seeds follow torch's default generator (an explicit
seed wins and travels in state_dict)."""
import pytest
import torch

from qembed.nn import (
    LowPrecisionEmbedding,
    LowPrecisionEmbeddingBag,
    MixedPrecisionEmbeddingBag,
    MixedPrecisionSearchEmbedding,
    MixedPrecisionSearchEmbeddingBag,
    QuantizedEmbedding,
    QuantizedEmbeddingBag,
)


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
