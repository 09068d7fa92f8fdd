"""Quantized drop-in replacements for ``nn.EmbeddingBag`` and ``nn.Embedding`` (inference)."""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from .. import ops
from .._checks import check_bits_dim
from ..formats import format_id, param_offset, row_bytes
from ._common import bag_inputs, default_seed, normalize_padding_idx, row_chunks, symmetric_steps

_AO_PARAM_DTYPE = {8: torch.float32, 4: torch.float16, 2: torch.float16}


class _QuantizedTable(nn.Module):
    """A packed table ``qweight`` (uint8 [R, row_bytes]) plus a per-table ``step`` buffer for
    the ``symmetric_table`` format. No fp32 copy of the table is kept."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, format: str,
                 padding_idx: int | None, max_norm: float | None, weight: torch.Tensor | None,
                 device, dtype):
        super().__init__()
        check_bits_dim(bits, embedding_dim)
        format_id(format)
        if max_norm is not None:
            raise ValueError("qembed: max_norm is not supported by quantized tables "
                             "(renormalize the fp32 weights before quantizing)")
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"qembed: output dtype must be float32, float16 or bfloat16, got {dtype}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.format = bits, format
        self.padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
        self.output_dtype = dtype or torch.float32
        self.register_buffer("qweight", ops.table_zeros(
            num_embeddings, row_bytes(embedding_dim, bits, format), device=device))
        self.register_buffer("step", torch.ones(1, device=device)
                             if format == "symmetric_table" else None)
        if weight is None:  # N(0, 1) as nn.EmbeddingBag, drawn block by block
            seed = default_seed()
            if self.qweight.device.type != "meta":  # a meta table has no values to draw
                self._load_chunks(lambda: self._random_chunks(seed))
        else:
            self.load_float_weight(weight)

    def _random_chunks(self, seed: int):
        gen = torch.Generator(device=self.qweight.device).manual_seed(seed)
        for start, end in row_chunks(self.num_embeddings, self.embedding_dim):
            w = torch.randn(end - start, self.embedding_dim, generator=gen,
                            device=self.qweight.device)
            if self.padding_idx is not None and start <= self.padding_idx < end:
                w[self.padding_idx - start] = 0
            yield start, end, w

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor, stochastic: bool = False,
                          seed: int = 0) -> None:
        """Quantize fp32 ``weight`` [R, D] into this table (round-to-nearest by default), a
        block of rows at a time (stochastic rounding keys each block by its position)."""
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"qembed: weight of shape {tuple(weight.shape)} does not match "
                             f"({self.num_embeddings}, {self.embedding_dim})")

        def chunks():
            for start, end in row_chunks(self.num_embeddings, self.embedding_dim):
                yield start, end, weight[start:end].detach().to(self.qweight.device,
                                                                 torch.float32)

        for start, _, w in chunks():  # all checked before any row is written
            bad = (~torch.isfinite(w)).nonzero()
            if bad.numel():
                raise ValueError(f"qembed.quantize: weight has a non-finite value at row "
                                 f"{start + int(bad[0, 0])}, column {int(bad[0, 1])}")
        self._load_chunks(chunks, stochastic, seed)

    def _load_chunks(self, chunks, stochastic: bool = False, seed: int = 0) -> None:
        """Quantizes the blocks ``chunks()`` yields (start, end, fp32 rows); a per-table step
        needs the whole table's peak first, hence a factory that can run twice."""
        table_step = None
        if self.format == "symmetric_table":
            peak = torch.zeros((), device=self.qweight.device)
            for _, _, w in chunks():
                peak = torch.maximum(peak, w.abs().amax() if w.numel() else peak)
            table_step = symmetric_steps(peak.reshape(1, 1), self.bits, per_row=False)
        for block, (start, end, w) in enumerate(chunks()):
            step = table_step
            if self.format == "symmetric":
                step = symmetric_steps(w, self.bits, per_row=True)
            self.qweight[start:end] = ops.quantize(w, self.bits, self.format, step, stochastic,
                                                   seed, counter=block)
        if self.step is not None:  # only once quantize has accepted the weight
            self.step.copy_(table_step)

    def dequantize(self) -> torch.Tensor:
        """The table's values as fp32 [R, D] (a copy, for inspection and export)."""
        return ops.dequantize(self.qweight, self.bits, self.embedding_dim, self.format, self.step)

    @property
    def nbytes(self) -> int:
        """Bytes held by the table: packed rows plus the per-table step, if any."""
        extra = self.step.numel() * 4 if self.step is not None else 0
        return self.qweight.numel() + extra

    def _lookup(self, indices, offsets, per_sample_weights, mode, include_last_offset):
        return ops.embedding_bag(self.qweight, indices, offsets, self.bits, self.embedding_dim,
                                 self.format, self.step, per_sample_weights, mode,
                                 include_last_offset, self.padding_idx, self.output_dtype)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, format={self.format!r}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s

    # --- interchange with torch.ao's packed rows (affine format, 8/4/2 bits) -------------

    def to_torch_ao(self) -> torch.Tensor:
        """Rows in the layout of ``torch.ops.quantized.embedding_bag_{byte,4bit,2bit}_prepack``:
        codes (``ceil(dim * bits / 8)`` bytes, the same bit stream as ours without the pad of
        a last partial group) then scale and bias (fp32 for 8 bits, fp16 for 4 and 2 bits;
        fp16 rounds)."""
        if self.format != "affine" or self.bits not in _AO_PARAM_DTYPE:
            raise ValueError("qembed: torch.ao rows exist for the affine format at 8, 4 or 2 bits")
        cb = (self.embedding_dim * self.bits + 7) // 8
        po = param_offset(self.embedding_dim, self.bits)
        params = self.qweight[:, po:].contiguous().view(torch.float32)
        params = params.to(_AO_PARAM_DTYPE[self.bits]).contiguous().view(torch.uint8)
        return torch.cat([self.qweight[:, :cb], params], dim=1)

    @classmethod
    def from_torch_ao(cls, packed: torch.Tensor, bits: int, **kwargs):
        """Build a module (affine format) from ``torch.ao`` prepacked rows of ``bits`` bits
        (the dim is read from the row width: every code byte full)."""
        if bits not in _AO_PARAM_DTYPE:
            raise ValueError("qembed: torch.ao rows exist at 8, 4 or 2 bits")
        pdt = _AO_PARAM_DTYPE[bits]
        pbytes = 2 * torch.finfo(pdt).bits // 8
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] <= pbytes:
            raise ValueError("qembed: expected uint8 [R, codes + scale/bias] torch.ao rows")
        dim = (packed.shape[1] - pbytes) * 8 // bits
        module = cls(packed.shape[0], dim, bits=bits, format="affine", device=packed.device,
                     _weight=torch.zeros(packed.shape[0], dim, device=packed.device), **kwargs)
        params = packed[:, -pbytes:].contiguous().view(pdt).to(torch.float32)
        cb, po = packed.shape[1] - pbytes, param_offset(dim, bits)
        with torch.no_grad():
            module.qweight.zero_()
            module.qweight[:, :cb] = packed[:, :cb]
            module.qweight[:, po:] = params.contiguous().view(torch.uint8)
        return module


class QuantizedEmbeddingBag(_QuantizedTable):
    """``nn.EmbeddingBag`` over a packed int-``bits`` table with a fused lookup.

    Takes ``nn.EmbeddingBag``'s arguments plus ``bits`` (1..8) and ``format``
    (``"affine"``, ``"symmetric"`` or ``"symmetric_table"``); ``dtype`` sets the output
    dtype (float32, float16 or bfloat16). ``mode`` is ``"sum"`` or ``"mean"``. Any
    ``embedding_dim`` works: rows are stored padded to a multiple of 8 codes (:attr:`nbytes`
    counts the padded rows) and lookups return ``embedding_dim`` columns (see
    :mod:`qembed.ops`). Built without ``_weight``, the table is N(0, 1) drawn from torch's
    default generator and quantized a block of rows at a time: no fp32 table is made.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                 sparse: bool = False, _weight: torch.Tensor | None = None,
                 include_last_offset: bool = False, padding_idx: int | None = None,
                 device=None, dtype=None, *, bits: int = 8, format: str = "affine"):
        if mode not in ("sum", "mean"):
            raise ValueError(f"qembed: QuantizedEmbeddingBag supports mode 'sum' or 'mean', got {mode!r}")
        super().__init__(num_embeddings, embedding_dim, bits, format, padding_idx, max_norm,
                         _weight, device, dtype)
        self.mode, self.include_last_offset = mode, include_last_offset

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        input, offsets, per_sample_weights = bag_inputs(input, offsets, per_sample_weights,
                                                        self.include_last_offset)
        return self._lookup(input, offsets, per_sample_weights, self.mode, self.include_last_offset)

    @classmethod
    def from_float(cls, module: nn.EmbeddingBag, bits: int = 8, format: str = "affine",
                   dtype: torch.dtype | None = None) -> "QuantizedEmbeddingBag":
        if module.mode == "max":
            raise ValueError("qembed: mode 'max' is not supported")
        return cls(module.num_embeddings, module.embedding_dim, max_norm=module.max_norm,
                   mode=module.mode, _weight=module.weight,
                   include_last_offset=module.include_last_offset,
                   padding_idx=module.padding_idx, device=module.weight.device, dtype=dtype,
                   bits=bits, format=format)


class QuantizedEmbedding(_QuantizedTable):
    """``nn.Embedding`` over a packed int-``bits`` table: ``out[..., :] = row[input[...]]``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight: torch.Tensor | None = None, _freeze: bool = False, device=None,
                 dtype=None, *, bits: int = 8, format: str = "affine"):
        super().__init__(num_embeddings, embedding_dim, bits, format, padding_idx, max_norm,
                         _weight, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self._lookup(input.reshape(-1), None, None, "none", False)
        return out.view(*input.shape, self.embedding_dim)

    @classmethod
    def from_float(cls, module: nn.Embedding, bits: int = 8, format: str = "affine",
                   dtype: torch.dtype | None = None) -> "QuantizedEmbedding":
        return cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                   max_norm=module.max_norm, _weight=module.weight,
                   device=module.weight.device, dtype=dtype, bits=bits, format=format)


def quantize_(model: nn.Module, bits: int = 8, format: str = "affine",
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              dtype: torch.dtype | None = None) -> nn.Module:
    """Replace, in place, every ``nn.EmbeddingBag`` and ``nn.Embedding`` of ``model`` for
    which ``filter_fn(module, qualified_name)`` holds by its quantized twin, and every
    ``torchrec.EmbeddingBagCollection`` by :class:`qembed.torchrec.QuantizedEmbeddingBagCollection`
    (its ``output_dtype`` is ``dtype`` or float32, as TorchRec's); returns model."""
    swaps = {nn.EmbeddingBag: QuantizedEmbeddingBag, nn.Embedding: QuantizedEmbedding}
    collections = _collection_swaps()
    if type(model) in {**swaps, **collections} and (filter_fn is None or filter_fn(model, "")):
        raise ValueError("qembed.quantize_: pass the model containing the embedding; use "
                         "from_float (or from_torchrec) to convert a lone module")

    def convert(child: nn.Module) -> nn.Module:
        if type(child) in collections:
            return collections[type(child)].from_torchrec(
                child, bits=bits, format=format, output_dtype=dtype or torch.float32)
        return swaps[type(child)].from_float(child, bits=bits, format=format, dtype=dtype)

    # Collections first, so that the nn.EmbeddingBags inside them are not converted one by one.
    for kinds in (collections, swaps):
        for name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                fqn = f"{name}.{child_name}" if name else child_name
                if type(child) in kinds and (filter_fn is None or filter_fn(child, fqn)):
                    setattr(parent, child_name, convert(child))
    return model


def _collection_swaps() -> dict:
    """TorchRec's EmbeddingBagCollection -> qembed's, where TorchRec is loaded (a model that
    holds one has loaded it): quantize_ never imports TorchRec itself."""
    if "torchrec" not in sys.modules:
        return {}
    from torchrec import EmbeddingBagCollection

    from ..torchrec import QuantizedEmbeddingBagCollection
    return {EmbeddingBagCollection: QuantizedEmbeddingBagCollection}
