"""Mixed-precision embedding tables: the search on an fp32 table and the mixed-width table
that retraining and inference use.

Search (:class:`MixedPrecisionSearchEmbeddingBag`, :class:`MixedPrecisionSearchEmbedding`):
an fp32 table, one LSQ+ step ``alpha_b`` per candidate width (a scalar per table), one
offset ``beta`` [D] shared by all widths, and per frequency group logits ``gamma`` [G, m].
The lookup returns ``sum_b p_{g(r),b} Q_b(w_r)`` with ``p_g = softmax(gamma_g / tau)`` and
``Q_0 = 0``; all gradients (table, alpha, beta, probabilities) come from one fused pass
(``mpe_search_forward`` / ``mpe_search_backward``). The table's gradient is dense [R, D]:
the search trains an fp32 table anyway, with the model's dense optimizer.

Mixed-width table (:class:`MixedPrecisionEmbeddingBag`, :class:`MixedPrecisionEmbedding`):
rows are stored by width, one segment of offset-binary codes per width (groups of equal
width share a segment: they share alpha_b and beta), read as ``alpha_b * q + beta``; 0-bit
rows store nothing and read as zeros. ``location`` maps a feature id to its position in the
concatenated segments (-1: pruned), in whichever of two layouts is smaller: row ranges
(int32 [K + 1, 2], one per run of ids of equal width: a few hundred when ids are numbered by
frequency, as :meth:`qembed.experiments.data.CTRDataset.renumbered` does) or a row map (int16 [R] up to
2^15 rows, else int32). One kernel (``mpe_embedding_bag``)
serves a batch mixing widths. Retraining updates each segment in place with ``lowp_update``
(per-table step alpha_b, stochastic rounding by default): there is no fp32 table.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from .. import ops
from .._checks import check_bits_dim
from ..formats import code_bytes, qmax, row_bytes
from ..mpe import FrequencyGroups, frequency_groups, sample_bits
from ._common import TrainableLookup, bag_inputs, default_seed, row_chunks

DEFAULT_BITS = tuple(range(7))


class _SearchTable(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int,
                 groups: FrequencyGroups | torch.Tensor | None, candidate_bits, tau: float,
                 reg_lambda: float, num_groups: int, init_std: float,
                 weight: torch.Tensor | None, device):
        super().__init__()
        bits = [int(b) for b in candidate_bits]
        if not bits or any(not 0 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
            raise ValueError(f"qembed: candidate bit widths must be distinct values in 0..8, got {bits}")
        check_bits_dim(8, embedding_dim)
        if tau <= 0:
            raise ValueError(f"qembed: tau must be positive, got {tau}")
        if groups is None:  # no frequencies known: all rows equally frequent
            groups = torch.ones(num_embeddings, dtype=torch.long)
        if isinstance(groups, torch.Tensor):
            groups = frequency_groups(groups, num_groups=num_groups)
        if groups.group.numel() != num_embeddings:
            raise ValueError(f"qembed: groups cover {groups.group.numel()} rows, the table has "
                             f"{num_embeddings}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.candidate_bits, self.tau, self.reg_lambda = bits, tau, reg_lambda
        self.groups = groups
        if weight is None:  # drawn from torch's default generator, in place
            weight = torch.empty(num_embeddings, embedding_dim, device=device).normal_(0, init_std)
        elif tuple(weight.shape) != (num_embeddings, embedding_dim):
            raise ValueError(f"qembed: weight of shape {tuple(weight.shape)} does not match "
                             f"({num_embeddings}, {embedding_dim})")
        else:
            weight = weight.detach().to(device=device, dtype=torch.float32).clone()
        self.weight = nn.Parameter(weight)
        # Retraining restarts from the initial table.
        self.register_buffer("initial_weight", weight.clone())
        total = sum(weight[start:end].abs().sum(dtype=torch.float64)
                    for start, end in row_chunks(num_embeddings, embedding_dim))
        mean_abs = float(total / max(weight.numel(), 1)) or 1.0
        self.alpha = nn.Parameter(torch.tensor(  # ALPT's init 2 mean|w| / sqrt(Qp)
            [2 * mean_abs / max(qmax(b) if b else 1, 1) ** 0.5 for b in bits], device=device))
        self.beta = nn.Parameter(torch.zeros(embedding_dim, device=device))
        self.logits = nn.Parameter(torch.zeros(groups.num_groups, len(bits), device=device))
        self.register_buffer("row_group", groups.group.to(device))
        self.register_buffer("group_weight", groups.weight.to(device))
        self.register_buffer("bits_tensor", torch.tensor(bits, dtype=torch.float32, device=device),
                             persistent=False)

    def probs(self) -> torch.Tensor:
        """p_g = softmax(gamma_g / tau), [G, m]."""
        return torch.softmax(self.logits / self.tau, dim=1)

    def bit_loss(self) -> torch.Tensor:
        """The bit regulariser ``lambda * sum_g sum_b p_gb * b / cnt_g``: add it to the loss
        (``fit(..., regularizer=table.bit_loss)``)."""
        return self.reg_lambda * ((self.probs() @ self.bits_tensor) / self.group_weight).sum()

    def sample(self) -> torch.Tensor:
        """Per group the largest width with probability >= 1/(2m): int64 [G]."""
        return sample_bits(self.probs(), self.candidate_bits)

    def _lookup(self, indices, offsets, mode, include_last):
        # A step pushed to zero or below by its optimizer would break the quantizer.
        alpha = self.alpha.abs().clamp_min(1e-12)
        return ops.mpe_search_forward(self.weight, indices, offsets, self.row_group,
                                      self.probs(), alpha, self.beta, self.candidate_bits, mode,
                                      include_last)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.candidate_bits}, "
                f"groups={self.groups.num_groups}, tau={self.tau}, reg_lambda={self.reg_lambda}")


class MixedPrecisionSearchEmbeddingBag(_SearchTable):
    """``nn.EmbeddingBag`` (``mode`` ``"sum"`` or ``"mean"``, no per-sample weights) that
    searches a bit width per frequency group. ``groups``: a :class:`FrequencyGroups` or the
    rows' counts (cut into ``num_groups``); ``candidate_bits`` (default 0..6), ``tau``
    (3e-3), ``reg_lambda`` (authors: Avazu 2e-6, Criteo 3e-4)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "mean",
                 include_last_offset: bool = False, _weight: torch.Tensor | None = None,
                 device=None, *, groups=None, candidate_bits=DEFAULT_BITS, tau: float = 3e-3,
                 reg_lambda: float = 0.0, num_groups: int = 128, init_std: float = 0.003):
        if mode not in ("sum", "mean"):
            raise ValueError(f"qembed: mode must be 'sum' or 'mean', got {mode!r}")
        super().__init__(num_embeddings, embedding_dim, groups, candidate_bits, tau, reg_lambda,
                         num_groups, init_std, _weight, device)
        self.mode, self.include_last_offset = mode, include_last_offset

    def forward(self, input, offsets=None, per_sample_weights=None):
        if per_sample_weights is not None:
            raise ValueError("qembed: the mixed-precision search takes no per_sample_weights")
        input, offsets, _ = bag_inputs(input, offsets, None, self.include_last_offset)
        return self._lookup(input, offsets, self.mode, self.include_last_offset)


class MixedPrecisionSearchEmbedding(_SearchTable):
    """``nn.Embedding``'s forward (ids [...] -> [..., D]) over the search; options as
    :class:`MixedPrecisionSearchEmbeddingBag`."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 _weight: torch.Tensor | None = None, device=None, *, groups=None,
                 candidate_bits=DEFAULT_BITS, tau: float = 3e-3, reg_lambda: float = 0.0,
                 num_groups: int = 128, init_std: float = 0.003):
        super().__init__(num_embeddings, embedding_dim, groups, candidate_bits, tau, reg_lambda,
                         num_groups, init_std, _weight, device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self._lookup(input.reshape(-1), None, "none", False)
        return out.view(*input.shape, self.embedding_dim)


# --- the mixed-width table ---------------------------------------------------------------

_TRAIN_DEFAULTS = dict(optimizer="adagrad", lr=0.01, eps=1e-8, weight_decay=0.0,
                       betas=(0.9, 0.999), learn_step=False, step_optimizer="sgd", step_lr=0.0,
                       rounding="stochastic", seed=None)


class _MixedTable(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, row_bits: torch.Tensor,
                 trainable: bool, dtype, device, train: dict):
        super().__init__()
        unknown = set(train) - set(_TRAIN_DEFAULTS)
        if unknown:
            raise TypeError(f"qembed: unknown argument(s) {sorted(unknown)}")
        train = {**_TRAIN_DEFAULTS, **train}
        if train["optimizer"] not in ("sgd", "adagrad", "adam"):
            raise ValueError(f"qembed: optimizer must be 'sgd', 'adagrad' or 'adam', got {train['optimizer']!r}")
        if train["rounding"] not in ("stochastic", "nearest"):
            raise ValueError(f"qembed: rounding must be 'stochastic' or 'nearest', got {train['rounding']!r}")
        row_bits = torch.as_tensor(row_bits, dtype=torch.long).reshape(-1).cpu()
        if row_bits.numel() != num_embeddings:
            raise ValueError(f"qembed: row_bits has {row_bits.numel()} entries for "
                             f"{num_embeddings} rows")
        if row_bits.numel() and (int(row_bits.min()) < 0 or int(row_bits.max()) > 8):
            raise ValueError("qembed: row widths must be in 0..8")
        if num_embeddings >= 2**31:
            raise ValueError("qembed: row locations are int32: at most 2^31 - 1 rows")
        check_bits_dim(8, embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.trainable, self.train_options = trainable, train
        self.output_dtype = dtype or torch.float32
        self.group_bits = self.group_sizes = None  # set by from_search, for reports
        present = torch.bincount(row_bits, minlength=9).tolist()  # no sorted copy of row_bits
        self.widths = [b for b in range(1, 9) if present[b]]
        positions = torch.full((num_embeddings,), -1, dtype=torch.int32)
        start = 0
        state_width = {"sgd": 0, "adagrad": 1, "adam": 2 * embedding_dim}[train["optimizer"]]
        step_width = 2 if train["learn_step"] and train["step_optimizer"] == "adam" else 0
        for b in self.widths:
            rows = torch.nonzero(row_bits == b).flatten()  # ascending: slots follow ids
            positions[rows] = torch.arange(start, start + rows.numel(), dtype=torch.int32)
            start += rows.numel()
            # Trainable segments keep lowp_update's row layout (codes padded to 4 bytes);
            # inference segments hold the codes only.
            width = row_bytes(embedding_dim, b, "symmetric_table") if trainable else code_bytes(embedding_dim, b)
            self.register_buffer(f"codes{b}", ops.table_zeros(rows.numel(), width, device=device))
            if trainable:
                self.register_buffer(f"state{b}", ops.table_zeros(
                    rows.numel(), state_width, dtype=torch.float32, device=device))
                self.register_buffer(f"step_state{b}", torch.zeros(1, step_width, device=device))
        self.register_buffer("location", _compact_location(positions, row_bits).to(device))
        self.register_buffer("steps", torch.ones(len(self.widths), device=device))
        self.register_buffer("beta", torch.zeros(embedding_dim, device=device))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=device))
        seed = train.pop("seed")
        if trainable:  # stochastic rounding's key; by default from torch's default generator
            seed = default_seed() if seed is None else int(seed)
            self.register_buffer("seed", torch.tensor(seed, dtype=torch.long, device=device))

    def positions(self, rows: torch.Tensor) -> torch.Tensor:
        """Storage positions of ``rows`` (ids, int64) in the concatenated segments, -1 for
        pruned rows; int64."""
        loc = self.location
        if loc.dim() == 1:
            return loc[rows].long()
        first = loc[:, 0].long()
        k = torch.searchsorted(first[:-1], rows, right=True) - 1
        start = loc[k, 1].long()
        return torch.where(start < 0, -1, start + rows - first[k])

    @property
    def row_bits(self) -> torch.Tensor:
        """Width of every row, int64 [R] (0: pruned)."""
        out = torch.zeros(self.num_embeddings, dtype=torch.long, device=self.location.device)
        loc = self.positions(torch.arange(self.num_embeddings, device=self.location.device))
        start = 0
        for b in self.widths:
            n = getattr(self, f"codes{b}").shape[0]
            out[(loc >= start) & (loc < start + n)] = b
            start += n
        return out

    def segments(self) -> list[torch.Tensor]:
        return [getattr(self, f"codes{b}") for b in self.widths]

    @property
    def nbytes(self) -> int:
        """Bytes of the table as stored: every segment's packed rows, the row locations, the
        steps and beta (optimizer state excluded, see :attr:`state_nbytes`)."""
        return sum(t.numel() * t.element_size()
                   for t in self.segments() + [self.location, self.steps, self.beta])

    @property
    def state_nbytes(self) -> int:
        """Bytes of retraining's optimizer state."""
        if not self.trainable:
            return 0
        return sum(getattr(self, f"{n}{b}").numel() * 4 for b in self.widths
                   for n in ("state", "step_state"))

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor, steps: torch.Tensor,
                          beta: torch.Tensor) -> None:
        """Quantize fp32 ``weight`` [R, D] with one step per width (``steps`` aligned with
        :attr:`widths`) and offset ``beta``, rounding to nearest: each row becomes its
        Q_b(w) of the search."""
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"qembed: weight of shape {tuple(weight.shape)} does not match "
                             f"({self.num_embeddings}, {self.embedding_dim})")
        steps = steps.detach().to(self.steps.device, torch.float32).reshape(-1)
        if steps.numel() != len(self.widths) or not (steps > 0).all():
            raise ValueError(f"qembed: need {len(self.widths)} positive steps, one per width")
        self.steps.copy_(steps)
        self.beta.copy_(beta.detach().reshape(-1))
        bits = self.row_bits
        for s, b in enumerate(self.widths):
            codes = getattr(self, f"codes{b}")
            ids = torch.nonzero(bits == b).flatten().to(weight.device)  # slot k holds ids[k]
            for start, end in row_chunks(ids.numel(), self.embedding_dim):
                values = weight[ids[start:end]].detach().to(self.beta.device, torch.float32)
                values = (values - self.beta).contiguous()
                block = codes[start:end] if self.trainable else torch.zeros(
                    end - start, row_bytes(self.embedding_dim, b, "symmetric_table"),
                    dtype=torch.uint8, device=codes.device)
                ops.lowp_update(block, self.steps[s: s + 1], torch.zeros(0, 0), torch.zeros(0, 0),
                                torch.arange(end - start, device=codes.device),
                                torch.zeros_like(values), b, self.embedding_dim,
                                "symmetric_table", "none", stochastic=False, weights=values)
                if not self.trainable:
                    codes[start:end] = block[:, : codes.shape[1]]

    def dequantize(self) -> torch.Tensor:
        """The whole table as fp32 [R, D] (a copy, for inspection)."""
        ids = torch.arange(self.num_embeddings, device=self.location.device)
        return self._lookup(ids, None, None, "none", False).float()

    def _lookup(self, indices, offsets, psw, mode, include_last):
        return ops.mpe_embedding_bag(self.segments(), self.widths, self.steps, self.beta,
                                     self.location, indices, offsets, psw, mode, include_last,
                                     self.output_dtype)

    def _table_lookup(self, indices, offsets, psw, mode, include_last):
        if not (self.trainable and self.training and torch.is_grad_enabled()):
            return self._lookup(indices, offsets, psw, mode, include_last)
        if psw is not None and psw.requires_grad:
            raise ValueError("qembed: per_sample_weights get no gradient from a retrained "
                             "mixed-precision table")
        anchor = torch.empty(0, device=self.beta.device, requires_grad=True)
        return TrainableLookup.apply(anchor, psw, self, indices, offsets, mode, include_last)

    @torch.no_grad()
    def _backward(self, grad_out, indices, offsets, psw, mode, include_last):
        """Retraining step, called by the lookup's backward: the gradient of each distinct
        row, then one lowp_update per width segment on the rows it holds (the codes store
        w - beta, whose gradient is w's)."""
        rows, grad = ops.embedding_bag_backward(grad_out, indices, offsets, psw, mode,
                                                include_last, None)
        self.num_updates.add_(1)  # in place: `+= 1` re-registers the buffer
        t, o, seed = int(self.num_updates), self.train_options, int(self.seed)
        # Storage positions of the touched rows, sorted: each segment's rows are then one
        # slice, still in increasing order (slots follow ids within a width), found with one
        # host read of the slice bounds instead of a masked selection per segment.
        loc, order = torch.sort(self.positions(rows))
        grad = grad.index_select(0, order)  # a third of advanced indexing's time on CPU
        starts = list(itertools.accumulate(
            [0] + [getattr(self, f"codes{b}").shape[0] for b in self.widths]))
        # pruned rows (-1) sort first
        bounds = torch.searchsorted(loc, torch.tensor(starts, device=loc.device)).tolist()
        for s, b in enumerate(self.widths):
            lo, hi = bounds[s], bounds[s + 1]
            if hi > lo:
                ops.lowp_update(
                    getattr(self, f"codes{b}"), self.steps[s: s + 1], getattr(self, f"state{b}"),
                    getattr(self, f"step_state{b}"), loc[lo:hi] - starts[s],
                    grad[lo:hi].contiguous(), b, self.embedding_dim, "symmetric_table",
                    o["optimizer"], o["lr"], o["eps"], o["weight_decay"], tuple(o["betas"]), t,
                    o["learn_step"], o["step_optimizer"], o["step_lr"],
                    o["rounding"] == "stochastic",
                    seed + 1_000_003 * b, t)  # each segment its own random stream

    def export(self) -> "_MixedTable":
        """An inference copy: codes without training padding, no optimizer state."""
        out = type(self)(self.num_embeddings, self.embedding_dim, self.row_bits,
                         trainable=False, dtype=self.output_dtype, device=self.beta.device,
                         **self._mode_kwargs())
        with torch.no_grad():
            for b in self.widths:
                dst = getattr(out, f"codes{b}")
                dst.copy_(getattr(self, f"codes{b}")[:, : dst.shape[1]])
            for name in ("location", "steps", "beta"):
                getattr(out, name).copy_(getattr(self, name))
        out.group_bits, out.group_sizes = self.group_bits, self.group_sizes
        return out

    def _mode_kwargs(self) -> dict:
        return {}

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, widths={self.widths}, "
                f"trainable={self.trainable}")


def _compact_location(positions: torch.Tensor, row_bits: torch.Tensor) -> torch.Tensor:
    """The smaller layout of the rows' ``positions`` (int32 [R], consecutive within a run of
    equal ``row_bits``): row ranges int32 [K + 1, 2] (first row and its position per run, then
    [R, -1]) or a row map, int16 while positions fit, else int32."""
    rows = positions.numel()
    change = torch.ones(rows, dtype=torch.bool)
    change[1:] = row_bits[1:] != row_bits[:-1]
    narrow = rows <= 2**15
    if (int(torch.count_nonzero(change)) + 1) * 8 >= rows * (2 if narrow else 4):  # map smaller
        return positions.to(torch.int16) if narrow else positions
    first = torch.nonzero(change).flatten()
    return torch.cat([torch.stack([first, positions[first].long()], 1),
                      torch.tensor([[rows, -1]])]).to(torch.int32)


class MixedPrecisionEmbeddingBag(_MixedTable):
    """``nn.EmbeddingBag`` (``mode`` ``"sum"`` or ``"mean"``) over a mixed-width table:
    ``row_bits`` [R] gives each row's width (0..8; 0 = pruned); any ``embedding_dim`` (rows
    stored padded to a multiple of 8 codes, see :mod:`qembed.ops`). ``trainable`` keeps the
    retraining state (``train`` options: ``optimizer`` sgd/adagrad/adam, ``lr``, ``eps``,
    ``weight_decay``, ``betas``, ``learn_step`` (ALPT step update of alpha_b),
    ``step_optimizer``, ``step_lr``, ``rounding``, ``seed``: stochastic rounding's key, by
    default drawn from torch's default generator, kept in ``state_dict``); :meth:`export`
    drops it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, row_bits: torch.Tensor,
                 mode: str = "mean", include_last_offset: bool = False, *,
                 trainable: bool = True, dtype=None, device=None, **train):
        if mode not in ("sum", "mean"):
            raise ValueError(f"qembed: mode must be 'sum' or 'mean', got {mode!r}")
        super().__init__(num_embeddings, embedding_dim, row_bits, trainable, dtype, device, train)
        self.mode, self.include_last_offset = mode, include_last_offset

    def _mode_kwargs(self) -> dict:
        return dict(mode=self.mode, include_last_offset=self.include_last_offset)

    def forward(self, input, offsets=None, per_sample_weights=None):
        input, offsets, per_sample_weights = bag_inputs(input, offsets, per_sample_weights,
                                                        self.include_last_offset)
        return self._table_lookup(input, offsets, per_sample_weights, self.mode,
                                  self.include_last_offset)


class MixedPrecisionEmbedding(_MixedTable):
    """``nn.Embedding``'s forward (ids [...] -> [..., D]) over a mixed-width table; options
    as :class:`MixedPrecisionEmbeddingBag`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, row_bits: torch.Tensor, *,
                 trainable: bool = True, dtype=None, device=None, **train):
        super().__init__(num_embeddings, embedding_dim, row_bits, trainable, dtype, device, train)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self._table_lookup(input.reshape(-1), None, None, "none", False)
        return out.view(*input.shape, self.embedding_dim)


def from_search(search: _SearchTable, group_bits: torch.Tensor | None = None,
                **train) -> _MixedTable:
    """The mixed-width table of a search: each group at its sampled width (or
    ``group_bits`` [G]), the table reset to the search's initial values, quantized with the
    searched alpha_b and beta (rounded to nearest)."""
    group_bits = search.sample() if group_bits is None else torch.as_tensor(group_bits).long()
    if group_bits.numel() != search.groups.num_groups:
        raise ValueError(f"qembed: {group_bits.numel()} widths for {search.groups.num_groups} groups")
    row_bits = group_bits.to(search.row_group.device)[search.row_group]
    device = search.weight.device
    if isinstance(search, MixedPrecisionSearchEmbeddingBag):
        table = MixedPrecisionEmbeddingBag(search.num_embeddings, search.embedding_dim, row_bits,
                                           search.mode, search.include_last_offset,
                                           device=device, **train)
    else:
        table = MixedPrecisionEmbedding(search.num_embeddings, search.embedding_dim, row_bits,
                                        device=device, **train)
    alpha = search.alpha.detach().abs().clamp_min(1e-12)
    steps = torch.stack([alpha[search.candidate_bits.index(b)] for b in table.widths]) \
        if table.widths else alpha.new_zeros(0)
    table.load_float_weight(search.initial_weight, steps, search.beta)
    table.group_bits, table.group_sizes = group_bits.cpu(), search.groups.sizes
    return table


def retrain_model(search_model: nn.Module, **train) -> nn.Module:
    """The retrain phase's model: a copy of ``search_model`` (dense network and everything
    else as searched) whose search tables become :class:`MixedPrecisionEmbedding` /
    ``Bag`` tables built by ``from_search``: the table reset to its initial values, each
    group fixed at its sampled width, the searched alpha and beta kept. ``train`` goes to
    the tables (optimizer, lr, rounding, ...). Train it again with any dense optimizer loop:
    the tables update themselves in backward through ``lowp_update``."""
    model = copy.deepcopy(search_model)
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, _SearchTable)]
    if not swaps and not isinstance(model, _SearchTable):
        raise ValueError("qembed.retrain_model: the model has no mixed-precision search table")
    if isinstance(model, _SearchTable):
        return from_search(model, **train)
    for parent, name, child in swaps:
        setattr(parent, name, from_search(child, **train))
    return model
