"""CTR models over one shared embedding table, and their training and evaluation loops.

All fields look up one table of ``sum(field_dims)`` rows (field ``f``'s id ``i`` is row
``offsets[f] + i``), the large table that qembed stores in low precision. The table comes
from ``embedding_factory(num_embeddings, embedding_dim)``, any module with
``nn.Embedding``'s forward (ids [B, F] -> [B, F, D]), so the same model runs on an fp32,
quantized or low-precision-trained table.

* :class:`DNN`: MLP over the concatenated field embeddings.
* :class:`DeepFM`: DNN + factorization machine (first-order weights + pairwise products).
* :class:`DCN`: cross network (DCN v1) beside the DNN, joined by one output layer.

Every model returns one logit per row.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .data import CTRDataset

EmbeddingFactory = Callable[[int, int], nn.Module]


def default_embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """fp32 ``nn.Embedding`` with weights N(0, 0.003^2), the ALPT authors' initialisation."""
    table = nn.Embedding(num_embeddings, embedding_dim)
    nn.init.normal_(table.weight, std=0.003)
    return table


def _mlp(in_features: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    layers = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
        in_features = width
    return nn.Sequential(*layers)


class DNN(nn.Module):
    """Shared field embedding table -> MLP (``hidden`` widths, ReLU, dropout) -> logit."""

    def __init__(self, field_dims: Sequence[int], embedding_dim: int = 16,
                 hidden: Sequence[int] = (400, 400, 400), dropout: float = 0.0,
                 embedding_factory: EmbeddingFactory | None = None):
        super().__init__()
        if not field_dims or min(field_dims) <= 0:
            raise ValueError(f"field_dims must be positive, got {list(field_dims)}")
        self.field_dims = [int(d) for d in field_dims]
        self.embedding_dim = embedding_dim
        self.register_buffer("offsets", torch.tensor([0] + self.field_dims[:-1]).cumsum(0),
                             persistent=False)
        factory = embedding_factory or default_embedding
        self.embedding = factory(sum(self.field_dims), embedding_dim)
        self.mlp = _mlp(len(self.field_dims) * embedding_dim, hidden, dropout)
        self.out = nn.Linear(self._head_features(hidden), 1)

    def _head_features(self, hidden: Sequence[int]) -> int:
        return hidden[-1] if hidden else len(self.field_dims) * self.embedding_dim

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-field ids [B, F] -> rows of the shared table [B, F]."""
        if x.dim() != 2 or x.shape[1] != len(self.field_dims):
            raise ValueError(f"expected ids [B, {len(self.field_dims)}], got {tuple(x.shape)}")
        return x + self.offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding(self.rows(x))
        return self.out(self.mlp(e.flatten(1))).squeeze(1)


class DeepFM(DNN):
    """DNN logit + FM logit (``sum_i w_i + sum_{i<j} <e_i, e_j>``) over the same embeddings.

    The first-order weights are one more table of ``sum(field_dims)`` fp32 scalars; with
    ``linear=False`` it is left out, so that the embedding table is the only per-feature
    storage (the FM term is then pairwise only).
    """

    def __init__(self, field_dims: Sequence[int], embedding_dim: int = 16,
                 hidden: Sequence[int] = (400, 400, 400), dropout: float = 0.0,
                 embedding_factory: EmbeddingFactory | None = None, linear: bool = True):
        super().__init__(field_dims, embedding_dim, hidden, dropout, embedding_factory)
        self.linear = nn.Embedding(sum(self.field_dims), 1) if linear else None
        if linear:
            nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows(x)
        e = self.embedding(rows)
        # sum over pairs i<j of <e_i, e_j> = ((sum e)^2 - sum e^2) / 2, summed over dimensions
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        if self.linear is not None:
            fm = fm + self.linear(rows).sum((1, 2))
        return self.out(self.mlp(e.flatten(1))).squeeze(1) + fm


class DCN(DNN):
    """Deep & Cross Network: ``cross_layers`` layers ``x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l``
    on the flat embeddings, in parallel with the MLP; one linear layer reads both."""

    def __init__(self, field_dims: Sequence[int], embedding_dim: int = 16,
                 hidden: Sequence[int] = (400, 400, 400), dropout: float = 0.0,
                 embedding_factory: EmbeddingFactory | None = None, cross_layers: int = 3):
        super().__init__(field_dims, embedding_dim, hidden, dropout, embedding_factory)
        width = len(self.field_dims) * embedding_dim
        self.cross_w = nn.Parameter(torch.empty(cross_layers, width))
        self.cross_b = nn.Parameter(torch.zeros(cross_layers, width))
        nn.init.normal_(self.cross_w, std=width ** -0.5)

    def _head_features(self, hidden: Sequence[int]) -> int:
        return super()._head_features(hidden) + len(self.field_dims) * self.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.embedding(self.rows(x)).flatten(1)
        xl = x0
        for w, b in zip(self.cross_w, self.cross_b):
            xl = x0 * (xl @ w).unsqueeze(1) + b + xl
        return self.out(torch.cat([xl, self.mlp(x0)], 1)).squeeze(1)


MODELS = {"dnn": DNN, "deepfm": DeepFM, "dcn": DCN}


# --- training and evaluation ---------------------------------------------------------------

def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (Mann-Whitney U with average ranks)."""
    scores, labels = scores.detach().flatten().double(), labels.detach().flatten()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.numel()} scores for {labels.numel()} labels")
    positive = labels > 0.5
    num_pos = int(positive.sum())
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # tied scores share the mean of the 1-based ranks they span
    last = counts.cumsum(0).double()
    mean_rank = last - (counts.double() - 1) / 2
    rank_sum = mean_rank[inverse][positive].sum().item()
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_epoch(model: nn.Module, data: CTRDataset, optimizer: torch.optim.Optimizer,
                batch_size: int = 2048, seed: int = 0, progress: bool = True,
                regularizer: Callable[[], torch.Tensor] | None = None) -> float:
    """One pass over ``data`` in a seeded random order with binary cross-entropy on the logits
    (plus ``regularizer()`` per batch, if given); returns the mean batch loss."""
    model.train()
    device = _device(model)
    total, steps = 0.0, 0
    bar = tqdm(data.batches(batch_size, shuffle=True, seed=seed), desc="train", unit=" batch",
               total=-(-len(data) // batch_size), leave=False, disable=not progress)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        if regularizer is not None:
            loss = loss + regularizer()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
        bar.set_postfix(loss=f"{total / steps:.4f}", refresh=False)
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: CTRDataset, batch_size: int = 8192) -> dict[str, float]:
    """``{"auc", "logloss"}`` of the model's predictions on ``data``."""
    model.eval()
    device = _device(model)
    logits = torch.cat([model(x.to(device)).float().cpu() for x, _ in data.batches(batch_size)])
    y = data.y.cpu()
    return {"auc": roc_auc(logits, y),
            "logloss": F.binary_cross_entropy_with_logits(logits.double(), y.double()).item()}


def fit(model: nn.Module, train: CTRDataset, valid: CTRDataset,
        optimizer: torch.optim.Optimizer, epochs: int = 1, batch_size: int = 2048,
        patience: int | None = None, seed: int = 0, progress: bool = True,
        regularizer: Callable[[], torch.Tensor] | None = None) -> list[dict[str, float]]:
    """Train for up to ``epochs`` epochs, evaluating on ``valid`` after each; returns one
    ``{"epoch", "train_loss", "auc", "logloss"}`` per epoch. With ``patience``, stop after
    that many epochs without a better validation AUC and restore the best epoch's state."""
    history, best_auc, best_state, stale = [], -1.0, None, 0
    for epoch in range(epochs):
        loss = train_epoch(model, train, optimizer, batch_size, seed + epoch, progress,
                           regularizer)
        history.append({"epoch": epoch, "train_loss": loss, **evaluate(model, valid)})
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in history[-1].items()))
        if patience is None:
            continue
        if history[-1]["auc"] > best_auc:
            best_auc, best_state, stale = history[-1]["auc"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
