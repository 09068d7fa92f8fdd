"""Names and sizes of the packed-row formats (the C++ twin is csrc/layout.h).

A row holds ``[codes: ceil(dim/8)*bits bytes][pad to 4][parameters]``. Codes come in groups
of 8, so a row of any ``dim`` holds :func:`padded_dim` codes; those past ``dim`` are pad,
written as the code of zero ((value - bias) / scale = 0) and never read into a result: every
op takes the true ``dim`` and returns exactly ``dim`` columns.

* ``"symmetric"``: signed codes with one fp32 step per row stored inline
  (value = step * q, q in [-2^(b-1), 2^(b-1) - 1]); the format of low-precision training.
* ``"symmetric_table"``: the same codes with one fp32 step for the whole table, kept outside
  the rows.
* ``"affine"``: unsigned codes with fp32 scale and bias inline (value = scale * u + bias),
  the row-wise format of post-training quantization and of ``torch.ao``'s packed rows.
"""
from __future__ import annotations

FORMATS = {"symmetric": 0, "symmetric_table": 1, "affine": 2}
POOLINGS = {"sum": 0, "mean": 1, "none": 2}
_PARAM_BYTES = {0: 4, 1: 0, 2: 8}


def format_id(fmt: str | int) -> int:
    if isinstance(fmt, int) and fmt in _PARAM_BYTES:
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"qembed: unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def pooling_id(mode: str | int) -> int:
    if isinstance(mode, int) and mode in POOLINGS.values():
        return mode
    if mode not in POOLINGS:
        raise ValueError(f"qembed: unsupported mode {mode!r}; choose one of {sorted(POOLINGS)}")
    return POOLINGS[mode]


def padded_dim(dim: int) -> int:
    """Codes stored per row: ``dim`` rounded up to a whole group of 8."""
    return (dim + 7) // 8 * 8


def code_bytes(dim: int, bits: int) -> int:
    return padded_dim(dim) // 8 * bits


def param_offset(dim: int, bits: int) -> int:
    return (code_bytes(dim, bits) + 3) // 4 * 4


def param_bytes(fmt: str | int) -> int:
    return _PARAM_BYTES[format_id(fmt)]


def row_bytes(dim: int, bits: int, fmt: str | int) -> int:
    return param_offset(dim, bits) + param_bytes(fmt)


def qmin(bits: int) -> int:
    return -(1 << (bits - 1))


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


OPTIMIZERS = {"sgd": 0, "adagrad": 1, "adam": 2, "none": 3}
STEP_OPTIMIZERS = {"sgd": 0, "adam": 1}


def optimizer_id(name: str | int, table: dict = OPTIMIZERS) -> int:
    if isinstance(name, int) and name in table.values():
        return name
    if name not in table:
        raise ValueError(f"qembed: unknown optimizer {name!r}; choose one of {sorted(table)}")
    return table[name]
