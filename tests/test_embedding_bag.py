"""embedding_bag, the fused lookup, on every backend that has it (the CPU, CUDA and Triton
kernels) against the reference and against torch.nn.functional.embedding_bag on the
dequantized table (PyTorch's own semantics); its bad input."""
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BITS,
    DIMS,
    FORMATS,
    INDEX_DTYPES,
    MODES,
    OUT_DTYPES,
    TRITON_OP_BACKENDS,
    assert_close,
    backend_cases,
    backends,
    random_bags,
    random_psw,
    random_table,
)

from qembed import ops, reference

# (mode, with per_sample_weights): not with mean
MODE_PSW = [("sum", False), ("sum", True), ("mean", False), ("none", False), ("none", True)]
GPU_BACKENDS = ["cuda", "triton-cuda"]
# (table rows, bags, longest bag): on a GPU bags longer than a warp; small in Triton's
# interpreter, which is slow
SIZES = {"cpu": (50, 20, 5), "triton-interpreter": (40, 6, 5), "cuda": (300, 50, 70),
         "triton-cuda": (300, 50, 70)}
OPTION_SIZES = {"cpu": (30, 12, 5), "triton-interpreter": (20, 5, 5), "cuda": (40, 30, 40),
                "triton-cuda": (40, 30, 40)}
WIDE_DIMS = [192, 256, 264, 520, 2056]


def lookup(backend, t, indices, offsets, **kwargs):
    """ops.embedding_bag over table t on the backend."""
    return backend.run(ops.embedding_bag, t.rows, indices, offsets, t.bits, t.dim, t.fmt, t.step,
                       **kwargs)


def torch_embedding_bag(weight, indices, offsets, mode, psw, include_last_offset, padding_idx):
    """What PyTorch computes on an fp32 table; "none" is nn.Embedding with the padding row
    reading as zeros (as a freshly initialised nn.Embedding(padding_idx=...))."""
    if mode == "none":
        if padding_idx is not None:
            weight = weight.clone()
            weight[padding_idx] = 0
        out = F.embedding(indices.long(), weight)
        return out if psw is None else out * psw[:, None]
    return F.embedding_bag(indices, weight, offsets, mode=mode, per_sample_weights=psw,
                           include_last_offset=include_last_offset, padding_idx=padding_idx)


@pytest.mark.parametrize(*backend_cases(TRITON_OP_BACKENDS, thin=("dim", "out_dtype"), bits=BITS,
                                        fmt=FORMATS, mode=MODES, dim=DIMS, out_dtype=OUT_DTYPES))
def test_matches_reference(backend, bits, fmt, mode, dim, out_dtype):
    """With fp16/bf16 output also a padding row. Mode none (no sums to reorder) in fp32 gives
    the CPU kernel's exact values."""
    rows, bags, max_len = SIZES[backend.name]
    padding_idx = None if out_dtype == torch.float32 else 5
    t = random_table(rows, dim, bits, fmt)
    indices, offsets = random_bags(rows, bags, max_len=max_len, padding_idx=padding_idx)
    psw = None if mode == "mean" else random_psw(indices.numel()).to(out_dtype)
    kwargs = dict(per_sample_weights=psw, mode=mode, padding_idx=padding_idx)
    got = lookup(backend, t, indices, offsets, output_dtype=out_dtype, **kwargs)
    assert got.shape == ((indices.numel() if mode == "none" else bags), dim)
    assert_close(got, t.lookup(indices, offsets, impl=reference, **kwargs), out_dtype)
    if mode == "none" and out_dtype == torch.float32 and backend.name != "cpu":
        assert torch.equal(got.cpu(), t.lookup(indices, offsets, **kwargs))


@pytest.mark.parametrize(
    "backend,dim,bits",
    backend_cases(["cpu", "cuda", "triton-cuda"], thin=("bits",), dim=WIDE_DIMS, bits=BITS)[1]
    + backend_cases(["triton-interpreter"], thin=("bits",), dim=[192, 520], bits=BITS)[1])
def test_wide_rows(backend, dim, bits):
    """Rows wider than one accumulator block (CPU: 64 columns with AVX2, 128 with AVX-512),
    one warp's registers (CUDA) or one column block (Triton: 256), full and partial blocks;
    bags of several row tiles."""
    fmt = "affine" if bits % 2 else "symmetric"
    t = random_table(50, dim, bits, fmt)
    indices, offsets = random_bags(50, 3 if backend.interpreted else 9, max_len=40)
    psw = random_psw(indices.numel())
    for mode, w in (("sum", psw), ("mean", None), ("none", psw)):
        got = lookup(backend, t, indices, offsets, per_sample_weights=w, mode=mode)
        assert_close(got, t.lookup(indices, offsets, impl=reference, per_sample_weights=w,
                                   mode=mode))


@pytest.mark.parametrize(*backend_cases(
    TRITON_OP_BACKENDS, thin=("bits", "fmt"), mode_psw=MODE_PSW, index_dtype=INDEX_DTYPES,
    offset_dtype=INDEX_DTYPES, include_last_offset=[False, True], padding_idx=[None, 3],
    bits=BITS, fmt=FORMATS))
def test_options_match_reference_and_torch(backend, mode_psw, index_dtype, offset_dtype,
                                           include_last_offset, padding_idx, bits, fmt):
    mode, with_psw = mode_psw
    rows, bags, max_len = OPTION_SIZES[backend.name]
    t = random_table(rows, 24, bits, fmt)
    indices, offsets = random_bags(rows, bags, max_len=max_len, index_dtype=index_dtype,
                                   offset_dtype=offset_dtype,
                                   include_last_offset=include_last_offset,
                                   padding_idx=padding_idx)
    psw = random_psw(indices.numel()) if with_psw else None
    kwargs = dict(per_sample_weights=psw, mode=mode, include_last_offset=include_last_offset,
                  padding_idx=padding_idx)
    got = lookup(backend, t, indices, offsets, **kwargs)
    assert_close(got, t.lookup(indices, offsets, impl=reference, **kwargs))
    assert_close(got, torch_embedding_bag(t.dequantize(), indices, offsets.to(index_dtype), mode,
                                          psw, include_last_offset, padding_idx))


@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", backends(*TRITON_OP_BACKENDS))
def test_empty_bags(backend, mode, include_last_offset):
    t = random_table(20, 24, 5, "affine")
    indices = torch.randint(0, 20, (7,))
    offsets = torch.tensor([0, 0, 3, 3, 3, 6, 7] + [7] * include_last_offset)
    kwargs = dict(mode=mode, include_last_offset=include_last_offset)
    got = lookup(backend, t, indices, offsets, **kwargs)
    assert_close(got, t.lookup(indices, offsets, impl=reference, **kwargs))
    if mode != "none":
        empty = [0, 2, 3, 6]
        assert got.shape == (7, 24)
        assert torch.equal(got[empty].cpu(), torch.zeros(len(empty), 24))
        assert_close(got, F.embedding_bag(indices, t.dequantize(), offsets, mode=mode,
                                          include_last_offset=include_last_offset))


@pytest.mark.parametrize(*backend_cases(TRITON_OP_BACKENDS, thin=("fmt", "index_dtype"),
                                        mode=MODES, include_last_offset=[False, True],
                                        fmt=FORMATS, index_dtype=INDEX_DTYPES))
def test_empty_batch(backend, mode, include_last_offset, fmt, index_dtype):
    t = random_table(10, 16, 3, fmt)
    indices = torch.zeros(0, dtype=index_dtype)
    no_bags = torch.zeros(int(include_last_offset), dtype=index_dtype)
    psw = torch.zeros(0) if mode != "mean" else None
    kwargs = dict(mode=mode, include_last_offset=include_last_offset, per_sample_weights=psw)
    assert lookup(backend, t, indices, no_bags, **kwargs).shape == (0, 16)
    if mode != "none":  # bags that are all empty
        three = torch.zeros(3 + int(include_last_offset), dtype=index_dtype)
        assert torch.equal(lookup(backend, t, indices, three, **kwargs).cpu(), torch.zeros(3, 16))


def test_non_contiguous_inputs():
    t = random_table(30, 32, 3, "symmetric")
    indices, offsets = random_bags(30, 10)
    psw = random_psw(indices.numel())
    wide = torch.randint(0, 256, (30, 2 * t.rows.shape[1]), dtype=torch.uint8)
    wide[:, ::2] = t.rows
    strided_indices = torch.stack([indices, indices], 1).reshape(-1)[::2]
    strided_psw = torch.stack([psw, psw], 1).reshape(-1)[::2]
    args = (wide[:, ::2], strided_indices, offsets[None].expand(2, -1)[1])
    assert not (args[0].is_contiguous() or args[1].is_contiguous() or strided_psw.is_contiguous())
    got = ops.embedding_bag(*args, 3, 32, "symmetric", per_sample_weights=strided_psw)
    assert torch.equal(got, t.lookup(indices, offsets, per_sample_weights=psw))


@pytest.mark.parametrize("backend", backends(*TRITON_OP_BACKENDS))
def test_unaligned_view(backend):
    """A table view that starts off a 4-byte boundary is read correctly."""
    t = random_table(30, 16, 6, "affine")
    flat = torch.zeros(t.rows.numel() + 1, dtype=torch.uint8, device=backend.device)
    flat[1:] = backend.to(t.rows).flatten()
    view = flat[1:].view(t.rows.shape)
    indices, offsets = random_bags(30, 10)
    got = backend.run(ops.embedding_bag, view, indices, offsets, 6, 16, "affine")
    assert_close(got, t.lookup(indices, offsets, impl=reference))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_per_sample_weights(dtype):
    t = random_table(30, 16, 4, "affine")
    indices, offsets = random_bags(30, 10)
    psw = random_psw(indices.numel()).to(dtype)
    assert torch.equal(t.lookup(indices, offsets, per_sample_weights=psw),
                       t.lookup(indices, offsets, per_sample_weights=psw.float()))


def test_trailing_indices_after_last_offset_are_ignored():
    # with include_last_offset, PyTorch ignores indices past offsets[-1]
    t = random_table(20, 16, 6, "symmetric_table")
    indices = torch.randint(0, 20, (9,))
    offsets = torch.tensor([0, 2, 5])
    out = t.lookup(indices, offsets, include_last_offset=True)
    assert out.shape == (2, 16)
    assert_close(out, F.embedding_bag(indices, t.dequantize(), offsets, mode="sum",
                                      include_last_offset=True))


@pytest.mark.parametrize("backend", backends(*GPU_BACKENDS))
def test_bad_input_skipped_unless_validating(backend, monkeypatch):
    """On a GPU nothing waits for the device: a bad index is skipped as padding; with
    QEMBED_CUDA_VALIDATE=1 bad indices and offsets raise the CPU's exceptions."""
    t = random_table(10, 16, 4, "affine")
    bad = torch.tensor([1, 10, 2])
    offsets = torch.tensor([0, 2])
    got = backend.run(ops.embedding_bag, t.rows, bad, offsets, 4, 16, "affine")
    assert_close(got, t.lookup(torch.tensor([1, 0, 2]), offsets, impl=reference, padding_idx=0))
    monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
    with pytest.raises(IndexError, match="out of range"):
        backend.run(ops.embedding_bag, t.rows, bad, offsets, 4, 16, "affine")
    with pytest.raises(ValueError, match="offsets"):
        backend.run(ops.embedding_bag, t.rows, bad[[0, 2]], torch.tensor([0, 5]), 4, 16,
                    "affine")


@pytest.mark.parametrize("backend", backends(*GPU_BACKENDS))
def test_current_stream_is_used(backend):
    t = random_table(100, 64, 4, "affine")
    indices, offsets = random_bags(100, 64)
    expected = t.lookup(indices, offsets, impl=reference)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = backend.run(ops.embedding_bag, t.rows, indices, offsets, 4, 64, "affine")
    stream.synchronize()
    assert_close(got, expected)


# --- bad input ------------------------------------------------------------------------------

def params(cases):
    """pytest params from (id, *values) tuples."""
    return [pytest.param(*values, id=case_id) for case_id, *values in cases]


# (id, change to a valid lookup's arguments, exception, message). The valid lookup: a
# 10-row 4-bit symmetric_table table of dim 16, indices [0, 9, 3, 3], offsets [0, 1, 4].
LOOKUP_ERRORS = [
    ("index-too-large", lambda a: dict(indices=torch.tensor([0, 10, 3, 3])), IndexError,
     r"index 10 at position 1 is out of range for a table of 10 rows"),
    ("index-negative", lambda a: dict(indices=torch.tensor([0, 9, -1, 3])), IndexError,
     r"index -1 at position 2 is out of range"),
    ("index32-too-large", lambda a: dict(indices=torch.tensor([0, 9, 3, 12], dtype=torch.int32)),
     IndexError, r"index 12 at position 3 is out of range"),
    ("offsets-not-from-0", lambda a: dict(offsets=torch.tensor([1, 1, 4])), ValueError,
     r"offsets\[0\] must be 0, got 1"),
    ("offsets-decreasing", lambda a: dict(offsets=torch.tensor([0, 3, 2])), ValueError,
     r"offsets must be non-decreasing, but offsets\[2\] = 2 < offsets\[1\] = 3"),
    ("offsets-past-end", lambda a: dict(offsets=torch.tensor([0, 1, 5])), ValueError,
     r"offsets\[2\] = 5 is past the end of indices \(4\)"),
    ("last-offset-missing", lambda a: dict(offsets=torch.zeros(0, dtype=torch.long),
                                           include_last_offset=True), ValueError,
     r"include_last_offset, offsets needs at least one element"),
    ("no-offsets", lambda a: dict(offsets=None), ValueError, r"offsets is required"),
    ("psw-too-short", lambda a: dict(per_sample_weights=torch.ones(3)), ValueError,
     r"per_sample_weights must have the shape of indices \(4,\), got \[3\]"),
    ("psw-2d", lambda a: dict(per_sample_weights=torch.ones(4, 1)), ValueError,
     r"per_sample_weights must have the shape of indices"),
    ("psw-with-mean", lambda a: dict(per_sample_weights=torch.ones(4), mode="mean"), ValueError,
     r"per_sample_weights are only supported with mode 'sum' or 'none'"),
    ("psw-integer", lambda a: dict(per_sample_weights=torch.ones(4, dtype=torch.long)),
     TypeError, r"per_sample_weights must be floating point"),
    ("bits-0", lambda a: dict(bits=0), ValueError, r"bits must be in 1..8, got 0"),
    ("bits-9", lambda a: dict(bits=9), ValueError, r"bits must be in 1..8, got 9"),
    ("dim-0", lambda a: dict(dim=0), ValueError, r"embedding dim must be positive, got 0"),
    ("float-indices", lambda a: dict(indices=torch.tensor([0.0, 9.0, 3.0, 3.0])), TypeError,
     r"indices must be int32 or int64, got Float"),
    ("float-offsets", lambda a: dict(offsets=torch.tensor([0.0, 1.0, 4.0])), TypeError,
     r"offsets must be int32 or int64, got Float"),
    ("indices-2d", lambda a: dict(indices=torch.tensor([[0, 9], [3, 3]])), ValueError,
     r"indices must be 1-D, got 2-D"),
    ("rows-not-uint8", lambda a: dict(rows=a["rows"].to(torch.int8)), TypeError,
     r"packed rows must be uint8, got Char"),
    ("rows-float", lambda a: dict(rows=a["rows"].float()), TypeError,
     r"packed rows must be uint8, got Float"),
    ("rows-too-narrow", lambda a: dict(rows=a["rows"][:, :-1]), ValueError,
     r"packed rows have 7 bytes but dim=16, bits=4, format=1 needs 8"),
    ("rows-of-other-format", lambda a: dict(fmt="affine"), ValueError,
     r"packed rows have 8 bytes but dim=16, bits=4, format=2 needs 16"),
    ("rows-1d", lambda a: dict(rows=a["rows"].reshape(-1)), ValueError,
     r"packed rows must be 2-D, got 1-D"),
    ("unknown-format", lambda a: dict(fmt="int4"), ValueError, r"unknown format 'int4'"),
    ("unknown-mode", lambda a: dict(mode="max"), ValueError, r"unsupported mode 'max'"),
    ("output-float64", lambda a: dict(output_dtype=torch.float64), TypeError,
     r"output dtype must be float32, float16 or bfloat16, got Double"),
    ("no-step", lambda a: dict(step=None), ValueError, r"per-table step\) needs a step tensor"),
    ("step-float64", lambda a: dict(step=a["step"].double()), TypeError,
     r"step must be float32, got Double"),
    ("indices-on-meta", lambda a: dict(indices=a["indices"].to("meta")), ValueError,
     r"indices is on meta but the table is on cpu"),
    ("offsets-on-meta", lambda a: dict(offsets=a["offsets"].to("meta")), ValueError,
     r"offsets is on meta but the table is on cpu"),
    ("psw-on-meta", lambda a: dict(per_sample_weights=torch.ones(4, device="meta")), ValueError,
     r"per_sample_weights is on meta but the table is on cpu"),
    ("step-on-meta", lambda a: dict(step=a["step"].to("meta")), ValueError,
     r"step is on meta but rows is on cpu"),
    ("rows-on-meta", lambda a: dict(rows=a["rows"].to("meta")), ValueError,
     r"step is on cpu but rows is on meta"),
    ("affine-rows-on-meta", lambda a: dict(rows=torch.zeros(10, 16, dtype=torch.uint8,
                                                            device="meta"),
                                           fmt="affine", step=None), ValueError,
     r"indices is on cpu but the table is on meta"),
]


def valid_lookup():
    t = random_table(10, 16, 4, "symmetric_table")
    return dict(rows=t.rows, indices=torch.tensor([0, 9, 3, 3]), offsets=torch.tensor([0, 1, 4]),
                bits=4, dim=16, fmt="symmetric_table", step=t.step)


@pytest.mark.parametrize("change,exc,match", params(LOOKUP_ERRORS))
@pytest.mark.parametrize("backend", backends("cpu", "reference", "triton-interpreter"))
def test_errors(backend, change, exc, match):
    """The exception and message of the C++ checks on every backend, before any kernel
    runs: the table is left as it was."""
    args = valid_lookup()
    table, step = args["rows"], args["step"]
    saved = table.clone(), step.clone()
    assert backend.run(ops.embedding_bag, **args).shape == (3, 16)  # the unchanged lookup is fine
    args.update(change(args))
    with pytest.raises(exc, match=match):
        with backend.context():
            ops.embedding_bag(**args)
    assert torch.equal(table, saved[0]) and torch.equal(step, saved[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["in-a-bag", "after-the-last-bag"])
def test_bad_index_found_anywhere_in_a_large_batch(mode, where):
    """The pooled CPU lookup checks indices as it reads them, on every thread; an index past
    the last bag (include_last_offset) is never read but must raise all the same."""
    table = random_table(100, 16, 4, "affine")
    n = 4000
    indices = torch.randint(0, 100, (n,))
    offsets = torch.arange(0, n - 50, 10)  # with include_last_offset: the last 50 are unused
    position = int(torch.randint(0, n - 50, ())) if where == "in-a-bag" else n - 7
    indices[position] = 100 + position
    with pytest.raises(IndexError, match=f"index {100 + position} at position {position} "):
        ops.embedding_bag(table.rows, indices, offsets, 4, 16, "affine", mode=mode,
                          include_last_offset=True)
