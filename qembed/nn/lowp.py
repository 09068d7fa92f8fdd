"""Embedding tables trained in low precision (LPT, and ALPT with learned step sizes).

The table exists only as packed signed codes, step sizes and optimizer state: there is never
an fp32 copy. The update runs inside backward (optimizer-in-backward): the lookup is an
autograd function over an empty tensor that requires grad, and its backward computes the
gradient of each distinct row the batch read and calls the fused ``lowp_update`` kernel. A
plain ``loss.backward(); dense_optimizer.step()`` loop therefore trains the whole model.

ALPT's step gradient comes in two flavours (``step_grad``):

* ``"one_pass"``: the step learns from this backward's row gradient, inside the same fused
  update.
* ``"two_pass"`` (the authors' way): the backward updates the rows with the step fixed and
  writes them rounded to nearest; a second forward and backward of the same batch, run by
  :func:`two_pass_backward`, gives the gradient at those weights, from which the step learns
  before the rows are re-quantized with the module's rounding.

The defaults (``"one_pass"``, ``step_lr`` 0.1) did best in benchmarks/alpt_step_grad.py (see
benchmarks/README.md).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from .. import ops
from .._checks import check_bits_dim
from ..formats import STEP_OPTIMIZERS, param_offset, qmax, row_bytes
from ._common import (
    TrainableLookup,
    bag_inputs,
    default_seed,
    normalize_padding_idx,
    row_chunks,
)


class _LowPrecisionTable(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None,
                 max_norm: float | None, scale_grad_by_freq: bool,
                 weight: torch.Tensor | None, device, dtype, *, bits: int, optimizer: str,
                 lr: float, eps: float, weight_decay: float, betas: tuple[float, float],
                 learn_step: bool, step_grad: str, step_lr: float, step_optimizer: str,
                 step_per: str, rounding: str, seed: int | None, init_std: float,
                 fused_update: bool):
        super().__init__()
        check_bits_dim(bits, embedding_dim)
        if max_norm is not None or scale_grad_by_freq:
            raise ValueError("qembed: max_norm and scale_grad_by_freq are not supported by "
                             "low-precision tables")
        if optimizer not in ("sgd", "adagrad", "adam"):
            raise ValueError(f"qembed: optimizer must be 'sgd', 'adagrad' or 'adam', got {optimizer!r}")
        if step_optimizer not in STEP_OPTIMIZERS:
            raise ValueError(f"qembed: step_optimizer must be 'sgd' or 'adam', got {step_optimizer!r}")
        for name, value, allowed in (("step_grad", step_grad, ("one_pass", "two_pass")),
                                     ("step_per", step_per, ("row", "table")),
                                     ("rounding", rounding, ("stochastic", "nearest"))):
            if value not in allowed:
                raise ValueError(f"qembed: {name} must be one of {allowed}, got {value!r}")
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"qembed: output dtype must be float32, float16 or bfloat16, got {dtype}")
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
        self.output_dtype = dtype or torch.float32
        self.format = "symmetric" if step_per == "row" else "symmetric_table"
        self.optimizer, self.lr, self.eps, self.weight_decay = optimizer, lr, eps, weight_decay
        self.betas = tuple(betas)
        self.learn_step, self.step_grad, self.step_lr = learn_step, step_grad, step_lr
        self.step_optimizer, self.step_per, self.rounding = step_optimizer, step_per, rounding
        self.fused_update = fused_update
        self.sparse_grad: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending = None  # two-pass: (rows, fp32 weights) awaiting the step update
        self._step_pass, self._anchors = False, []
        self._warned = False
        seed = default_seed() if seed is None else seed
        self._host_counters = [int(seed), 0]  # [seed, num_updates] as ints, see _counters()
        self.init_std = init_std
        # Where this table sits in a larger one when it is a shard of it (qembed.torchrec's
        # sharding): its first row and column there, and that table's size. Stochastic
        # rounding and the initial values follow the larger table's rows and columns.
        self.row_offset, self.column_offset = 0, 0
        self.full_size = (num_embeddings, embedding_dim)

        width = {"sgd": 0, "adagrad": 1, "adam": 2 * embedding_dim}[optimizer]
        num_steps = num_embeddings if step_per == "row" else 1
        step_width = 2 if learn_step and step_optimizer == "adam" else 0
        self.register_buffer("qweight", ops.table_zeros(
            num_embeddings, row_bytes(embedding_dim, bits, self.format), device=device))
        self.register_buffer("step", torch.ones(1, device=device)
                             if step_per == "table" else None)
        self.register_buffer("state", ops.table_zeros(num_embeddings, width,
                                                       dtype=torch.float32, device=device))
        self.register_buffer("step_state", torch.zeros(num_steps, step_width, device=device))
        # The update counter keys stochastic rounding and drives Adam's bias correction.
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long, device=device))
        self.register_buffer("nonfinite_rows", torch.zeros((), dtype=torch.long, device=device))
        if self.qweight.device.type != "meta":  # a meta table is sized, not filled
            self._init_table(weight, init_std)

    # --- initialisation ---------------------------------------------------------------

    def _weight_chunks(self, weight: torch.Tensor | None, init_std: float):
        """fp32 rows of the initial table (the whole larger table for a shard), a block at a
        time: `weight`'s or N(0, std^2) drawn from a generator seeded by `seed` (padding row
        zero)."""
        gen = torch.Generator(device=self.qweight.device).manual_seed(int(self.seed))
        num_rows, dim = self.full_size
        for start, end in row_chunks(num_rows, dim):
            if weight is None:
                w = torch.randn(end - start, dim, generator=gen,
                                device=self.qweight.device) * init_std
            else:
                w = weight[start:end].detach().to(self.qweight.device, torch.float32).clone()
            if self.padding_idx is not None and start <= self.padding_idx < end:
                w[self.padding_idx - start] = 0
            yield start, end, w

    @torch.no_grad()
    def _init_table(self, weight: torch.Tensor | None, init_std: float) -> None:
        """Steps s0 = 2 mean|w0| / sqrt(Qp) (ALPT; per row or over the table), then codes
        by the module's rounding with update counter 0. A shard computes both over the
        whole larger table and keeps its rows and columns."""
        if weight is not None and tuple(weight.shape) != self.full_size:
            raise ValueError(f"qembed: weight of shape {tuple(weight.shape)} does not match "
                             f"{self.full_size}")
        root_qp = max(qmax(self.bits), 1) ** 0.5

        def whole_table_step() -> float:
            total = torch.zeros((), dtype=torch.float64, device=self.qweight.device)
            for _, _, w in self._weight_chunks(weight, init_std):
                total += w.abs().sum(dtype=torch.float64)
            step = float(2 * total / max(self.full_size[0] * self.full_size[1], 1) / root_qp)
            return step if step > 0 else 1.0

        if self.step is not None:
            self.step.fill_(whole_table_step())
        po = param_offset(self.embedding_dim, self.bits)
        first, last = self.row_offset, self.row_offset + self.num_embeddings
        columns = slice(self.column_offset, self.column_offset + self.embedding_dim)
        # Per-row steps fall back to the table's for rows with none of their own (all zero,
        # such as the padding row): that step takes a pass over the whole table of its own,
        # so it is computed only if such a row exists, and those rows are then re-encoded.
        stepless = []  # (rows, their values) of rows with no step of their own
        for start, end, w in self._weight_chunks(weight, init_std):
            lo, hi = max(start, first), min(end, last)
            if lo >= hi:
                continue
            w = w[lo - start: hi - start]
            rows = torch.arange(lo - first, hi - first, device=w.device)
            if self.step is None:  # per-row steps sit inline after the codes
                s = 2 * w.abs().mean(1) / root_qp
                own = s > 0
                if not bool(own.all()):
                    stepless.append((rows[~own], w[~own][:, columns].clone()))
                s = torch.where(own, s, torch.ones_like(s))
                self.qweight[lo - first: hi - first, po:po + 4] = (
                    s.contiguous().view(torch.uint8).view(-1, 4))
            self._encode(rows, w[:, columns], counter=0)
        if stepless:
            rows = torch.cat([r for r, _ in stepless])
            steps = torch.full((rows.numel(),), whole_table_step(), device=self.qweight.device)
            self.qweight[rows, po:po + 4] = steps.view(torch.uint8).view(-1, 4)
            self._encode(rows, torch.cat([w for _, w in stepless]), counter=0)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to the initial table drawn from ``seed`` (N(0, init_std^2)), with zero
        optimizer state and update count."""
        for t in (self.state, self.step_state, self.num_updates, self.nonfinite_rows):
            t.zero_()
        self._host_counters, self._pending = None, None
        self._init_table(None, self.init_std)

    # --- counters ---------------------------------------------------------------------

    def _counters(self) -> list[int]:
        """[seed, num_updates] as Python ints, read from the buffers once (and again after a
        state_dict load): reading a CUDA tensor's value would wait for the device every step."""
        if self._host_counters is None:
            self._host_counters = [int(self.seed), int(self.num_updates)]
        return self._host_counters

    def _next_update(self) -> int:
        """Counts one update in the buffer and its host copy; returns the new count."""
        counters = self._counters()
        self.num_updates.add_(1)  # `+= 1` re-registers the buffer: 5.8 against 1.5 us a call
        counters[1] += 1
        return counters[1]

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_counters = None

    # --- reading and writing rows -----------------------------------------------------

    def _encode(self, rows: torch.Tensor, weights: torch.Tensor, counter: int) -> None:
        """Quantize fp32 `weights` into the (strictly increasing) `rows` with their current
        steps and the module's rounding, keyed by `counter`."""
        ops.lowp_update(self.qweight, self.step, self.state, self.step_state, rows,
                        torch.zeros_like(weights), self.bits, self.embedding_dim, self.format,
                        "none", stochastic=self.rounding == "stochastic", seed=self._counters()[0],
                        counter=counter, weights=weights.contiguous(),
                        row_offset=self.row_offset, column_offset=self.column_offset)

    def dequantize(self) -> torch.Tensor:
        """The whole table as fp32 [R, D] (a copy, for inspection and export)."""
        return ops.dequantize(self.qweight, self.bits, self.embedding_dim, self.format, self.step)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 values of `rows` [N, D]."""
        return ops.dequantize(self.qweight[rows], self.bits, self.embedding_dim, self.format,
                              self.step)

    @torch.no_grad()
    def write_rows(self, rows: torch.Tensor, weights: torch.Tensor) -> None:
        """Re-quantize fp32 `weights` [N, D] into `rows` (strictly increasing) with the rows'
        current steps: the write half of a user's own optimizer."""
        self._encode(rows, weights.to(torch.float32), self._next_update())

    @property
    def nbytes(self) -> int:
        """Bytes of training state: packed rows (with inline steps), table step, optimizer
        and step-optimizer state."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.step, self.state, self.step_state)
                   if t is not None)

    # --- lookup and update --------------------------------------------------------------

    def _lookup(self, indices, offsets, psw, mode, include_last):
        return ops.embedding_bag(self.qweight, indices, offsets, self.bits, self.embedding_dim,
                                 self.format, self.step, psw, mode, include_last,
                                 self.padding_idx, self.output_dtype)

    def _trainable_lookup(self, indices, offsets, psw, mode, include_last):
        if not self._step_pass:
            self._finish_pending()
        if not torch.is_grad_enabled():
            return self._lookup(indices, offsets, psw, mode, include_last)
        anchor = torch.empty(0, device=self.qweight.device, requires_grad=True)
        if self._step_pass:
            self._anchors.append(anchor)
        return TrainableLookup.apply(anchor, psw, self, indices, offsets, mode, include_last)

    def _psw_backward(self, grad_out, indices, offsets, mode, include_last):
        return ops.embedding_bag_psw_backward(
            grad_out, self.qweight, indices, offsets, self.bits, self.embedding_dim,
            self.format, self.step, mode, include_last, self.padding_idx)

    def _backward(self, grad_out, indices, offsets, psw, mode, include_last):
        rows, grad = ops.embedding_bag_backward(
            grad_out, indices, offsets, None if psw is None else psw.detach(), mode,
            include_last, self.padding_idx)
        self._apply_row_grads(rows, grad)

    def _apply_row_grads(self, rows, grad):
        """What backward does with the gradients of the distinct rows it read: the step pass
        of two-pass ALPT, accumulation for the caller's optimizer, or the fused update."""
        if self._step_pass:
            self._step_update(rows, grad)
        elif not self.fused_update:
            self._accumulate_sparse_grad(rows, grad)
        else:
            self.update_rows(rows, grad)

    def _accumulate_sparse_grad(self, rows, grad):
        if self.sparse_grad is not None:
            rows, inverse = torch.unique(torch.cat([self.sparse_grad[0], rows]),
                                         return_inverse=True)
            grad = torch.zeros(rows.numel(), self.embedding_dim, device=grad.device).index_add_(
                0, inverse, torch.cat([self.sparse_grad[1], grad]))
        self.sparse_grad = (rows, grad)

    def _hyper(self) -> dict:
        return dict(bits=self.bits, dim=self.embedding_dim, fmt=self.format, lr=self.lr,
                    eps=self.eps, weight_decay=self.weight_decay, betas=self.betas,
                    step_optimizer=self.step_optimizer, step_lr=self.step_lr,
                    seed=self._counters()[0], row_offset=self.row_offset,
                    column_offset=self.column_offset)

    @torch.no_grad()
    def update_rows(self, unique_rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """One fused optimizer step for the distinct rows `unique_rows` (strictly increasing)
        with gradient `grad_rows` [U, D]: what backward runs, exposed for ``fused_update=False``
        users who transform the gradient first."""
        self._finish_pending()
        t = self._next_update()
        two_pass = self.learn_step and self.step_grad == "two_pass"
        weights_out = torch.empty_like(grad_rows, dtype=torch.float32) if two_pass else None
        skipped = ops.lowp_update(
            self.qweight, self.step, self.state, self.step_state, unique_rows, grad_rows,
            optimizer=self.optimizer, iteration=t, learn_step=self.learn_step and not two_pass,
            stochastic=self.rounding == "stochastic" and not two_pass, counter=t,
            weights_out=weights_out, **self._hyper())
        if two_pass:
            self._pending = (unique_rows, weights_out)
        self._count_skipped(skipped)

    def _step_update(self, rows, grad):
        """Second pass of two-pass ALPT: the step learns from the gradient at the
        nearest-rounded updated rows, then the kept fp32 rows are re-quantized."""
        if self._pending is None:
            return
        pending_rows, weights = self._pending
        self._pending = None
        if not torch.equal(rows, pending_rows):
            raise RuntimeError("qembed: the second pass of two-pass ALPT must look up the same "
                               "batch as the first")
        t = self._counters()[1]
        with torch.no_grad():
            ops.lowp_update(self.qweight, self.step, self.state, self.step_state, rows, grad,
                            optimizer="none", iteration=t, learn_step=True,
                            stochastic=self.rounding == "stochastic", counter=t,
                            weights=weights, **self._hyper())

    def _finish_pending(self):
        """A first pass whose second pass never came: re-quantize with the step unchanged."""
        if self._pending is not None:
            rows, weights = self._pending
            self._pending = None
            with torch.no_grad():
                self._encode(rows, weights, self._counters()[1])

    def _count_skipped(self, skipped: torch.Tensor) -> None:
        """Adds the update's skipped-row count. On CPU a first skip also warns; on a GPU the
        count stays on the device (a warning would wait for it every step)."""
        self.nonfinite_rows += skipped
        if skipped.device.type != "cpu":
            return
        count = int(skipped)
        if count and not self._warned:
            self._warned = True
            warnings.warn(f"qembed: {count} embedding rows got a non-finite gradient and "
                          "were left unchanged (counted in .nonfinite_rows)", RuntimeWarning)

    def extra_repr(self) -> str:
        s = (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
             f"optimizer={self.optimizer!r}, lr={self.lr}, learn_step={self.learn_step}")
        if self.learn_step:
            s += f", step_grad={self.step_grad!r}, step_lr={self.step_lr}"
        s += f", step_per={self.step_per!r}, rounding={self.rounding!r}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s


_TRAIN_DEFAULTS = dict(bits=8, optimizer="adagrad", lr=0.01, eps=1e-8, weight_decay=0.0,
                       betas=(0.9, 0.999), learn_step=True, step_grad="one_pass", step_lr=0.1,
                       step_optimizer="sgd", step_per="row", rounding="stochastic", seed=None,
                       init_std=0.003, fused_update=True)


class LowPrecisionEmbeddingBag(_LowPrecisionTable):
    """``nn.EmbeddingBag`` trained directly in int-``bits`` (LPT; ALPT with ``learn_step``).

    Takes ``nn.EmbeddingBag``'s arguments (``mode`` ``"sum"`` or ``"mean"``; ``sparse`` is
    accepted and ignored: gradients are always per distinct row) plus:

    * ``bits`` 1..8; ``optimizer`` ``"sgd"``, ``"adagrad"`` (row-wise: one fp32 per row) or
      ``"adam"`` (fp32 moments, 8D bytes per row), with ``lr``, ``eps``, ``weight_decay``,
      ``betas``;
    * ``learn_step`` (ALPT), ``step_grad`` ``"one_pass"`` | ``"two_pass"``, ``step_lr``,
      ``step_optimizer`` ``"sgd"`` | ``"adam"``, ``step_per`` ``"row"`` | ``"table"``;
    * ``rounding`` ``"stochastic"`` | ``"nearest"``, ``seed`` (stochastic rounding and the
      initial table; by default drawn from torch's default generator, so ``torch.manual_seed``
      reproduces a run; kept in ``state_dict``), ``init_std`` (w0 ~ N(0, init_std^2) when
      ``_weight`` is None);
    * ``fused_update=False``: backward only accumulates ``.sparse_grad = (rows, grad_rows)``
      for the caller's own optimizer (see :meth:`update_rows`, :meth:`write_rows`).

    Any ``embedding_dim`` works (rows stored padded to a multiple of 8 codes, see
    :mod:`qembed.ops`; training's divisors count the real columns). ``dtype`` sets the output
    dtype. ``.nonfinite_rows`` counts rows whose update was skipped
    for a non-finite gradient (on CPU the first such row also warns; on a GPU, read the count).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                 sparse: bool = False, _weight: torch.Tensor | None = None,
                 include_last_offset: bool = False, padding_idx: int | None = None,
                 device=None, dtype=None, **train):
        if mode not in ("sum", "mean"):
            raise ValueError(f"qembed: LowPrecisionEmbeddingBag supports mode 'sum' or 'mean', got {mode!r}")
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm,
                         scale_grad_by_freq, _weight, device, dtype,
                         **_train_options(train))
        self.mode, self.include_last_offset = mode, include_last_offset

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        input, offsets, per_sample_weights = bag_inputs(input, offsets, per_sample_weights,
                                                        self.include_last_offset)
        return self._trainable_lookup(input, offsets, per_sample_weights, self.mode,
                                      self.include_last_offset)

    @classmethod
    def from_float(cls, module: nn.EmbeddingBag, **train) -> "LowPrecisionEmbeddingBag":
        """Start training from `module`'s fp32 table (steps from its values)."""
        if module.mode == "max":
            raise ValueError("qembed: mode 'max' is not supported")
        return cls(module.num_embeddings, module.embedding_dim, mode=module.mode,
                   _weight=module.weight, include_last_offset=module.include_last_offset,
                   padding_idx=module.padding_idx, device=module.weight.device, **train)


class LowPrecisionEmbedding(_LowPrecisionTable):
    """``nn.Embedding`` trained directly in int-``bits``; options as
    :class:`LowPrecisionEmbeddingBag`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight: torch.Tensor | None = None, _freeze: bool = False, device=None,
                 dtype=None, **train):
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm,
                         scale_grad_by_freq, _weight, device, dtype, **_train_options(train))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self._trainable_lookup(input.reshape(-1), None, None, "none", False)
        return out.view(*input.shape, self.embedding_dim)

    @classmethod
    def from_float(cls, module: nn.Embedding, **train) -> "LowPrecisionEmbedding":
        return cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                   _weight=module.weight, device=module.weight.device, **train)


def _train_options(train: dict) -> dict:
    unknown = set(train) - set(_TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"qembed: unknown argument(s) {sorted(unknown)}")
    return {**_TRAIN_DEFAULTS, **train}


def two_pass_backward(model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Backward for models with ``step_grad="two_pass"`` tables: ``closure()`` computes the
    loss of one batch. Runs it and its backward (rows updated, dense gradients accumulated);
    then, if any two-pass table updated rows, runs ``closure()`` again and backpropagates
    into those tables only (dense ``.grad`` untouched), which learn their steps from it.
    Returns the first loss."""
    loss = closure()
    loss.backward()
    tables = [m for m in model.modules()
              if isinstance(m, _LowPrecisionTable) and m._pending is not None]
    if not tables:
        return loss
    for t in tables:
        t._step_pass, t._anchors = True, []
    try:
        second = closure()
        anchors = [a for t in tables for a in t._anchors]
        if anchors:
            torch.autograd.backward(second, inputs=anchors)
    finally:
        for t in tables:
            t._step_pass, t._anchors = False, []
            t._finish_pending()
    return loss
