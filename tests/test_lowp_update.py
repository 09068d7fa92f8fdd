"""lowp_update, the fused low-precision training step, on every backend that has it (the CPU,
CUDA and Triton kernels): codes, steps, optimizer state and the skipped count bit for bit
against the CPU kernel and the reference; stochastic rounding, the LSQ step gradient against
autograd, and bad input."""
import pytest
import torch
from conftest import (
    BACKENDS,
    BITS,
    STATE_WIDTH,
    TRITON_OP_BACKENDS,
    backend_cases,
    backends,
    make_batch,
    make_table,
    run_update,
    same,
)

from qembed import formats, ops, reference
from qembed.formats import qmax, qmin

SYMMETRIC = ["symmetric", "symmetric_table"]
STEP_UPDATES = [(False, "sgd"), (True, "sgd"), (True, "adam")]  # learn_step, step_optimizer


def update_dim(backend, bits):
    """Columns per row: blocks of every shape on the compiled kernels; in Triton's interpreter
    (slow: its row sums take one step per column) 8 or 16, but 136 at 8 bits."""
    if backend.interpreted:
        return 136 if bits == 8 else [16, 8][bits % 2]
    return [16, 64, 136, 8][bits % 4]


def update_case(backend, bits, fmt, optimizer, dim):
    """A table, its step, optimizer state, step state and a batch's distinct rows and
    gradients, two rows' gradients not finite; small in Triton's interpreter."""
    rows, bags = ((12, 4) if dim > 16 else (40, 10)) if backend.interpreted else (300, 60)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    table, step = make_table(rows, dim, bits, fmt, gen)
    indices, offsets = make_batch(rows, bags, gen)
    uniq, grad = ops.embedding_bag_backward(torch.randn(bags, dim, generator=gen), indices,
                                            offsets)
    grad[0, 1] = float("inf")
    grad[min(5, uniq.numel() - 1)] = float("nan")
    state = torch.rand(rows, STATE_WIDTH[optimizer](dim), generator=gen)
    step_state = torch.rand(rows if fmt == "symmetric" else 1, 2, generator=gen)
    return table, step, state, step_state, uniq, grad


def update_everywhere(backend, case, weights=None, with_out=False, **kw):
    """The update of `case` on the backend, on the CPU kernel and by the reference: for each
    [table, step, state, step_state, weights_out] on the host and the skipped count."""
    results = []
    for on in (backend, BACKENDS["cpu"], BACKENDS["reference"]):
        wout = on.to(torch.zeros(case[5].shape)) if with_out else None
        t, s, st, sst, skipped = on.run(run_update, ops.lowp_update, *case, weights=weights,
                                        weights_out=wout, **kw)
        results.append([None if x is None else x.cpu() for x in (t, s, st, sst, wout)]
                       + [skipped])
    return results


def assert_all_same(results):
    names = ["rows", "step", "state", "step_state", "weights_out", "skipped"]
    for other in results[1:]:
        assert [n for n, a, b in zip(names, results[0], other) if not same(a, b)] == []


@pytest.mark.parametrize(*backend_cases(TRITON_OP_BACKENDS, thin=("bits",),
                                        optimizer=["sgd", "adagrad", "adam", "none"],
                                        fmt=SYMMETRIC, step_update=STEP_UPDATES,
                                        stochastic=[True, False], bits=BITS))
def test_update_equals_cpu_and_reference(backend, optimizer, fmt, step_update, stochastic, bits):
    """Same inputs and seed (64-bit, negative ones included): the same codes, steps, state,
    weights_out and skipped count as the CPU kernel and the reference; rows whose gradient
    is not finite untouched."""
    dim = update_dim(backend, bits)
    case = update_case(backend, bits, fmt, optimizer, dim)
    learn_step, step_optimizer = step_update
    seed = -bits if bits % 2 else 2**40 + bits
    results = update_everywhere(
        backend, case, with_out=bits % 2 == 0, bits=bits, dim=dim, fmt=fmt, optimizer=optimizer,
        lr=0.05, eps=1e-6, weight_decay=0.01, betas=(0.8, 0.99), iteration=3,
        learn_step=learn_step, step_optimizer=step_optimizer, step_lr=1e-3,
        stochastic=stochastic, seed=seed, counter=2**33 + 5)
    assert_all_same(results)
    assert results[0][-1] == int((~torch.isfinite(case[5]).all(1)).sum())
    if optimizer != "none":
        assert not torch.equal(results[0][0], case[0])


@pytest.mark.parametrize("fmt", SYMMETRIC)
@pytest.mark.parametrize("backend", backends(*TRITON_OP_BACKENDS))
def test_update_from_given_weights(backend, fmt):
    """The two-pass pieces: weights_out from one update (NaN for a skipped row), then an
    optimizer-free step update from those weights (the NaN row skipped); rows wider than a
    warp's groups on the GPU."""
    rows, dim, u = (40, 16, 20) if backend.interpreted else (500, 520, 300)
    gen = torch.Generator().manual_seed(5)
    table, step = make_table(rows, dim, 4, fmt, gen)
    uniq = torch.randperm(rows, generator=gen)[:u].sort().values
    grad = torch.randn(u, dim, generator=gen)
    grad[3, 0] = float("nan")
    state = torch.rand(rows, 1, generator=gen)
    step_state = torch.rand(rows if fmt == "symmetric" else 1, 2, generator=gen)
    first = update_everywhere(backend, (table, step, state, step_state, uniq, grad),
                              with_out=True, bits=4, dim=dim, fmt=fmt, stochastic=False)
    assert_all_same(first)
    wout = first[0][4]
    assert wout[3].isnan().all() and not wout[torch.arange(u) != 3].isnan().any()
    g2 = torch.randn(u, dim, generator=gen)
    second = update_everywhere(backend, (*first[1][:4], uniq, g2), weights=wout, bits=4, dim=dim,
                               fmt=fmt, optimizer="none", learn_step=True, step_optimizer="adam",
                               step_lr=1e-3, seed=3, counter=9)
    assert_all_same(second)
    assert second[0][-1] == 1


@pytest.mark.parametrize("fmt", SYMMETRIC)
@pytest.mark.parametrize("backend", backends(*TRITON_OP_BACKENDS))
def test_nonfinite_rows_untouched_and_counted(backend, fmt):
    table, step = make_table(20, 16, 8, fmt, torch.Generator().manual_seed(3))
    uniq = torch.tensor([1, 4, 7, 9])
    grad = torch.randn(4, 16)
    grad[1, 5], grad[3, 0] = float("nan"), float("-inf")
    state = torch.rand(20, 32)
    sst = torch.zeros(20 if fmt == "symmetric" else 1, 2)
    t, s, st, _, skipped = backend.run(run_update, ops.lowp_update, table, step, state, sst, uniq,
                                       grad, bits=8, dim=16, fmt=fmt, optimizer="adam",
                                       learn_step=True, step_lr=1e-3, step_optimizer="adam")
    t, s, st = t.cpu(), None if s is None else s.cpu(), st.cpu()
    assert skipped == 2
    assert torch.equal(t[[4, 9]], table[[4, 9]]) and torch.equal(st[[4, 9]], state[[4, 9]])
    assert not torch.equal(t[[1, 7]], table[[1, 7]])
    assert s is None or (torch.isfinite(s).all() and not torch.equal(s, step))
    # all rows skipped: the table's step stays
    _, s, _, _, skipped = backend.run(run_update, ops.lowp_update, table, step, state, sst,
                                      uniq[1:2], grad[1:2], bits=8, dim=16, fmt=fmt,
                                      optimizer="sgd", learn_step=True, step_lr=1e-3)
    assert skipped == 1 and (s is None or torch.equal(s.cpu(), step))


@pytest.mark.parametrize("backend", backends(*TRITON_OP_BACKENDS))
def test_empty_batch(backend):
    table, _ = make_table(10, 16, 4, "symmetric", torch.Generator().manual_seed(0))
    t, _, _, _, skipped = backend.run(run_update, ops.lowp_update, table, None, torch.zeros(10, 1),
                                      torch.zeros(10, 0), torch.zeros(0, dtype=torch.long),
                                      torch.zeros(0, 16), bits=4, dim=16)
    assert skipped == 0 and torch.equal(t.cpu(), table)


@pytest.mark.parametrize("backend", backends("cuda", "triton-cuda"))
def test_returns_count_on_device(backend):
    table, _ = make_table(10, 16, 4, "symmetric", torch.Generator().manual_seed(0))
    skipped = backend.run(ops.lowp_update, table, None, torch.zeros(10, 1), torch.zeros(10, 0),
                          torch.tensor([1, 4]), torch.randn(2, 16), 4, 16)
    assert skipped.is_cuda and skipped.dtype == torch.int64 and skipped.dim() == 0
    assert int(skipped) == 0


@pytest.mark.parametrize("backend", backends("cuda"))
def test_bad_rows_left_alone_unless_validating(backend, monkeypatch):
    """Out-of-range or repeated rows are left alone; QEMBED_CUDA_VALIDATE=1 raises."""
    table, _ = make_table(10, 16, 4, "symmetric", torch.Generator().manual_seed(0))
    empty, grad = torch.zeros(10, 0), torch.randn(2, 16)
    for uniq, error, match in [([3, 10], IndexError, "out of range"),
                               ([3, 3], ValueError, "strictly increasing")]:
        rows = torch.tensor(uniq)
        t = backend.to(table.clone())
        backend.run(ops.lowp_update, t, None, empty, empty, rows, grad, 4, 16, optimizer="sgd")
        t = t.cpu()
        assert torch.equal(t[4:], table[4:]) and torch.equal(t[:3], table[:3])
        monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
        with pytest.raises(error, match=match):
            backend.run(ops.lowp_update, t, None, empty, empty, rows, grad, 4, 16,
                        optimizer="sgd")
        monkeypatch.delenv("QEMBED_CUDA_VALIDATE")


@pytest.mark.parametrize("backend", backends("cpu", "reference", "triton-interpreter"))
def test_bad_arguments_raise(backend):
    table, _ = make_table(10, 16, 4, "symmetric", torch.Generator().manual_seed(0))
    empty = torch.zeros(10, 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        backend.run(ops.lowp_update, table, None, empty, empty, torch.tensor([3, 3]),
                    torch.zeros(2, 16), 4, 16, optimizer="sgd")
    with pytest.raises(IndexError, match="row 10 is out of range"):
        backend.run(ops.lowp_update, table, None, empty, empty, torch.tensor([10]),
                    torch.zeros(1, 16), 4, 16, optimizer="sgd")
    with pytest.raises(ValueError, match="state must be a contiguous"):
        backend.run(ops.lowp_update, table, None, empty, empty, torch.tensor([1]),
                    torch.zeros(1, 16), 4, 16, optimizer="adagrad")
    with pytest.raises(ValueError, match="symmetric format"):
        affine = torch.zeros(10, formats.row_bytes(16, 4, "affine"), dtype=torch.uint8)
        backend.run(ops.lowp_update, affine, None, empty, empty, torch.tensor([1]),
                    torch.zeros(1, 16), 4, 16, fmt="affine", optimizer="sgd")
    with pytest.raises(ValueError, match="column_offset must be a non-negative multiple of 8"):
        backend.run(ops.lowp_update, table, None, empty, empty, torch.tensor([1]),
                    torch.zeros(1, 16), 4, 16, optimizer="sgd", column_offset=4)
    with pytest.raises(ValueError, match="row_offset must not be negative"):
        backend.run(ops.lowp_update, table, None, empty, empty, torch.tensor([1]),
                    torch.zeros(1, 16), 4, 16, optimizer="sgd", row_offset=-1)


# --- a shard of a table: its place in the whole table keys its rounding ---------------------

@pytest.mark.parametrize("fmt", SYMMETRIC)
@pytest.mark.parametrize("backend", backends(*TRITON_OP_BACKENDS))
def test_key_offsets_equal_cpu_and_reference(backend, fmt):
    """Rows and columns keyed from row_offset (past 2^32) and column_offset: the same bits
    as the CPU kernel and the reference."""
    dim = 16 if backend.interpreted else 64
    case = update_case(backend, 4, fmt, "adam", dim)
    results = update_everywhere(backend, case, bits=4, dim=dim, fmt=fmt, optimizer="adam",
                                learn_step=True, step_lr=1e-3, seed=5, counter=2,
                                row_offset=2**33 + 7, column_offset=24)
    assert_all_same(results)


SHARD_ROWS, SHARD_BITS = 40, 5
# the whole table's dim, and a shard's rows and columns of it; "ragged": a dim that is no
# multiple of 8 (rows padded), a shard of 12 of its columns (padded too)
SPLITS = {"rows": (32, slice(12, 31), slice(0, 32)), "columns": (32, slice(0, 40), slice(8, 24)),
          "both": (32, slice(20, 40), slice(24, 32)), "ragged": (20, slice(5, 33), slice(8, 20))}
# (optimizer, fmt, learn_step): a row's update reads only its own columns' values and state
PER_ELEMENT = [("sgd", "symmetric", False), ("adam", "symmetric_table", False),
               ("adam", "symmetric", False)]
# ... or its whole row (row-wise Adagrad, a learned per-row step): exact on row splits only
PER_ROW = [("adagrad", "symmetric", True), ("adam", "symmetric", True),
           ("adagrad", "symmetric_table", False)]


def shard_rows(table, dim, fmt, rows, cols):
    """The shard's packed rows: its columns' codes, the rows' inline step."""
    width = cols.stop - cols.start
    codes = reference.unpack(table[:, :formats.code_bytes(dim, SHARD_BITS)], SHARD_BITS,
                             dim)[rows, cols]
    out = torch.zeros(codes.shape[0], formats.row_bytes(width, SHARD_BITS, fmt),
                      dtype=torch.uint8)
    out[:, :formats.code_bytes(width, SHARD_BITS)] = reference.pack(codes, SHARD_BITS)
    out[:, formats.param_offset(width, SHARD_BITS):] = \
        table[rows, formats.param_offset(dim, SHARD_BITS):]
    return out


def real_codes(table, dim):
    """The codes of a table's `dim` columns (not its pad) and its rows' parameter bytes."""
    codes = reference.unpack(table[:, :formats.code_bytes(dim, SHARD_BITS)].cpu(), SHARD_BITS,
                             dim)
    return codes, table[:, formats.param_offset(dim, SHARD_BITS):].cpu()


def shard_state(state, dim, optimizer, rows, cols):
    if optimizer == "adam":  # [m | v]
        return torch.cat([state[rows, cols], state[rows, dim + cols.start: dim + cols.stop]], 1)
    return state[rows]


@pytest.mark.parametrize("split,optimizer,fmt,learn_step",
                         [(split, *u) for split in SPLITS
                          for u in PER_ELEMENT + (PER_ROW if split == "rows" else [])])
@pytest.mark.parametrize("backend", backends("reference", *TRITON_OP_BACKENDS))
def test_shard_update_equals_the_whole_table(backend, split, optimizer, fmt, learn_step):
    """A shard (some rows and columns, a table of its own) updated with its row_offset and
    column_offset gets the whole table's codes, steps and state over its rows and columns,
    bit for bit, wherever its update reads nothing outside the shard; keyed from 0 it
    rounds differently."""
    dim, rows, cols = SPLITS[split]
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    table, step = make_table(SHARD_ROWS, dim, SHARD_BITS, fmt, gen)
    state = torch.rand(SHARD_ROWS, STATE_WIDTH[optimizer](dim), generator=gen)
    step_state = torch.zeros(SHARD_ROWS, 0)
    uniq = torch.randperm(SHARD_ROWS, generator=gen)[:25].sort().values
    grad = torch.randn(uniq.numel(), dim, generator=gen) * 0.05
    kw = dict(bits=SHARD_BITS, dim=dim, fmt=fmt, optimizer=optimizer, lr=0.1, iteration=3,
              learn_step=learn_step, step_lr=0.1, stochastic=True, seed=2**35 + 9, counter=3)
    whole = backend.run(run_update, ops.lowp_update, table, step, state, step_state, uniq, grad,
                        **kw)
    whole = [x.cpu() if torch.is_tensor(x) else x for x in whole]

    mine = (uniq >= rows.start) & (uniq < rows.stop)
    local = (shard_rows(table, dim, fmt, rows, cols), step,
             shard_state(state, dim, optimizer, rows, cols), step_state[rows],
             uniq[mine] - rows.start, grad[mine][:, cols].contiguous())
    kw.update(dim=cols.stop - cols.start)
    got = backend.run(run_update, ops.lowp_update, *local, row_offset=rows.start,
                      column_offset=cols.start, **kw)
    want_codes, want_params = real_codes(whole[0], dim)
    got_codes, got_params = real_codes(got[0], kw["dim"])
    assert same(got_codes, want_codes[rows, cols]) and same(got_params, want_params[rows])
    assert same(got[2], shard_state(whole[2], dim, optimizer, rows, cols))
    assert same(got[1], whole[1])
    unkeyed = backend.run(run_update, ops.lowp_update, *local, **kw)
    assert not same(real_codes(unkeyed[0], kw["dim"])[0], got_codes)


# --- the CPU kernel against independent computations ------------------------------------------

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


@pytest.mark.usefixtures("cpu_capability")
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


@pytest.mark.usefixtures("cpu_capability")
def test_thread_count_invariance():
    """embedding_bag_backward and lowp_update give the same bits on 1 and 2 threads."""
    gen = torch.Generator().manual_seed(9)
    rows, dim, bits = 5000, 32, 4
    indices = torch.randint(0, rows, (20000,), generator=gen)
    offsets = torch.arange(0, 20000, 10)
    grad_out = torch.randn(2000, dim, generator=gen)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for fmt in SYMMETRIC:
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


WIDE_CASES = [("adagrad", 8, "symmetric", True), ("adagrad", 4, "symmetric", True),
              ("adam", 3, "symmetric", True), ("sgd", 6, "symmetric_table", True),
              ("adagrad", 2, "symmetric_table", False), ("adam", 7, "symmetric", False),
              ("sgd", 1, "symmetric", True), ("adagrad", 5, "symmetric_table", True)]


@pytest.mark.usefixtures("cpu_capability")
@pytest.mark.parametrize("dim", [8, 24, 40, 64, 136])
@pytest.mark.parametrize("optimizer,bits,fmt,stochastic", WIDE_CASES)
def test_update_matches_reference_across_widths(optimizer, bits, fmt, stochastic, dim):
    """The CPU kernel on rows of every SIMD shape: whole vectors, a half vector left over,
    several blocks of uniforms; Adagrad's and LSQ's lane sums over all of them."""
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator().manual_seed(seed)
    rows = 300
    table, step = make_table(rows, dim, bits, fmt, gen)
    uniq = torch.randperm(rows, generator=gen)[:120].sort().values
    grad = torch.randn(120, dim, generator=gen) * 0.3
    grad[7, dim - 1] = float("nan")
    state = torch.rand(rows, STATE_WIDTH[optimizer](dim), generator=gen)
    step_state = torch.rand(rows if fmt == "symmetric" else 1, 2, generator=gen)
    kw = dict(bits=bits, dim=dim, fmt=fmt, optimizer=optimizer, lr=0.05, eps=1e-6,
              weight_decay=0.01, betas=(0.8, 0.99), iteration=3, learn_step=True,
              step_optimizer="adam" if optimizer == "adam" else "sgd", step_lr=1e-3,
              stochastic=stochastic, seed=seed, counter=seed % 977)
    got = run_update(ops.lowp_update, table, step, state, step_state, uniq, grad, **kw)
    want = run_update(reference.lowp_update, table, step, state, step_state, uniq, grad, **kw)
    assert all(same(a, b) for a, b in zip(got, want))
    assert got[4] == 1


@pytest.mark.usefixtures("cpu_capability")
@pytest.mark.parametrize("dim", [8, 24, 64, 136])
def test_stochastic_rounding_stream_is_the_reference_stream(dim):
    """The uniforms the CPU kernels draw, recovered bit for bit: with step 1, w = j / 2^24 in
    [0, 1) rounds up exactly when j >= 2^24 (1 - u), so a binary search over j per element
    (24 quantize calls) gives each u's 24 bits."""
    rows, seed, counter = 37, 2**40 + 123, 2**33 + 5
    lo = torch.zeros(rows, dim, dtype=torch.long)  # j where the code is still 0
    hi = torch.full((rows, dim), 2**24, dtype=torch.long)  # j where it is 1 (t = 1 always)
    steps = torch.ones(rows)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        t = mid.to(torch.float32) / 2**24  # exact: mid < 2^24
        table = ops.quantize(t, 2, "symmetric", steps, stochastic=True, seed=seed,
                             counter=counter)
        up = ops.dequantize(table, 2, dim, "symmetric", None) == 1
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    bits = torch.where(hi == 2**24, 0, 2**24 - hi)  # u * 2^24; u = 0 never rounds up
    want = reference.sr_uniforms(seed, counter, torch.arange(rows), dim) * 2**24
    assert torch.equal(bits, want.long())
