"""The CTR models' outputs, value by value: each logit recomputed here from the modules'
weights (embedding rows by field offset, the MLP, the FM and cross terms), with the whole
model active rather than with parts zeroed."""
import pytest
import torch

from qembed.experiments import models as M

FIELD_DIMS = [7, 3, 11, 5]
STARTS = [0, 7, 10, 21]


def mlp(x, layers):
    """Linear + ReLU per hidden width (dropout 0), as nn.Linear computes: x W^T + b."""
    for layer in layers:
        if isinstance(layer, torch.nn.Linear):
            x = torch.relu(x @ layer.weight.T.double() + layer.bias.double())
    return x


def example(model, batch):
    x = torch.stack([torch.randint(0, d, (batch,)) for d in FIELD_DIMS], 1)
    for p in model.parameters():  # every part of the model away from its initial values
        torch.nn.init.normal_(p, std=0.3)
    table = model.embedding.weight.detach().double()
    e = torch.stack([table[x[:, f] + STARTS[f]] for f in range(len(FIELD_DIMS))], 1)  # [B, F, D]
    return x, e


def head(model, features):
    return features @ model.out.weight.detach().double()[0] + model.out.bias.detach().double()


@pytest.mark.parametrize("hidden", [(16, 8), ()])
def test_dnn_logits(hidden):
    model = M.DNN(FIELD_DIMS, embedding_dim=4, hidden=hidden)
    x, e = example(model, 9)
    want = head(model, mlp(e.flatten(1), model.mlp))
    torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)


def test_deepfm_logits():
    model = M.DeepFM(FIELD_DIMS, embedding_dim=4, hidden=(16,))
    x, e = example(model, 7)
    w = model.linear.weight.detach().double()[:, 0]
    first = sum(w[x[:, f] + STARTS[f]] for f in range(len(FIELD_DIMS)))
    pairs = sum((e[:, i] * e[:, j]).sum(1) for i in range(4) for j in range(i + 1, 4))
    want = head(model, mlp(e.flatten(1), model.mlp)) + first + pairs
    torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)


def test_dcn_logits():
    model = M.DCN(FIELD_DIMS, embedding_dim=4, hidden=(16,), cross_layers=2)
    x, e = example(model, 6)
    x0 = e.flatten(1)
    xl = x0
    for w, b in zip(model.cross_w.detach().double(), model.cross_b.detach().double()):
        xl = x0 * (xl @ w)[:, None] + b + xl
    want = head(model, torch.cat([xl, mlp(x0, model.mlp)], 1))
    torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)
