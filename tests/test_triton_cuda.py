"""The Triton kernels (qembed.triton) compiled for a CUDA device, against the reference and
the CPU kernels on fresh random data. Needs a CUDA device and triton; skipped otherwise, and
under TRITON_INTERPRET=1 (tests/test_triton.py runs the interpreter)."""
import itertools
import os

import pytest
import test_cuda
import torch
from conftest import BITS, FORMATS, MODES, random_bags, random_table
from test_cuda import (  # noqa: F401 (the test_ functions are collected here too, on Triton)
    assert_close,
    check_lookup,
    cuda,
    test_embedding_bag_empty,
    test_embedding_bag_options,
    test_embedding_bag_unaligned_view,
    test_embedding_bag_wide_rows,
)
from test_train_ops import STATE_WIDTH, make_batch, make_table, run_update, same

from qembed import ops, reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="runs compiled kernels, not the interpreter"),
              pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton")]

DIMS = [8, 64, 128, 136]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def triton_lookup(monkeypatch):
    """test_cuda's lookup tests, imported above, run here on the Triton kernel."""
    def run(*args, **kwargs):
        with ops.use_triton():
            return ops.embedding_bag(*args, **kwargs)
    monkeypatch.setattr(test_cuda, "gpu_embedding_bag", run)


# Every specialisation is a Triton compilation: widths, formats and modes in full, dims and
# output dtypes in turn.
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_embedding_bag_matches_reference(bits, fmt, mode):
    dim, out_dtype = DIMS[bits % len(DIMS)], OUT_DTYPES[(bits + len(fmt)) % len(OUT_DTYPES)]
    check_lookup(random_table(300, dim, bits, fmt), mode, out_dtype)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("mode", MODES)
def test_embedding_bag_dims_and_dtypes(mode, dim, out_dtype):
    check_lookup(random_table(300, dim, 4, "symmetric"), mode, out_dtype)


def test_bad_input_skipped_or_raised(monkeypatch):
    t = random_table(10, 16, 4, "affine")
    rows, offsets = cuda(t.rows, torch.tensor([0, 2]))
    bad = torch.tensor([1, 10, 2], device="cuda")
    with ops.use_triton():
        got = ops.embedding_bag(rows, bad, offsets, 4, 16, "affine")
        assert_close(got, t.lookup(torch.tensor([1, 0, 2]), offsets.cpu(), impl=reference,
                                   padding_idx=0))
        monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
        with pytest.raises(IndexError, match="index 10 at position 1 is out of range"):
            ops.embedding_bag(rows, bad, offsets, 4, 16, "affine")


def test_current_stream_is_used():
    t = random_table(100, 64, 4, "affine")
    indices, offsets = random_bags(100, 64)
    expected = t.lookup(indices, offsets, impl=reference)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), ops.use_triton():
        got = ops.embedding_bag(*cuda(t.rows, indices, offsets), 4, 64, "affine")
    stream.synchronize()
    assert_close(got, expected)


def host(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def check_update(bits, dim, optimizer, fmt, **kw):
    """Triton on CUDA and the CPU kernel from the same inputs: codes, steps, optimizer state
    and the skipped count bit for bit."""
    gen = torch.Generator().manual_seed(bits * 1000 + dim)
    table, step = make_table(3000, dim, bits, fmt, gen)
    indices, offsets = make_batch(3000, 400, gen)
    uniq, grad = ops.embedding_bag_backward(torch.randn(400, dim, generator=gen), indices,
                                            offsets)
    grad[5, 2] = float("nan")
    state = torch.rand(3000, STATE_WIDTH[optimizer](dim), generator=gen)
    step_state = torch.rand(3000 if fmt == "symmetric" else 1, 2, generator=gen)
    kw = dict(bits=bits, dim=dim, fmt=fmt, optimizer=optimizer, lr=0.05, eps=1e-6,
              weight_decay=0.01, betas=(0.8, 0.99), iteration=4, step_lr=1e-3,
              seed=2**40 + bits, counter=2**33 + 7, **kw)
    args = (table, step, state, step_state, uniq, grad)
    with ops.use_triton():
        got = run_update(ops.lowp_update, *cuda(*args), **kw)
    want = run_update(ops.lowp_update, *args, **kw)
    assert all(same(host(a), b) for a, b in zip(got, want))
    assert got[4] == 1


UPDATE_CASES = list(itertools.product(["sgd", "adagrad", "adam", "none"],
                                      ["symmetric", "symmetric_table"],
                                      [(False, "sgd"), (True, "sgd"), (True, "adam")],
                                      [True, False]))


@pytest.mark.parametrize("optimizer,fmt,step_update,stochastic", UPDATE_CASES)
def test_update_equals_cpu(optimizer, fmt, step_update, stochastic):
    bits = 1 + len(optimizer + fmt) % 8
    dim = 136 if stochastic else 64
    check_update(bits, dim, optimizer, fmt, learn_step=step_update[0],
                 step_optimizer=step_update[1], stochastic=stochastic)


@pytest.mark.parametrize("fmt", ["symmetric", "symmetric_table"])
@pytest.mark.parametrize("bits", BITS)
def test_update_bits_equal_cpu(bits, fmt):
    check_update(bits, 16, "adagrad", fmt, learn_step=True, step_optimizer="adam")


def test_update_two_pass_equals_cpu():
    gen = torch.Generator().manual_seed(5)
    for fmt in ["symmetric", "symmetric_table"]:
        table, step = make_table(500, 32, 4, fmt, gen)
        uniq = torch.randperm(500, generator=gen)[:200].sort().values
        grad = torch.randn(200, 32, generator=gen)
        state = torch.rand(500, 1, generator=gen)
        step_state = torch.rand(500 if fmt == "symmetric" else 1, 2, generator=gen)
        args = (table, step, state, step_state, uniq, grad)
        outs = []
        for device in ("cuda", "cpu"):
            on = cuda if device == "cuda" else (lambda *t: list(t))
            wout = torch.zeros(200, 32, device=device)
            with ops.use_triton(device == "cuda"):
                first = run_update(ops.lowp_update, *on(*args), bits=4, dim=32, fmt=fmt,
                                   weights_out=wout)
                second = run_update(ops.lowp_update, *first[:4], *on(uniq, grad * 0.5), bits=4,
                                    dim=32, fmt=fmt, optimizer="none", learn_step=True,
                                    step_optimizer="adam", step_lr=1e-3, weights=wout)
            outs.append([host(x) for x in (wout, *first, *second)])
        assert all(same(a, b) for a, b in zip(*outs))


def test_registered_cuda_kernels():
    """torch.ops.qembed reaches a CUDA kernel for both ops: compiled, or Triton's."""
    gen = torch.Generator().manual_seed(12)
    table, _ = make_table(30, 16, 4, "symmetric", gen)
    indices, offsets = make_batch(30, 6, gen)
    uniq, grad = ops.embedding_bag_backward(torch.randn(6, 16, generator=gen), indices, offsets)
    args = (table.clone(), None, torch.zeros(30, 1), torch.zeros(30, 2), uniq, grad, None, None,
            4, 16, 0, 1, 0.1, 1e-8, 0.0, 0.9, 0.999, 1, True, 0, 1e-3, True, 0, 1)
    on_gpu = [t.cuda() if isinstance(t, torch.Tensor) else t for t in args]
    torch.ops.qembed.lowp_update(*args)
    torch.ops.qembed.lowp_update(*on_gpu)
    assert torch.equal(on_gpu[0].cpu(), args[0]) and torch.equal(on_gpu[2].cpu(), args[2])
    torch.library.opcheck(torch.ops.qembed.lowp_update.default,
                          [t.clone() if isinstance(t, torch.Tensor) else t for t in on_gpu],
                          test_utils=("test_schema", "test_faketensor"))
    t = random_table(20, 16, 4, "symmetric_table")
    indices, offsets = random_bags(20, 6, padding_idx=2)
    torch.library.opcheck(torch.ops.qembed.embedding_bag.default,
                          (*cuda(t.rows, indices, offsets, torch.randn(indices.numel()), t.step),
                           4, 16, 1, 0, False, 2, torch.float16))
