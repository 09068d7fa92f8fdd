"""The Triton kernels (qembed.triton) against the reference and the CPU kernels, run in
Triton's interpreter on CPU tensors (exact, slow: shapes are small). Skipped without triton,
and on a machine with a CUDA device, where tests/test_triton_cuda.py runs them compiled."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported
pytest.importorskip("triton")

from conftest import BITS, FORMATS, MODES, random_bags, random_psw, random_table  # noqa: E402
from test_embedding_bag import assert_close  # noqa: E402
from test_errors import LOOKUP_ERRORS, params, valid_lookup  # noqa: E402
from test_train_ops import STATE_WIDTH, make_batch, make_table, run_update, same  # noqa: E402

from qembed import formats, ops, reference  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="the interpreter runs on CPU tensors; on a GPU see test_triton_cuda.py"),
    # the interpreter computes with numpy, which warns about the NaN and inf fed in on purpose
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

DIMS = [8, 64, 136]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def triton_lookup(t, indices, offsets, **kwargs):
    with ops.use_triton():
        return t.lookup(indices, offsets, **kwargs)


def triton_update(*args, **kwargs):
    with ops.use_triton():
        return ops.lowp_update(*args, **kwargs)


def test_use_triton_routes_both_ops(monkeypatch):
    import qembed.triton as kernels

    calls = []
    monkeypatch.setattr(kernels, "embedding_bag", lambda *a: calls.append("embedding_bag"))
    monkeypatch.setattr(kernels, "lowp_update", lambda *a: calls.append("lowp_update"))
    t = random_table(4, 8, 4, "symmetric")
    with ops.use_triton():
        t.lookup(torch.tensor([1]), torch.tensor([0]))
        ops.lowp_update(t.rows, None, torch.zeros(4, 0), torch.zeros(4, 0), torch.tensor([1]),
                        torch.zeros(1, 8), 4, 8, optimizer="sgd")
        with ops.use_reference():  # the innermost choice wins
            t.lookup(torch.tensor([1]), torch.tensor([0]))
    assert calls == ["embedding_bag", "lowp_update"]


@pytest.mark.parametrize("op", ["embedding_bag", "lowp_update"])
def test_every_op_has_a_cuda_kernel(op):
    """Compiled or, for an extension built without CUDA, the Triton one."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qembed::{op}", "CUDA")


# --- embedding_bag ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_embedding_bag_matches_reference(bits, fmt, mode):
    dim = DIMS[bits % len(DIMS)]
    t = random_table(40, dim, bits, fmt)
    indices, offsets = random_bags(40, 6)
    psw = None if mode == "mean" else random_psw(indices.numel())
    got = triton_lookup(t, indices, offsets, per_sample_weights=psw, mode=mode)
    assert got.shape == ((indices.numel() if mode == "none" else 6), dim)
    assert_close(got, t.lookup(indices, offsets, impl=reference, per_sample_weights=psw,
                               mode=mode))
    if mode == "none":  # no pooling: the CPU kernel's exact values
        assert torch.equal(got, t.lookup(indices, offsets, per_sample_weights=psw, mode=mode))


@pytest.mark.parametrize("dim", DIMS + [520])  # 520: more than one column block
@pytest.mark.parametrize("mode", MODES)
def test_embedding_bag_dims(dim, mode):
    t = random_table(30, dim, 6, "affine")
    indices, offsets = random_bags(30, 3, max_len=40)  # bags of several row tiles
    got = triton_lookup(t, indices, offsets, mode=mode)
    assert_close(got, t.lookup(indices, offsets, impl=reference, mode=mode))


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("index_dtype,offset_dtype", [(torch.int32, torch.int64),
                                                      (torch.int64, torch.int32),
                                                      (torch.int64, torch.int64)],
                         ids=["idx32", "off32", "idx64"])
@pytest.mark.parametrize("mode,with_psw", [("sum", True), ("mean", False), ("none", True)])
def test_embedding_bag_options(mode, with_psw, index_dtype, offset_dtype, include_last_offset,
                               padding_idx):
    bits, fmt = (3, "symmetric_table") if index_dtype == torch.int32 else (8, "symmetric")
    t = random_table(20, 16, bits, fmt)
    indices, offsets = random_bags(20, 5, index_dtype=index_dtype, offset_dtype=offset_dtype,
                                   include_last_offset=include_last_offset,
                                   padding_idx=padding_idx)
    kwargs = dict(per_sample_weights=random_psw(indices.numel()) if with_psw else None,
                  mode=mode, include_last_offset=include_last_offset, padding_idx=padding_idx)
    got = triton_lookup(t, indices, offsets, **kwargs)
    assert_close(got, t.lookup(indices, offsets, impl=reference, **kwargs))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES[1:], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_bag_output_dtypes(fmt, mode, out_dtype):
    t = random_table(20, 24, 7, fmt)
    indices, offsets = random_bags(20, 4)
    psw = None if mode == "mean" else random_psw(indices.numel()).to(out_dtype)
    got = triton_lookup(t, indices, offsets, per_sample_weights=psw, mode=mode,
                        output_dtype=out_dtype)
    assert_close(got, t.lookup(indices, offsets, impl=reference, per_sample_weights=psw,
                               mode=mode), out_dtype)


@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("mode", MODES)
def test_embedding_bag_empty(mode, include_last_offset):
    t = random_table(20, 16, 4, "symmetric")
    offsets = torch.tensor([0, 0, 3, 3, 7, 7])
    indices = torch.randint(0, 20, (7,))
    kwargs = dict(mode=mode, include_last_offset=include_last_offset)
    got = triton_lookup(t, indices, offsets, **kwargs)
    assert_close(got, t.lookup(indices, offsets, impl=reference, **kwargs))
    empty = torch.zeros(0, dtype=torch.long)
    got = triton_lookup(t, empty, torch.zeros(4, dtype=torch.long), **kwargs)
    bags = 3 if include_last_offset else 4
    assert got.shape == ((0 if mode == "none" else bags), 16) and not got.any()
    offsets = torch.zeros(1 if include_last_offset else 0, dtype=torch.long)
    assert triton_lookup(t, empty, offsets, **kwargs).shape == (0, 16)


def test_embedding_bag_unaligned_view():
    t = random_table(30, 16, 6, "affine")
    flat = torch.zeros(t.rows.numel() + 1, dtype=torch.uint8)
    flat[1:] = t.rows.flatten()
    view = flat[1:].view(t.rows.shape)
    indices, offsets = random_bags(30, 5)
    with ops.use_triton():
        got = ops.embedding_bag(view, indices, offsets, 6, 16, "affine")
    assert_close(got, t.lookup(indices, offsets, impl=reference))


@pytest.mark.parametrize("change,exc,match", params(LOOKUP_ERRORS))
def test_embedding_bag_errors(change, exc, match):
    """The CPU kernel's exceptions and messages, before any kernel runs."""
    args = valid_lookup()
    args.update(change(args))
    with pytest.raises(exc, match=match):
        with ops.use_triton():
            ops.embedding_bag(**args)


# --- lowp_update --------------------------------------------------------------------------

def update_case(bits, fmt, optimizer, dim=16, num_rows=40, bags=10):
    """A table, its optimizer state and a batch's distinct rows and gradients (one row's
    gradient not finite)."""
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    table, step = make_table(num_rows, dim, bits, fmt, gen)
    indices, offsets = make_batch(num_rows, bags, gen)
    uniq, grad = ops.embedding_bag_backward(torch.randn(bags, dim, generator=gen), indices,
                                            offsets)
    grad[min(1, grad.shape[0] - 1), 2] = float("inf")
    state = torch.rand(num_rows, STATE_WIDTH[optimizer](dim), generator=gen)
    step_state = torch.rand(num_rows if fmt == "symmetric" else 1, 2, generator=gen)
    return table, step, state, step_state, uniq, grad


def assert_update_equal(case, **kwargs):
    got = run_update(triton_update, *case, **kwargs)
    want = run_update(ops.lowp_update, *case, **kwargs)
    names = ["rows", "step", "state", "step_state", "skipped"]
    assert [n for n, a, b in zip(names, got, want) if not same(a, b)] == []
    assert got[4] == 1
    if kwargs.get("optimizer") != "none":
        assert not torch.equal(got[0], case[0])


STEP_UPDATES = [(False, "sgd"), (True, "sgd"), (True, "adam")]


@pytest.mark.parametrize("stochastic", [True, False], ids=["sr", "nearest"])
@pytest.mark.parametrize("learn_step,step_optimizer", STEP_UPDATES,
                         ids=["fixed", "lsq-sgd", "lsq-adam"])
@pytest.mark.parametrize("fmt", ["symmetric", "symmetric_table"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam", "none"])
def test_update_equals_cpu(optimizer, fmt, learn_step, step_optimizer, stochastic):
    """Codes, steps, optimizer state and the skipped count bit for bit."""
    bits = 1 + len(optimizer + fmt) % 8
    assert_update_equal(update_case(bits, fmt, optimizer), bits=bits, dim=16, fmt=fmt,
                        optimizer=optimizer, lr=0.05, eps=1e-6, weight_decay=0.01,
                        betas=(0.8, 0.99), iteration=3, learn_step=learn_step,
                        step_optimizer=step_optimizer, step_lr=1e-3, stochastic=stochastic,
                        seed=2**40 + 17, counter=2**33 + 5)


@pytest.mark.parametrize("fmt", ["symmetric", "symmetric_table"])
@pytest.mark.parametrize("bits", BITS)
def test_update_bits_equal_cpu(bits, fmt):
    assert_update_equal(update_case(bits, fmt, "adagrad", dim=8), bits=bits, dim=8, fmt=fmt,
                        optimizer="adagrad", learn_step=True, step_optimizer="adam",
                        step_lr=1e-3, seed=-bits, counter=2)  # a negative seed: its 64 bits


@pytest.mark.parametrize("fmt", ["symmetric", "symmetric_table"])
def test_update_key_offsets_equal_cpu(fmt):
    """A shard's rounding keyed by its rows' and columns' places in the whole table."""
    assert_update_equal(update_case(4, fmt, "adam", dim=16), bits=4, dim=16, fmt=fmt,
                        optimizer="adam", seed=5, counter=2, row_offset=2**33 + 7,
                        column_offset=24)


@pytest.mark.parametrize("dim", [64, 136])
def test_update_wide_rows_equal_cpu(dim):
    case = update_case(5, "symmetric", "adam", dim=dim, num_rows=12, bags=4)
    assert_update_equal(case, bits=5, dim=dim, fmt="symmetric", optimizer="adam",
                        learn_step=True, step_lr=1e-3, seed=99, counter=1)


def test_update_two_pass_equals_cpu():
    """weights_out from one update, then an optimizer-free step update from given weights."""
    for fmt in ["symmetric", "symmetric_table"]:
        table, step, state, step_state, uniq, grad = update_case(4, fmt, "adagrad")
        outs = []
        for impl in (triton_update, ops.lowp_update):
            wout = torch.zeros(grad.shape)
            first = run_update(impl, table, step, state, step_state, uniq, grad, bits=4, dim=16,
                               fmt=fmt, stochastic=False, weights_out=wout)
            g2 = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1))
            second = run_update(impl, *first[:4], uniq, g2, bits=4, dim=16, fmt=fmt,
                                optimizer="none", learn_step=True, step_optimizer="adam",
                                step_lr=1e-3, weights=wout, seed=3, counter=9)
            outs.append((wout,) + first + second)
        assert outs[0][0][1].isnan().all() and not outs[0][0][0].isnan().any()
        assert all(same(a, b) for a, b in zip(*outs))


def test_update_nonfinite_rows_untouched():
    for fmt in ("symmetric", "symmetric_table"):
        table, step = make_table(20, 16, 8, fmt, torch.Generator().manual_seed(3))
        uniq = torch.tensor([1, 4, 7, 9])
        grad = torch.randn(4, 16)
        grad[1, 5], grad[3, 0] = float("nan"), float("-inf")
        state = torch.rand(20, 32)
        sst = torch.zeros(20 if fmt == "symmetric" else 1, 2)
        t, s, st, _, skipped = run_update(triton_update, table, step, state, sst, uniq, grad,
                                          bits=8, dim=16, fmt=fmt, optimizer="adam",
                                          learn_step=True, step_lr=1e-3, step_optimizer="adam")
        assert skipped == 2
        assert torch.equal(t[[4, 9]], table[[4, 9]]) and torch.equal(st[[4, 9]], state[[4, 9]])
        assert not torch.equal(t[[1, 7]], table[[1, 7]])
        assert s is None or (torch.isfinite(s).all() and not torch.equal(s, step))
        # all rows skipped: the table's step stays
        _, s, _, _, skipped = run_update(triton_update, table, step, state, sst, uniq[1:2],
                                         grad[1:2], bits=8, dim=16, fmt=fmt, optimizer="sgd",
                                         learn_step=True, step_lr=1e-3)
        assert skipped == 1 and (s is None or torch.equal(s, step))


def test_update_empty_batch():
    table, _ = make_table(10, 16, 4, "symmetric", torch.Generator().manual_seed(0))
    before = table.clone()
    skipped = triton_update(table, None, torch.zeros(10, 1), torch.zeros(10, 0),
                            torch.zeros(0, dtype=torch.long), torch.zeros(0, 16), 4, 16)
    assert int(skipped) == 0 and torch.equal(table, before)


def test_update_bad_arguments_raise():
    table, _ = make_table(10, 16, 4, "symmetric", torch.Generator().manual_seed(0))
    empty = torch.zeros(10, 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        triton_update(table, None, empty, empty, torch.tensor([3, 3]), torch.zeros(2, 16), 4, 16,
                      optimizer="sgd")
    with pytest.raises(IndexError, match="row 10 is out of range"):
        triton_update(table, None, empty, empty, torch.tensor([10]), torch.zeros(1, 16), 4, 16,
                      optimizer="sgd")
    with pytest.raises(ValueError, match="state must be a contiguous"):
        triton_update(table, None, empty, empty, torch.tensor([1]), torch.zeros(1, 16), 4, 16,
                      optimizer="adagrad")
    with pytest.raises(ValueError, match="symmetric format"):
        triton_update(torch.zeros(10, formats.row_bytes(16, 4, "affine"), dtype=torch.uint8),
                      None, empty, empty, torch.tensor([1]), torch.zeros(1, 16), 4, 16,
                      fmt="affine", optimizer="sgd")
