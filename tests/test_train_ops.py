"""Training ops (embedding_bag_backward, embedding_bag_psw_backward, lowp_update) against
qembed.reference and against autograd, on fresh random data."""
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

from qembed import ops, reference
from qembed.formats import qmax, qmin

STATE_WIDTH = {"sgd": lambda d: 0, "adagrad": lambda d: 1, "adam": lambda d: 2 * d,
               "none": lambda d: 0}


def stable_seed(*values) -> int:
    """A seed from the test's parameters, the same in every process (``hash`` of a string is
    randomised per process)."""
    return zlib.crc32(repr(values).encode()) % 2**31


def make_table(rows, dim, bits, fmt, gen):
    """A symmetric table with random steps and codes spread over the whole range."""
    steps = torch.rand(rows if fmt == "symmetric" else 1, generator=gen) * 0.05 + 0.01
    w = torch.randn(rows, dim, generator=gen) * steps.view(-1, 1) * (qmax(bits) + 1) * 0.6
    table = ops.quantize(w, bits, fmt, steps)
    return table, (steps.clone() if fmt == "symmetric_table" else None)


def make_batch(rows, bags, gen, dtype=torch.int64):
    lengths = torch.randint(0, 9, (bags,), generator=gen)
    indices = torch.randint(0, rows, (int(lengths.sum()),), generator=gen, dtype=dtype)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]).to(dtype)
    return indices, offsets


@pytest.mark.parametrize("mode,psw,include_last,padding,dtype", [
    ("sum", False, False, None, torch.int64), ("sum", True, False, 3, torch.int32),
    ("mean", False, True, 5, torch.int64), ("mean", False, False, None, torch.int32),
    ("none", True, False, 2, torch.int64), ("none", False, False, None, torch.int64)])
def test_backward_matches_reference_and_autograd(mode, psw, include_last, padding, dtype):
    gen = torch.Generator().manual_seed(stable_seed(mode, psw, include_last, padding))
    rows, dim, bits, fmt = 40, 24, 4, "symmetric"
    table, step = make_table(rows, dim, bits, fmt, gen)
    indices, offsets = make_batch(rows, 17, gen, dtype)
    if include_last:
        offsets = torch.cat([offsets, offsets.new_tensor([indices.numel()])])
    weights = torch.randn(indices.numel(), generator=gen) if psw else None
    n_out = indices.numel() if mode == "none" else offsets.numel() - include_last
    grad_out = torch.randn(n_out, dim, generator=gen)

    uniq, grad = ops.embedding_bag_backward(grad_out, indices, offsets, weights, mode,
                                            include_last, padding)
    ref_uniq, ref_grad = reference.embedding_bag_backward(grad_out, indices, offsets, weights,
                                                          mode, include_last, padding)
    assert torch.equal(uniq, ref_uniq) and torch.equal(grad, ref_grad)
    assert uniq.dtype == torch.int64 and grad.shape == (uniq.numel(), dim)
    assert padding is None or padding not in uniq.tolist()

    dense = ops.dequantize(table, bits, dim, fmt, step).requires_grad_()
    if mode == "none":
        out = F.embedding(indices, dense, padding_idx=padding)
        if weights is not None:
            out = out * weights[:, None]
    else:
        out = F.embedding_bag(indices, dense, offsets, mode=mode, per_sample_weights=weights,
                              include_last_offset=include_last, padding_idx=padding)
    out.backward(grad_out)
    expect = dense.grad
    torch.testing.assert_close(grad, expect[uniq], rtol=1e-5, atol=1e-6)
    others = torch.ones(rows, dtype=torch.bool)
    others[uniq] = False
    assert not expect[others].any()


@pytest.mark.parametrize("offsets", [[], [0, 0, 0], [0, 2]])
def test_backward_edge_batches(offsets):
    """No bags, empty bags, and an empty batch."""
    for indices in (torch.tensor([4, 1, 4]), torch.zeros(0, dtype=torch.long)):
        off = torch.tensor(offsets, dtype=torch.long).clamp(max=indices.numel())
        grad_out = torch.randn(off.numel(), 8)
        got = ops.embedding_bag_backward(grad_out, indices, off)
        want = reference.embedding_bag_backward(grad_out, indices, off)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("mode,fmt,bits", [("sum", "symmetric", 3), ("sum", "affine", 8),
                                           ("none", "symmetric_table", 5)])
def test_psw_gradient_matches_autograd(mode, fmt, bits):
    gen = torch.Generator().manual_seed(bits)
    rows, dim = 30, 16
    w = torch.randn(rows, dim, generator=gen)
    step = torch.full((1,), 0.3) if fmt == "symmetric_table" else torch.full((rows,), 0.3)
    table = ops.quantize(w, bits, fmt, None if fmt == "affine" else step)
    step = step if fmt == "symmetric_table" else None
    indices, offsets = make_batch(rows, 11, gen)
    psw = torch.randn(indices.numel(), generator=gen, requires_grad=True)
    psw_ref = psw.detach().clone().requires_grad_()
    out = ops.embedding_bag(table, indices, offsets, bits, dim, fmt, step, psw, mode,
                            padding_idx=4)
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    dense = ops.dequantize(table, bits, dim, fmt, step)
    if mode == "none":
        ref = F.embedding(indices, dense, padding_idx=4) * psw_ref[:, None]
        ref = ref * (indices != 4)[:, None]
    else:
        ref = F.embedding_bag(indices, dense, offsets, mode="sum", per_sample_weights=psw_ref,
                              padding_idx=4)
    ref.backward(grad_out)
    torch.testing.assert_close(psw.grad, psw_ref.grad, rtol=1e-5, atol=1e-5)
    direct = reference.embedding_bag_psw_backward(grad_out, table, indices, offsets, bits, dim,
                                                  fmt, step, mode, padding_idx=4)
    assert torch.equal(psw.grad, direct)


def same(a, b):
    """Bit-exact equality (NaN equal to NaN), None equal to None."""
    if a is None or b is None:
        return a is None and b is None
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        a, b = a.view(torch.int32), b.view(torch.int32)
    return torch.equal(a, b)


def run_update(impl, table, step, state, step_state, uniq, grad, **kw):
    t, s, st, sst = table.clone(), None if step is None else step.clone(), state.clone(), \
        step_state.clone()
    skipped = impl(t, s, st, sst, uniq, grad, **kw)
    return t, s, st, sst, int(skipped)


CASES = list(itertools.product(["sgd", "adagrad", "adam"], [1, 2, 3, 4, 5, 6, 7, 8],
                               ["symmetric", "symmetric_table"], [True, False]))


@pytest.mark.parametrize("optimizer,bits,fmt,stochastic", CASES)
def test_update_matches_reference(optimizer, bits, fmt, stochastic):
    seed = stable_seed(optimizer, bits, fmt, stochastic)
    gen = torch.Generator().manual_seed(seed)
    rows, dim = 64, 16
    table, step = make_table(rows, dim, bits, fmt, gen)
    indices, offsets = make_batch(rows, 24, gen)
    grad_out = torch.randn(24, dim, generator=gen)
    uniq, grad = ops.embedding_bag_backward(grad_out, indices, offsets)
    grad[0, 1] = float("inf")
    state = torch.rand(rows, STATE_WIDTH[optimizer](dim), generator=gen)
    for learn, step_opt in [(False, "sgd"), (True, "sgd"), (True, "adam")]:
        step_state = torch.rand(rows if fmt == "symmetric" else 1, 2, generator=gen)
        kw = dict(bits=bits, dim=dim, fmt=fmt, optimizer=optimizer, lr=0.05, eps=1e-6,
                  weight_decay=0.01, betas=(0.8, 0.99), iteration=int(seed % 7) + 1,
                  learn_step=learn, step_optimizer=step_opt, step_lr=1e-3,
                  stochastic=stochastic, seed=seed, counter=seed % 1000)
        got = run_update(ops.lowp_update, table, step, state, step_state, uniq, grad, **kw)
        want = run_update(reference.lowp_update, table, step, state, step_state, uniq, grad,
                          **kw)
        assert all(same(a, b) for a, b in zip(got, want))
        assert got[4] == 1
        assert not torch.equal(got[0], table)


def test_two_pass_pieces_match_reference():
    """weights_out then an optimizer-free step update from given weights (the two-pass path)."""
    gen = torch.Generator().manual_seed(5)
    rows, dim, bits = 50, 32, 4
    for fmt in ["symmetric", "symmetric_table"]:
        table, step = make_table(rows, dim, bits, fmt, gen)
        uniq = torch.randperm(rows, generator=gen)[:20].sort().values
        grad = torch.randn(20, dim, generator=gen)
        grad[3, 0] = float("nan")
        state = torch.rand(rows, 1, generator=gen)
        step_state = torch.rand(rows if fmt == "symmetric" else 1, 2, generator=gen)
        outs = []
        for impl in (ops.lowp_update, reference.lowp_update):
            wout = torch.zeros(20, dim)
            t, s, st, sst, _ = run_update(impl, table, step, state, step_state, uniq, grad,
                                          bits=bits, dim=dim, fmt=fmt, stochastic=False,
                                          weights_out=wout)
            g2 = torch.randn(20, dim, generator=torch.Generator().manual_seed(1))
            res = run_update(impl, t, s, st, sst, uniq, g2, bits=bits, dim=dim, fmt=fmt,
                             optimizer="none", learn_step=True, step_optimizer="adam",
                             step_lr=1e-3, weights=wout, seed=3, counter=9)
            outs.append((wout,) + res)
        assert outs[0][0][3].isnan().all() and not outs[0][0][:3].isnan().any()
        assert all(same(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_is_unbiased(bits):
    gen = torch.Generator().manual_seed(bits)
    rows, dim, step = 4096, 16, 0.1
    w = (torch.rand(dim, generator=gen) * 2 - 1) * step * (qmax(bits) - 0.5)
    table = ops.quantize(torch.zeros(rows, dim), bits, "symmetric", torch.full((rows,), step))
    uniq = torch.arange(rows)
    ops.lowp_update(table, None, torch.zeros(rows, 0), torch.zeros(rows, 0), uniq,
                    torch.zeros(rows, dim), bits, dim, optimizer="none",
                    weights=w.expand(rows, dim).contiguous(), seed=11, counter=4)
    values = ops.dequantize(table, bits, dim, "symmetric")
    assert (values - w).abs().max() < step * (1 + 1e-5)  # one of the two neighbours
    sigma = step * 0.5 / rows ** 0.5
    assert (values.mean(0) - w).abs().max() < 5 * sigma


class _LSQ(torch.autograd.Function):
    """Reference LSQ fake-quantizer (Esser et al.): s * round(clamp(w / s, Qn, Qp)) with a
    straight-through round, the gradient of s scaled by gscale, autograd in fp64."""

    @staticmethod
    def forward(ctx, w, s, qn, qp, gscale):
        ctx.save_for_backward(w, s)
        ctx.args = qn, qp, gscale
        return s[:, None] * torch.clamp(torch.round(w / s[:, None]), qn, qp)

    @staticmethod
    def backward(ctx, g):
        w, s = ctx.saved_tensors
        qn, qp, gscale = ctx.args
        with torch.enable_grad():
            s_ = s.detach().double().requires_grad_()
            x = torch.clamp(w.double() / s_[:, None], qn, qp)
            q = x + (torch.round(x) - x).detach()  # LSQ: clip, then straight-through round
            (q * s_[:, None] * g.double()).sum().backward()
        return None, (s_.grad * gscale).to(s.dtype), None, None, None


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_lsq_step_gradient_matches_autograd(bits):
    gen = torch.Generator().manual_seed(100 + bits)
    rows, dim, lr = 32, 16, 1e-4
    step = torch.rand(rows, generator=gen) * 0.05 + 0.05
    table = ops.quantize(torch.zeros(rows, dim), bits, "symmetric", step)
    qn, qp = qmin(bits), qmax(bits)
    w = torch.randn(rows, dim, generator=gen) * step[:, None] * (qp + 2)
    g = torch.randn(rows, dim, generator=gen)
    ops.lowp_update(table, None, torch.zeros(rows, 0), torch.zeros(rows, 0), torch.arange(rows),
                    g, bits, dim, optimizer="none", weights=w, learn_step=True, step_lr=lr,
                    stochastic=False)
    s = step.clone().requires_grad_()
    (_LSQ.apply(w, s, qn, qp, 1 / (max(qp, 1) * dim) ** 0.5) * g).sum().backward()
    new = reference.row_params(table, bits, dim, "symmetric")[0]
    torch.testing.assert_close(new, (step - lr * s.grad).clamp(min=1e-10), rtol=1e-6, atol=1e-9)


def test_thread_count_invariance():
    gen = torch.Generator().manual_seed(9)
    rows, dim, bits = 5000, 32, 4
    indices = torch.randint(0, rows, (20000,), generator=gen)
    offsets = torch.arange(0, 20000, 10)
    grad_out = torch.randn(2000, dim, generator=gen)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for fmt in ("symmetric", "symmetric_table"):
                table, step = make_table(rows, dim, bits, fmt, torch.Generator().manual_seed(1))
                uniq, grad = ops.embedding_bag_backward(grad_out, indices, offsets, mode="mean")
                st = torch.zeros(rows, 1)
                sst = torch.zeros(rows if fmt == "symmetric" else 1, 2)
                ops.lowp_update(table, step, st, sst, uniq, grad, bits, dim, fmt,
                                learn_step=True, step_optimizer="adam", step_lr=1e-3, seed=1)
                results.append((uniq, grad, table, step, st, sst))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[:2], results[2:]):
        assert all(same(x, y) for x, y in zip(a, b))


def test_nonfinite_rows_untouched_and_counted():
    gen = torch.Generator().manual_seed(3)
    rows, dim, bits = 20, 16, 8
    for fmt in ("symmetric", "symmetric_table"):
        table, step = make_table(rows, dim, bits, fmt, gen)
        uniq = torch.tensor([1, 4, 7, 9])
        grad = torch.randn(4, dim, generator=gen)
        grad[1, 5], grad[3, 0] = float("nan"), float("-inf")
        state = torch.rand(rows, 2 * dim, generator=gen)
        sst = torch.zeros(rows if fmt == "symmetric" else 1, 2)
        t, s, st, _, skipped = run_update(ops.lowp_update, table, step, state, sst, uniq, grad, bits=bits, dim=dim,
                                          fmt=fmt, optimizer="adam", learn_step=True,
                                          step_lr=1e-3, step_optimizer="adam")
        assert skipped == 2
        assert torch.equal(t[[4, 9]], table[[4, 9]]) and torch.equal(st[[4, 9]], state[[4, 9]])
        assert not torch.equal(t[[1, 7]], table[[1, 7]])
        assert s is None or (torch.isfinite(s).all() and not torch.equal(s, step))


def test_bad_arguments_raise():
    table, _ = make_table(10, 16, 4, "symmetric", torch.Generator().manual_seed(0))
    empty = torch.zeros(10, 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.lowp_update(table, None, empty, empty, torch.tensor([3, 3]), torch.zeros(2, 16), 4, 16,
                        optimizer="sgd")
    with pytest.raises(IndexError, match="out of range"):
        ops.lowp_update(table, None, empty, empty, torch.tensor([10]), torch.zeros(1, 16), 4, 16,
                        optimizer="sgd")
    with pytest.raises(ValueError, match="state"):
        ops.lowp_update(table, None, empty, empty, torch.tensor([1]), torch.zeros(1, 16), 4, 16,
                        optimizer="adagrad")


def test_opcheck():
    gen = torch.Generator().manual_seed(12)
    rows, dim, bits = 30, 16, 4
    table, _ = make_table(rows, dim, bits, "symmetric", gen)
    indices, offsets = make_batch(rows, 6, gen)
    grad_out = torch.randn(6, dim, generator=gen)
    psw = torch.randn(indices.numel(), generator=gen)
    torch.library.opcheck(torch.ops.qembed.embedding_bag_psw_backward.default,
                          (grad_out, table, indices, offsets, None, bits, dim, 0, 0, False, -1))
    torch.library.opcheck(torch.ops.qembed.embedding_bag_backward.default,
                          (grad_out, indices, offsets, psw, 0, False, -1),
                          test_utils=("test_schema", "test_faketensor"))
    uniq, grad = ops.embedding_bag_backward(grad_out, indices, offsets)
    torch.library.opcheck(torch.ops.qembed.lowp_update.default,
                          (table.clone(), None, torch.zeros(rows, 1), torch.zeros(rows, 0), uniq,
                           grad, None, None, bits, dim, 0, 1, 0.1, 1e-8, 0.0, 0.9, 0.999, 1,
                           True, 0, 1e-3, True, 0, 1),
                          test_utils=("test_schema", "test_faketensor"))
    half = psw.half().requires_grad_()
    ops.embedding_bag(table, indices, offsets, bits, dim, "symmetric",
                      per_sample_weights=half).sum().backward()
    assert half.grad.dtype == torch.float16
