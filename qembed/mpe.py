"""Mixed-precision embeddings (MPE), the algorithm: frequency groups, sampling the searched
widths, and the size report. The tables are in :mod:`qembed.nn`.

The whole flow on a CTR model (see :mod:`qembed.experiments.runner`, method ``"mpe"``)::

    counts = train.feature_counts()           # ids by training frequency within each field:
    train, valid = train.renumbered(counts), valid.renumbered(counts)   # groups are id runs
    groups = frequency_groups(train.feature_counts(), num_groups=128)
    model = DNN(field_dims, embedding_factory=lambda r, d: MixedPrecisionSearchEmbedding(
        r, d, groups=groups, reg_lambda=1e-6))
    fit(model, train, valid, opt, regularizer=model.embedding.bit_loss)   # search
    retrained = qembed.retrain_model(model)   # initial table at the sampled widths
    fit(retrained, train, valid, opt2)        # retrain: packed codes, lowp updates
    retrained.embedding.export()              # inference table
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FrequencyGroups:
    """Rows cut by decreasing frequency into groups of equal size (sizes differ by at most
    one, larger groups first); group 0 holds the most frequent rows."""

    counts: torch.Tensor  # int64 [R]: occurrences of each row
    order: torch.Tensor  # int64 [R]: rows by decreasing count, ties by increasing id
    group: torch.Tensor  # int64 [R]: group of each row
    slot: torch.Tensor  # int64 [R]: position of each row within its group (in `order`)
    sizes: torch.Tensor  # int64 [G]
    weight: torch.Tensor  # float32 [G]: cnt_g = group count sum / smallest group sum

    @property
    def num_groups(self) -> int:
        return self.sizes.numel()


def frequency_groups(counts: torch.Tensor | None = None, *, indices: torch.Tensor | None = None,
                     num_rows: int | None = None, num_groups: int = 128) -> FrequencyGroups:
    """Groups from per-row ``counts`` [R], or counted from an index stream ``indices`` over
    ``num_rows`` rows. ``num_groups`` (the authors' 128) shrinks to R when there are fewer
    rows. Group weights ``cnt_g = max(sum_g, 1) / max(min_g' sum_g', 1)``: a group never seen
    counts as if seen once, so the bit regulariser (which divides by cnt_g) stays finite."""
    if (counts is None) == (indices is None):
        raise ValueError("qembed.frequency_groups: give either counts or indices")
    if indices is not None:
        if num_rows is None:
            raise ValueError("qembed.frequency_groups: indices need num_rows")
        flat = indices.reshape(-1).long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_rows):
            raise IndexError(f"qembed.frequency_groups: an index is outside [0, {num_rows})")
        counts = torch.bincount(flat, minlength=num_rows)
    counts = counts.reshape(-1).long().cpu()
    if not counts.numel():
        raise ValueError("qembed.frequency_groups: no rows")
    if (counts < 0).any():
        raise ValueError("qembed.frequency_groups: counts must be non-negative")
    if num_groups < 1:
        raise ValueError(f"qembed.frequency_groups: num_groups must be positive, got {num_groups}")
    rows = counts.numel()
    g = min(num_groups, rows)
    order = torch.sort(counts, descending=True, stable=True).indices
    sizes = torch.full((g,), rows // g, dtype=torch.long)
    sizes[: rows % g] += 1
    group = torch.empty(rows, dtype=torch.long)
    slot = torch.empty(rows, dtype=torch.long)
    group[order] = torch.repeat_interleave(torch.arange(g), sizes)
    slot[order] = torch.arange(rows) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    sums = torch.zeros(g, dtype=torch.long).index_add_(0, group, counts)
    weight = sums.clamp(min=1).double() / sums.min().clamp(min=1).double()
    return FrequencyGroups(counts, order, group, slot, sizes, weight.float())


def sample_bits(probs: torch.Tensor, candidate_bits) -> torch.Tensor:
    """Per group (row of ``probs`` [G, m]) the largest candidate width whose probability is
    at least 1/(2m); int64 [G]. The candidate of highest probability always qualifies."""
    bits = torch.as_tensor(list(candidate_bits), dtype=torch.long)
    if probs.dim() != 2 or probs.shape[1] != bits.numel():
        raise ValueError(f"qembed.sample_bits: probs must be [G, {bits.numel()}], got "
                         f"{tuple(probs.shape)}")
    ok = probs.detach().cpu() >= 1.0 / (2 * bits.numel())
    return torch.where(ok, bits, torch.full_like(bits, -1)).amax(1)


@dataclass
class MixedPrecisionReport:
    """What a sample costs: widths per group and per row, average bits per value (weighted
    by rows), and bytes against fp32. ``table_bytes`` counts the packed codes (rows padded
    as the stored table pads them), the steps, beta and the row locations (row ranges, or a
    row map where ids are not numbered by frequency); ``code_bytes`` leaves the locations
    out."""

    group_bits: list[int]
    group_sizes: list[int]
    average_bits: float
    fp32_bytes: int
    table_bytes: int
    code_bytes: int

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.table_bytes

    @property
    def code_compression(self) -> float:
        return self.fp32_bytes / self.code_bytes


def report(table) -> MixedPrecisionReport:
    """The report of a :class:`qembed.nn.MixedPrecisionEmbedding` (or Bag) table."""
    widths = table.row_bits.double()
    return MixedPrecisionReport(
        group_bits=[int(b) for b in table.group_bits] if table.group_bits is not None else [],
        group_sizes=[int(s) for s in table.group_sizes] if table.group_sizes is not None else [],
        average_bits=float(widths.mean()), fp32_bytes=table.num_embeddings * table.embedding_dim * 4,
        table_bytes=table.nbytes, code_bytes=table.nbytes - table.location.numel() * table.location.element_size())
