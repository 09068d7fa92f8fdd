import pytest
import torch
from torch import nn

from qembed.experiments import data as D
from qembed.experiments import models as M

FIELD_DIMS = [7, 3, 11, 5]


def random_ids(batch, field_dims=FIELD_DIMS):
    return torch.stack([torch.randint(0, d, (batch,)) for d in field_dims], 1)


def pairwise_auc(scores, labels):
    pos = [s for s, y in zip(scores.tolist(), labels.tolist()) if y == 1]
    neg = [s for s, y in zip(scores.tolist(), labels.tolist()) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("levels", [3, 20, None])
def test_auc_matches_pairwise_count(levels):
    for _ in range(5):
        n = int(torch.randint(2, 300, ()))
        scores = torch.randint(0, levels, (n,)).float() if levels else torch.randn(n)
        labels = torch.randint(0, 2, (n,))
        labels[0], labels[1] = 0, 1
        assert M.roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        M.roc_auc(torch.randn(5), torch.ones(5))


class CountingFactory:
    """Builds nn.Embedding tables and records their construction and every lookup."""

    def __init__(self):
        self.built, self.lookups = [], []

    def __call__(self, num_embeddings, embedding_dim):
        self.built.append((num_embeddings, embedding_dim))
        table = nn.Embedding(num_embeddings, embedding_dim)
        table.register_forward_pre_hook(lambda module, args: self.lookups.append(args[0].clone()))
        return table


@pytest.mark.parametrize("name", sorted(M.MODELS))
@pytest.mark.parametrize("hidden", [(32, 16), ()])
def test_forward_shapes_and_embedding_factory(name, hidden):
    factory = CountingFactory()
    model = M.MODELS[name](FIELD_DIMS, embedding_dim=8, hidden=hidden, embedding_factory=factory)
    assert factory.built == [(sum(FIELD_DIMS), 8)]
    x = random_ids(13)
    out = model(x)
    assert out.shape == (13,) and out.dtype == torch.float32
    rows, = factory.lookups
    starts = [sum(FIELD_DIMS[:f]) for f in range(len(FIELD_DIMS))]
    assert torch.equal(rows, x + torch.tensor(starts))
    out.sum().backward()
    assert model.embedding.weight.grad is not None
    with pytest.raises(ValueError, match="expected ids"):
        model(x[:, :2])


def test_default_embedding_init():
    table = M.default_embedding(20_000, 16)
    assert isinstance(table, nn.Embedding)
    assert abs(table.weight.std().item() - 0.003) < 1e-4 and abs(table.weight.mean().item()) < 1e-4


def silence_dnn(model):
    nn.init.zeros_(model.out.weight)
    nn.init.zeros_(model.out.bias)


def test_deepfm_adds_fm_term():
    model = M.DeepFM(FIELD_DIMS, embedding_dim=8, hidden=(16,))
    silence_dnn(model)
    nn.init.normal_(model.linear.weight)
    x = random_ids(6)
    rows = x + torch.tensor([0, 7, 10, 21])
    e, w = model.embedding.weight.detach(), model.linear.weight[:, 0].detach()
    expected = torch.tensor([
        sum(w[r[i]] for i in range(4))
        + sum(e[r[i]] @ e[r[j]] for i in range(4) for j in range(i + 1, 4))
        for r in rows.tolist()])
    assert torch.allclose(model(x), expected, atol=1e-6)
    pairwise_only = M.DeepFM(FIELD_DIMS, embedding_dim=8, hidden=(16,), linear=False)
    assert pairwise_only.linear is None


def test_dcn_cross_layers():
    model = M.DCN(FIELD_DIMS, embedding_dim=8, hidden=(16,), cross_layers=2)
    x = random_ids(5)
    x0 = model.embedding(x + torch.tensor([0, 7, 10, 21])).flatten(1)
    # read only the cross part: zero the output weights of the MLP features
    with torch.no_grad():
        model.out.weight[:, x0.shape[1]:] = 0
    xl = x0
    for layer in range(2):
        w, b = model.cross_w[layer], model.cross_b[layer]
        xl = torch.stack([x0[i] * (xl[i] @ w) + b + xl[i] for i in range(5)])
    expected = xl @ model.out.weight[0, :x0.shape[1]] + model.out.bias
    assert torch.allclose(model(x), expected, atol=1e-6)


@pytest.fixture
def one_thread():
    """Small batches train faster on one thread, and the machine may be shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(M.MODELS))
def test_training_raises_validation_auc(name, one_thread):
    data = D.synthetic(num_samples=30_000, field_dims=(200, 100, 50, 20, 10), seed=3)
    train, valid = data.split((0.8, 0.2), seed=0)
    torch.manual_seed(0)
    model = M.MODELS[name](train.field_dims, embedding_dim=8, hidden=(64, 32))
    before = M.evaluate(model, valid)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = M.fit(model, train, valid, optimizer, epochs=2, batch_size=512, progress=False)
    assert [h["epoch"] for h in history] == [0, 1]
    assert abs(before["auc"] - 0.5) < 0.05
    assert history[-1]["auc"] > 0.7 and history[-1]["logloss"] < before["logloss"]


def test_evaluate_logloss_matches_direct_computation():
    data = D.synthetic(num_samples=500, field_dims=(9, 4), seed=1)
    model = M.DNN(data.field_dims, embedding_dim=8, hidden=(8,))
    nn.init.normal_(model.out.weight)
    result = M.evaluate(model, data, batch_size=64)
    with torch.no_grad():
        logits = model(data.x).double()
    p, y = torch.sigmoid(logits), data.y.double()
    logloss = -(y * p.log() + (1 - y) * (1 - p).log()).mean().item()
    assert result["logloss"] == pytest.approx(logloss, rel=1e-6)
    assert result["auc"] == pytest.approx(pairwise_auc(logits, data.y), abs=1e-9)


def test_regularizer_is_added_to_the_loss():
    data = D.synthetic(num_samples=300, field_dims=(9, 4), seed=2)
    losses = []
    for penalty in (None, lambda: torch.tensor(0.25)):
        torch.manual_seed(0)
        model = M.DNN(data.field_dims, embedding_dim=8, hidden=(8,))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses.append(M.train_epoch(model, data, optimizer, batch_size=64, progress=False,
                                    regularizer=penalty))
    assert losses[1] - losses[0] == pytest.approx(0.25, abs=1e-6)


def test_early_stopping_restores_best_epoch():
    train = D.synthetic(num_samples=2_000, field_dims=(50, 20, 5), seed=4)
    # validating on flipped labels: the better the model fits, the lower its validation AUC
    flipped = D.CTRDataset(train.x, 1 - train.y, train.field_dims)
    torch.manual_seed(0)
    model = M.DNN(train.field_dims, embedding_dim=8, hidden=(16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = M.fit(model, train, flipped, optimizer, epochs=8, batch_size=200, patience=2,
                    progress=False)
    aucs = [h["auc"] for h in history]
    best = aucs.index(max(aucs))
    assert len(history) == best + 1 + 2 < 8
    assert M.evaluate(model, flipped)["auc"] == pytest.approx(aucs[best], abs=1e-12)


def test_quantized_table_as_factory():
    from qembed import QuantizedEmbedding

    fp32 = M.DCN(FIELD_DIMS, embedding_dim=8, hidden=(16,))
    nn.init.normal_(fp32.embedding.weight)
    quantized = M.DCN(FIELD_DIMS, embedding_dim=8, hidden=(16,),
                      embedding_factory=lambda n, d: QuantizedEmbedding(n, d, bits=8))
    dense = {k: v for k, v in fp32.state_dict().items() if not k.startswith("embedding.")}
    quantized.load_state_dict(dense, strict=False)
    quantized.embedding.load_float_weight(fp32.embedding.weight)
    x = random_ids(32)
    with torch.no_grad():
        expected = fp32(x)
        # the same model on the table's dequantized values
        fp32.embedding.weight.copy_(quantized.embedding.dequantize())
        assert torch.allclose(quantized(x), fp32(x), atol=1e-5)
        assert (quantized(x) - expected).abs().max() < 0.1 * expected.abs().max()
