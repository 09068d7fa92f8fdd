"""qembed.torchrec's collections against TorchRec's EmbeddingBagCollection and against
per-table qembed modules; skipped where TorchRec is not installed."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

torchrec = pytest.importorskip("torchrec")

from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor  # noqa: E402
from torchrec.modules.embedding_configs import PoolingType  # noqa: E402

import qembed  # noqa: E402
from qembed import LowPrecisionEmbeddingBag  # noqa: E402
from qembed.formats import row_bytes  # noqa: E402
from qembed.torchrec import (  # noqa: E402
    LowPrecisionEmbeddingBagCollection,
    QuantizedEmbeddingBagCollection,
)

SUM, MEAN = PoolingType.SUM, PoolingType.MEAN


EVEN_DIMS, ODD_DIMS = (16, 8, 24, 8), (16, 5, 24, 13)  # ODD: rows padded to 8 codes


def configs(shared=True, dims=EVEN_DIMS):
    """Four tables: one read by two features, one whose feature is named after it, one
    feature ("f_b") read by two tables when `shared`."""
    return [
        EmbeddingBagConfig(num_embeddings=50, embedding_dim=dims[0], name="t0",
                           feature_names=["f_a", "f_b"] if shared else ["f_a"], pooling=SUM),
        EmbeddingBagConfig(num_embeddings=30, embedding_dim=dims[1], name="t1",
                           feature_names=["f_c"], pooling=MEAN),
        EmbeddingBagConfig(num_embeddings=70, embedding_dim=dims[2], name="t2", pooling=SUM),
        EmbeddingBagConfig(num_embeddings=20, embedding_dim=dims[3], name="t3",
                           feature_names=["f_b"] if shared else ["f_d"], pooling=SUM),
    ]


def batch(configs, batch_size=6, keys=None, max_len=4, weighted=False, empty=False):
    """A random KJT over the configs' features (keys in the order given)."""
    rows = {}
    for c in configs:
        for name in c.feature_names or [c.name]:
            rows[name] = min(rows.get(name, c.num_embeddings), c.num_embeddings)
    keys = keys or list(rows)
    lengths = torch.randint(0, 1 if empty else max_len + 1, (len(keys), batch_size))
    values = torch.cat([torch.randint(0, rows[k], (int(lengths[i].sum()),))
                        for i, k in enumerate(keys)])
    weights = torch.rand(values.numel()) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.reshape(-1),
                             weights=weights)


def torchrec_twin(collection, weighted=False):
    """TorchRec's collection holding `collection`'s dequantized tables."""
    ebc = EmbeddingBagCollection(tables=collection.embedding_bag_configs(), is_weighted=weighted)
    with torch.no_grad():
        for name, m in collection.embedding_bags.items():
            ebc.embedding_bags[name].weight.copy_(m.dequantize())
    return ebc


def assert_same_keyed(a, b, **tol):
    assert a.keys() == b.keys() and a.length_per_key() == b.length_per_key()
    torch.testing.assert_close(a.values(), b.values(), **tol)


@pytest.mark.parametrize("bits", [8, 4, {"t0": 2, "t1": 8, "t2": 5, "t3": 1}])
@pytest.mark.parametrize("fmt", ["affine", "symmetric", "symmetric_table"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dims", [EVEN_DIMS, ODD_DIMS], ids=["even", "odd"])
def test_quantized_collection_matches_torchrec(dims, bits, fmt, weighted):
    cfg = configs(dims=dims)
    if weighted:
        cfg[1].pooling = SUM  # weights need sum pooling, in TorchRec as here
    q = QuantizedEmbeddingBagCollection(cfg, is_weighted=weighted, bits=bits, format=fmt)
    ebc = torchrec_twin(q, weighted)
    for keys in (None, ["f_c", "t2", "f_b", "f_a"]):  # the batch's keys in any order
        kjt = batch(cfg, keys=keys, weighted=weighted)
        out = q(kjt)
        assert out.keys() == ["f_a", "f_b@t0", "f_c", "t2", "f_b@t3"]
        assert_same_keyed(out, ebc(kjt), rtol=1e-5, atol=1e-5)
    empty = batch(cfg, empty=True, weighted=weighted)
    assert_same_keyed(q(empty), ebc(empty))
    width = dims[0] * 2 + sum(dims[1:])  # t0 serves two features
    assert q(batch(cfg, batch_size=0, weighted=weighted)).values().shape == (0, width)


def test_from_torchrec_within_quantization_error():
    cfg = configs(shared=False)
    ebc = EmbeddingBagCollection(tables=cfg)
    kjt = batch(cfg, batch_size=20)
    expected = ebc(kjt)
    for bits in (8, 4, 2):
        q = QuantizedEmbeddingBagCollection.from_torchrec(ebc, bits=bits)
        out = q(kjt)
        # affine rows round each value by at most half a step, (max - min) / (2^b - 1) / 2
        bound = 0.0
        for c in cfg:
            w = ebc.embedding_bags[c.name].weight.detach()
            bound = max(bound, float((w.amax(1) - w.amin(1)).max()) / ((1 << bits) - 1) / 2)
        err = (out.values() - expected.values()).abs().max()
        assert err <= bound * 4 + 1e-6  # at most 4 ids per bag
        assert err > 0


def test_quantize_swaps_collections_in_a_model():
    cfg = configs()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.sparse = EmbeddingBagCollection(tables=cfg)
            self.bag = nn.EmbeddingBag(10, 8, mode="sum")
            self.head = nn.Linear(72, 1)

        def forward(self, kjt):
            return self.head(self.sparse(kjt).values())

    model = Model()
    kjt = batch(cfg)
    before = model(kjt)
    qembed.quantize_(model, bits=8)
    assert isinstance(model.sparse, QuantizedEmbeddingBagCollection)
    assert isinstance(model.bag, qembed.QuantizedEmbeddingBag)
    assert all(isinstance(m, qembed.QuantizedEmbeddingBag)
               for m in model.sparse.embedding_bags.values())
    torch.testing.assert_close(model(kjt), before, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="containing"):
        qembed.quantize_(EmbeddingBagCollection(tables=configs()))


def test_state_dict_round_trip_and_nbytes():
    cfg = configs()
    q = QuantizedEmbeddingBagCollection(cfg, bits={"t0": 3, "t1": 8, "t2": 4, "t3": 2},
                                        format="symmetric_table")
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = QuantizedEmbeddingBagCollection(cfg, bits={"t0": 3, "t1": 8, "t2": 4, "t3": 2},
                                            format="symmetric_table")
    fresh.load_state_dict(torch.load(buffer))
    for key, value in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    kjt = batch(cfg)
    assert torch.equal(fresh(kjt).values(), q(kjt).values())
    per_table = q.nbytes_per_table
    for c, b in zip(cfg, (3, 8, 4, 2)):
        assert per_table[c.name] == c.num_embeddings * row_bytes(c.embedding_dim, b,
                                                                 "symmetric_table") + 4
    assert q.nbytes == sum(per_table.values())


def test_bad_input_names_feature_and_table():
    cfg = configs()
    q = QuantizedEmbeddingBagCollection(cfg, bits=4)
    with pytest.raises(ValueError, match=r"unknown \['f_x'\]"):
        q(KeyedJaggedTensor(keys=["f_a", "f_b", "f_c", "t2", "f_x"], values=torch.zeros(0).long(),
                            lengths=torch.zeros(5).long()))
    with pytest.raises(ValueError, match=r"missing \['t2'\]"):
        q(KeyedJaggedTensor(keys=["f_a", "f_b", "f_c"], values=torch.zeros(0).long(),
                            lengths=torch.zeros(3).long()))
    kjt = batch(cfg, keys=["f_a", "f_b", "f_c", "t2"], batch_size=3, max_len=2)
    values = kjt.values().clone()
    lengths = kjt.lengths()
    first_c = int(lengths[:6].sum())  # f_c's values start after f_a's and f_b's
    if int(lengths[6:9].sum()) == 0:
        lengths = lengths.clone()
        lengths[6] = 1
        values = torch.cat([values[:first_c], torch.zeros(1).long(), values[first_c:]])
    values[first_c] = 30  # one past table t1's 30 rows
    with pytest.raises(IndexError, match=r"feature 'f_c' \(table 't1'\) has id 30"):
        q(KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=lengths))
    with pytest.raises(ValueError, match="lengths add up"):
        q(KeyedJaggedTensor(keys=kjt.keys(), values=values[:-1], lengths=lengths))
    weighted = QuantizedEmbeddingBagCollection(configs(shared=False), is_weighted=True)
    kjt = batch(configs(shared=False), weighted=True)
    with pytest.raises(ValueError, match="weights"):
        weighted(KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                   weights=kjt.weights()[:-1]))
    with pytest.raises(ValueError, match=r"feature 'f_c' \(table 't1'\) pools by mean"):
        weighted(kjt)
    q.embedding_bags["t2"].qweight = q.embedding_bags["t2"].qweight.to("meta")
    with pytest.raises(ValueError, match="table 't2' is on meta"):
        q(batch(cfg))


# --- training -----------------------------------------------------------------------------

TRAIN = [dict(optimizer="adagrad"),
         dict(optimizer="sgd", learn_step=False, rounding="nearest"),
         dict(optimizer="adam", step_optimizer="adam", step_per="table"),
         dict(optimizer="adagrad", step_per="table", weight_decay=0.01)]


def per_table_twins(collection, cfg, bits, train, seed):
    """LowPrecisionEmbeddingBags built as the collection builds its tables."""
    return {c.name: LowPrecisionEmbeddingBag(c.num_embeddings, c.embedding_dim,
                                             mode="sum" if c.pooling == SUM else "mean",
                                             include_last_offset=True, bits=b, seed=seed + t,
                                             **train)
            for t, (c, b) in enumerate(zip(cfg, bits))}


@pytest.mark.parametrize("dims", [EVEN_DIMS, ODD_DIMS], ids=["even", "odd"])
@pytest.mark.parametrize("train", TRAIN)
def test_training_collection_equals_per_table_modules(train, dims):
    cfg = configs(shared=False, dims=dims)
    bits = [8, 4, 2, 5]
    coll = LowPrecisionEmbeddingBagCollection(cfg, bits=dict(zip(["t0", "t1", "t2", "t3"], bits)),
                                              seed=11, **train)
    twins = per_table_twins(coll, cfg, bits, train, 11)
    for step in range(3):
        kjt = batch(cfg, batch_size=8)
        out = coll(kjt)
        grad = torch.randn_like(out.values())
        (out.values() * grad).sum().backward()
        features = kjt.to_dict()
        start = 0
        for c, key in zip(cfg, ["f_a", "f_c", "t2", "f_d"]):
            f = features[key]
            part = twins[c.name](f.values(), f.offsets())
            torch.testing.assert_close(part, out.values()[:, start: start + c.embedding_dim],
                                       rtol=0, atol=0)
            (part * grad[:, start: start + c.embedding_dim]).sum().backward()
            start += c.embedding_dim
        for name, m in coll.embedding_bags.items():
            for key, value in twins[name].state_dict().items():
                assert torch.equal(m.state_dict()[key], value), (step, name, key)


def test_training_collection_shared_tables_and_weights():
    """Features sharing a table update it once, from all their rows; weights get a gradient.
    (No feature read by two tables here: fbgemm-gpu-cpu 1.8.0 crashes in the backward of
    the permute that TorchRec's side needs for it when weights require a gradient.)"""
    cfg = configs()
    cfg[1].pooling = SUM
    cfg[3].feature_names = ["f_d"]
    coll = LowPrecisionEmbeddingBagCollection(cfg, is_weighted=True, bits=8, optimizer="sgd",
                                              lr=1e-4, learn_step=False, rounding="nearest")
    before = {n: m.dequantize() for n, m in coll.embedding_bags.items()}
    kjt = batch(cfg, weighted=True)
    weights = kjt.weights().clone().requires_grad_()
    kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                            weights=weights)
    out = coll(kjt)
    grad = torch.randn_like(out.values())
    ebc = EmbeddingBagCollection(tables=cfg, is_weighted=True)
    with torch.no_grad():
        for n, w in before.items():
            ebc.embedding_bags[n].weight.copy_(w)
    weights_ref = weights.detach().clone().requires_grad_()
    ref_out = ebc(KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                    weights=weights_ref))
    (ref_out.values() * grad).sum().backward()
    (out.values() * grad).sum().backward()
    torch.testing.assert_close(weights.grad, weights_ref.grad, rtol=1e-5, atol=1e-5)
    for n, m in coll.embedding_bags.items():  # one SGD step, then rounded to the row's step
        expected = before[n] - 1e-4 * ebc.embedding_bags[n].weight.grad
        step = m.qweight[:, -4:].contiguous().view(torch.float32)  # inline per-row steps
        assert ((m.dequantize() - expected).abs() <= step * 0.5 + 1e-6).all(), n


def test_two_pass_and_unfused_fall_back_to_the_modules():
    cfg = configs(shared=False)
    for train in (dict(learn_step=True, step_grad="two_pass"), dict(fused_update=False)):
        coll = LowPrecisionEmbeddingBagCollection(cfg, bits=4, seed=3, **train)
        twins = per_table_twins(coll, cfg, [4] * 4, train, 3)
        kjt = batch(cfg)
        grad = torch.randn(6, 56)

        def closure_coll():
            return (coll(kjt).values() * grad).sum()

        def closure_twins():
            features, start, loss = kjt.to_dict(), 0, 0
            for c, key in zip(cfg, ["f_a", "f_c", "t2", "f_d"]):
                f = features[key]
                out = twins[c.name](f.values(), f.offsets())
                loss = loss + (out * grad[:, start: start + c.embedding_dim]).sum()
                start += c.embedding_dim
            return loss

        qembed.two_pass_backward(coll, closure_coll)
        qembed.two_pass_backward(nn.ModuleDict(twins), closure_twins)
        for name, m in coll.embedding_bags.items():
            if not m.fused_update:
                assert torch.equal(m.sparse_grad[0], twins[name].sparse_grad[0])
                assert torch.equal(m.sparse_grad[1], twins[name].sparse_grad[1])
            for key, value in twins[name].state_dict().items():
                assert torch.equal(m.state_dict()[key], value), (train, name, key)


def test_training_from_torchrec_and_state_dict():
    cfg = configs()
    ebc = EmbeddingBagCollection(tables=cfg)
    coll = LowPrecisionEmbeddingBagCollection.from_torchrec(ebc, bits=8, learn_step=False)
    kjt = batch(cfg)
    # stochastic rounding moves each value by less than its row's step; at most 4 ids a bag
    step = max(float(m.qweight[:, -4:].contiguous().view(torch.float32).max())
               for m in coll.embedding_bags.values())
    assert (coll(kjt).values() - ebc(kjt).values()).abs().max() <= 4 * step
    buffer = io.BytesIO()
    torch.save(coll.state_dict(), buffer)
    buffer.seek(0)
    fresh = LowPrecisionEmbeddingBagCollection(cfg, bits=8, learn_step=False)
    fresh.load_state_dict(torch.load(buffer))
    for key, value in coll.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert coll.nbytes == sum(m.nbytes for m in coll.embedding_bags.values())


# --- serving by TorchRec's inference stack --------------------------------------------------

def test_trained_collection_served_by_torchrec():
    """A collection trained in low precision, converted to TorchRec's
    QuantEmbeddingBagCollection, serves the same lookups up to fp16 scale and bias."""
    cfg = configs()
    coll = LowPrecisionEmbeddingBagCollection(cfg, bits={"t0": 8, "t1": 4, "t2": 3, "t3": 2},
                                              optimizer="adagrad", lr=0.05)
    for _ in range(2):
        (coll(batch(cfg)).values() * torch.randn(6, 72)).sum().backward()
    served = coll.to_torchrec()
    kjt = batch(cfg)
    with torch.no_grad():
        mine = coll(kjt).to_dict()
    theirs = served(kjt).to_dict()  # TorchRec's keys go pooling by pooling
    assert sorted(theirs) == sorted(mine)
    for key, value in mine.items():
        torch.testing.assert_close(theirs[key], value, rtol=2e-3, atol=2e-3)
    back = QuantizedEmbeddingBagCollection.from_quant_ebc(
        served, bits={"t0": 8, "t1": 4, "t2": 3, "t3": 2})
    for key, value in back(kjt).to_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-3, atol=1e-4)  # sum orders
