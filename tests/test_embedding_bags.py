"""embedding_bags (every feature of a batch in one lookup), its backward, its per-sample
weight gradient, the fused update of all tables and the backward and update in one op, on
the CPU and CUDA kernels: against the reference, against the single-table ops feature by
feature (and the one op against the two), and on bad input. No TorchRec needed."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    BITS,
    COMPILED_BACKENDS,
    FORMATS,
    KeyedBatch,
    assert_close,
    backends,
    mixed_specs,
    same,
    trainable_tables,
    training_state,
)

from qembed import formats, ops, reference

CASES = [
    # (table bits, tables read by each feature, poolings)
    ([8, 4, 2], [0, 1, 2], ["sum", "mean", "sum"]),
    ([1, 3, 5, 7], [3, 0, 2, 1], ["mean", "sum", "sum", "mean"]),
    ([6, 8], [0, 1, 0, 0], ["sum", "mean", "mean", "sum"]),  # a table shared by three features
    ([4], [0], ["sum"]),
]


def single_table_lookup(backend, b, f, **kwargs):
    """embedding_bag of feature f alone on its table, on the backend."""
    table = b.tables[b.tables_of[f]]
    values, offsets, weights = b.feature(f)
    return backend.run(ops.embedding_bag, table.rows, values, offsets, table.bits, table.dim,
                       table.fmt, table.step, weights, b.poolings[f], True, **kwargs)


@pytest.mark.parametrize("bits,tables_of,poolings", CASES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_lookup_matches_reference_and_single_table_op(backend, bits, tables_of, poolings,
                                                      index_dtype, dtype):
    b = KeyedBatch(mixed_specs(bits), tables_of, batch=7, poolings=poolings,
                   index_dtype=index_dtype)
    out = backend.run(ops.embedding_bags, *b.lookup_args(), dtype)
    assert out.device.type == backend.device and out.shape == (7, b.width)
    assert_close(out, reference.embedding_bags(*b.lookup_args()), dtype)
    for f, t in enumerate(tables_of):  # the same kernel per bag as the single-table lookup
        col, dim = b.columns[f], b.tables[t].dim
        assert same(out[:, col: col + dim], single_table_lookup(backend, b, f, output_dtype=dtype))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_every_width_and_format_with_weights(backend, bits, fmt):
    b = KeyedBatch(mixed_specs([bits, 9 - bits], dims=(16, 136), fmts=[fmt]), [1, 0, 1],
                   batch=5, max_len=6, weighted=True, index_dtype=torch.int32,
                   offset_dtype=torch.int64)
    assert_close(backend.run(ops.embedding_bags, *b.lookup_args()),
                 reference.embedding_bags(*b.lookup_args()))


@pytest.mark.parametrize("backend", backends("cpu", "reference", "cuda"))
def test_columns_in_any_order(backend):
    """feature_columns places each feature's block anywhere (the KeyedTensor's order)."""
    b = KeyedBatch(mixed_specs([8, 4, 2]), [0, 1, 2], batch=6)
    dims = [t.dim for t in b.tables]
    b.columns = [dims[2] + dims[1], dims[2], 0]  # blocks in the order 2, 1, 0
    out = backend.run(ops.embedding_bags, *b.lookup_args())
    for f in range(3):
        assert same(out[:, b.columns[f]: b.columns[f] + dims[f]],
                    single_table_lookup(backend, b, f))


@pytest.mark.parametrize("backend", backends("cpu", "reference", "cuda"))
def test_empty_batch_and_empty_bags(backend):
    b = KeyedBatch(mixed_specs([8, 3]), [0, 1], batch=0)
    assert backend.run(ops.embedding_bags, *b.lookup_args()).shape == (0, b.width)
    b = KeyedBatch(mixed_specs([8, 3]), [0, 1], batch=5, max_len=0, poolings=["sum", "mean"])
    assert b.values.numel() == 0
    assert same(backend.run(ops.embedding_bags, *b.lookup_args()), torch.zeros(5, b.width))


def on_threads(n, fn):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.usefixtures("cpu_capability")
def test_large_batch_many_threads_equals_one_thread():
    """The CPU deals chunks of bags to the threads: any thread count gives the same bits."""
    b = KeyedBatch(mixed_specs([8, 4, 2, 6]), [0, 1, 2, 3, 1], batch=3000, max_len=3,
                   poolings=["sum", "mean", "sum", "mean", "sum"])
    assert same(on_threads(1, lambda: ops.embedding_bags(*b.lookup_args())),
                on_threads(3, lambda: ops.embedding_bags(*b.lookup_args())))


@pytest.mark.parametrize("dims", [(128, 64, 64), (128, 64, 60)], ids=["streamed", "dim-60"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_large_output_equals_single_table_ops(backend, dims, weighted):
    """An fp32 output of 16 MiB and more is written with streaming stores where every block
    is a multiple of 8 columns (not with a block of 60); the values are those of the
    single-table lookup, feature by feature, and of the reference, with any thread count."""
    specs = [(5000, dims[0], 8, "affine"), (300, dims[1], 4, "symmetric"),
             (2000, dims[2], 3, "symmetric_table")]
    tables_of = [0, 1, 2, 0, 1, 0, 2, 0, 1, 0, 2]
    poolings = ["sum"] * 11 if weighted else ["sum", "mean", "sum", "mean", "mean", "sum"] * 2
    b = KeyedBatch(specs, tables_of, batch=4608, max_len=2, weighted=weighted,
                   poolings=poolings[:11])
    out = backend.run(ops.embedding_bags, *b.lookup_args())
    assert out.nbytes >= 16 << 20
    assert_close(out, reference.embedding_bags(*b.lookup_args()))
    for f, t in enumerate(b.tables_of):
        col, dim = b.columns[f], b.tables[t].dim
        assert same(out[:, col: col + dim], single_table_lookup(backend, b, f))
    assert same(out, on_threads(1, lambda: ops.embedding_bags(*b.lookup_args())))


# --- backward ------------------------------------------------------------------------------

def backward_args(b, grad):
    return (grad, [t.dim for t in b.tables], b.tables_of, b.columns, b.poolings, b.values,
            b.offsets, b.weights)


@pytest.mark.parametrize("bits,tables_of,poolings", CASES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_backward_matches_reference_and_single_table_op(backend, bits, tables_of, poolings,
                                                       weighted):
    """Bit for bit: repeats summed in the order of values on every device."""
    if weighted:
        poolings = ["sum"] * len(tables_of)
    b = KeyedBatch(mixed_specs(bits), tables_of, batch=9, poolings=poolings, weighted=weighted)
    grad = torch.randn(9, b.width)
    rows, grads = backend.run(ops.embedding_bags_backward, *backward_args(b, grad))
    ref_rows, ref_grads = reference.embedding_bags_backward(*backward_args(b, grad))
    for t in range(len(b.tables)):
        assert same(rows[t], ref_rows[t]) and same(grads[t], ref_grads[t])
        readers = [f for f, ft in enumerate(tables_of) if ft == t]
        if len(readers) == 1:  # a table of one feature: the single-table backward's bits
            f = readers[0]
            values, offsets, w = b.feature(f)
            col = b.columns[f]
            one_rows, one_grads = backend.run(
                ops.embedding_bag_backward, grad[:, col: col + b.tables[t].dim], values,
                offsets, w, poolings[f], True)
            assert same(rows[t], one_rows) and same(grads[t], one_grads)


@pytest.mark.parametrize("backend", backends("cpu", "reference"))
def test_backward_of_wide_ids(backend):
    """The backward needs no table, so its ids may be any int64: ids of up to 40 bits sort
    with their positions in one word, ids of 62 bits apart from them; both give the
    reference's bits. On the CPU a negative id is named."""
    b = KeyedBatch(mixed_specs([8, 4, 2]), [0, 1, 2, 0], batch=300, max_len=3)
    counts = [int(b.offsets[(f + 1) * b.batch] - b.offsets[f * b.batch]) for f in range(4)]
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    ids = [torch.randint(0, 50, (counts[0],), generator=gen),
           torch.randint(1 << 39, 1 << 40, (counts[1],), generator=gen),
           torch.randint(1 << 61, 1 << 62, (counts[2],), generator=gen),
           torch.randint(0, 50, (counts[3],), generator=gen)]
    for f, k in ((1, 1 << 39), (2, 1 << 61)):  # repeats, so that runs hold several positions
        ids[f][::3] = k + f
    b.values = torch.cat(ids)
    grad = torch.randn(b.batch, b.width)
    rows, grads = backend.run(ops.embedding_bags_backward, *backward_args(b, grad))
    ref_rows, ref_grads = reference.embedding_bags_backward(*backward_args(b, grad))
    for t in range(3):
        assert same(rows[t], ref_rows[t]) and same(grads[t], ref_grads[t])
    if backend.route is None:  # the CPU kernel
        b.values[counts[0] + counts[1] + 5] = -3
        with pytest.raises(IndexError, match="negative index -3"):
            ops.embedding_bags_backward(*backward_args(b, grad))


@pytest.mark.usefixtures("cpu_capability")
def test_backward_thread_count():
    b = KeyedBatch(mixed_specs([8, 2]), [0, 1, 0], batch=2000, max_len=3)
    args = backward_args(b, torch.randn(2000, b.width))
    one = on_threads(1, lambda: ops.embedding_bags_backward(*args))
    many = on_threads(3, lambda: ops.embedding_bags_backward(*args))
    for a, c in zip(one[0] + one[1], many[0] + many[1]):
        assert same(a, c)


@pytest.mark.parametrize("backend", backends("cpu", "reference", "cuda"))
def test_backward_empty_batch(backend):
    b = KeyedBatch(mixed_specs([8, 2], dims=(16, 8)), [0, 1], batch=0)
    rows, grads = backend.run(ops.embedding_bags_backward, *backward_args(b, torch.zeros(0, 24)))
    assert [r.numel() for r in rows] == [0, 0]
    assert [tuple(g.shape) for g in grads] == [(0, 16), (0, 8)]


@pytest.mark.parametrize("bits,tables_of,_", CASES)
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_weights_gradient(backend, bits, tables_of, _):
    b = KeyedBatch(mixed_specs(bits), tables_of, batch=6, weighted=True)
    weights = backend.to(b.weights).requires_grad_()
    args = backend.to(list(b.lookup_args()[:-1]))
    out = ops.embedding_bags(*args, weights)
    grad = torch.randn(out.shape)
    out.backward(backend.to(grad))
    ref = reference.embedding_bags_psw_backward(grad, *b.table_args(), tables_of, b.columns,
                                                b.values, b.offsets)
    assert_close(weights.grad, ref)


# --- fused update of all tables ---------------------------------------------------------

def clone_tables(tables):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in t.items()} for t in tables]


def update_all(backend, impl, tables, unique, grads, *args, **kwargs):
    """impl (an embedding_bags_update) on the backend, in place in `tables`."""
    moved = [{k: backend.to(v) for k, v in t.items()} for t in tables]
    skipped = backend.run(
        impl, [t["rows"] for t in moved], [t["step"] for t in moved], [t["state"] for t in moved],
        [t["step_state"] for t in moved], unique, grads, [t["bits"] for t in moved],
        [t["dim"] for t in moved], [t["fmt"] for t in moved], *args, **kwargs)
    for t, m in zip(tables, moved):
        t.update({k: v.cpu() if torch.is_tensor(v) else v for k, v in m.items()})
    return skipped.cpu()


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("learn_step,step_optimizer", [(False, "sgd"), (True, "sgd"),
                                                       (True, "adam")])
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_update_equals_single_table_update(backend, optimizer, learn_step, step_optimizer,
                                           stochastic):
    """Each table gets the bits lowp_update gives it, and the reference's, its rounding
    keyed by its own row and column offsets (a shard's place in a larger table)."""
    specs = [(40, 16, 8, "symmetric"), (30, 24, 3, "symmetric_table"), (50, 8, 1, "symmetric"),
             (20, 136, 5, "symmetric")]
    tables = trainable_tables([(*s, optimizer, step_optimizer if learn_step else None)
                               for s in specs])
    unique = [torch.randperm(t["rows"].shape[0])[: t["rows"].shape[0] // 2].sort().values
              for t in tables]
    grads = [torch.randn(u.numel(), t["dim"]) * 0.1 for u, t in zip(unique, tables)]
    grads[0][1, 3] = float("nan")  # a skipped row
    seeds, counters = [3, 2**40 + 1, 7, 0], [1, 5, 2, 9]
    keys = dict(row_offsets=[0, 2**33 + 7, 5, 100], column_offsets=[8, 0, 16, 24])
    opts = dict(optimizer=optimizer, lr=0.05, eps=1e-6, weight_decay=0.01, betas=(0.8, 0.95),
                learn_step=learn_step, step_optimizer=step_optimizer, step_lr=0.01,
                stochastic=stochastic)
    mine = clone_tables(tables)
    skipped = update_all(backend, ops.embedding_bags_update, mine, unique, grads, seeds=seeds,
                         counters=counters, **keys, **opts)
    assert skipped.tolist() == [1, 0, 0, 0]
    for i, (t, u, g, seed, counter, got) in enumerate(zip(tables, unique, grads, seeds,
                                                         counters, mine)):
        one = {k: backend.to(v) for k, v in t.items()}
        n = backend.run(ops.lowp_update, one["rows"],
                        one["step"] if t["fmt"] == "symmetric_table" else None, one["state"],
                        one["step_state"], u, g, t["bits"], t["dim"], t["fmt"],
                        iteration=counter, seed=seed, counter=counter,
                        row_offset=keys["row_offsets"][i],
                        column_offset=keys["column_offsets"][i], **opts)
        for key in ("rows", "step", "state", "step_state"):
            assert same(got[key], one[key]), key
        assert int(n) == int(skipped[i])
    # A second step from there, against the reference (its positional arguments).
    again = clone_tables(mine)
    later = [c + 1 for c in counters]
    update_all(backend, ops.embedding_bags_update, mine, unique, grads, seeds=seeds,
               counters=later, **keys, **opts)
    reference.embedding_bags_update(
        [t["rows"] for t in again], [t["step"] for t in again], [t["state"] for t in again],
        [t["step_state"] for t in again], unique, grads, [t["bits"] for t in again],
        [t["dim"] for t in again], [t["fmt"] for t in again], formats.optimizer_id(optimizer),
        0.05, 1e-6, 0.01, 0.8, 0.95, learn_step, step_optimizer, 0.01, stochastic, seeds, later,
        keys["row_offsets"], keys["column_offsets"])
    for got, ref in zip(mine, again):
        for key in ("rows", "step", "state", "step_state"):
            assert same(got[key], ref[key]), key


# --- backward and update in one op ---------------------------------------------------------

TRAIN_FORMATS = ("symmetric", "symmetric_table")
TRAIN_OPTIONS = [("adagrad", False, "sgd"), ("adam", True, "adam"), ("sgd", True, "sgd")]


def update_options(tables, optimizer, learn_step, step_optimizer):
    n = len(tables)
    return dict(optimizer=optimizer, lr=0.05, eps=1e-6, weight_decay=0.01, betas=(0.8, 0.95),
                learn_step=learn_step, step_optimizer=step_optimizer, step_lr=0.01,
                stochastic=True, seeds=[3 + 2**40 * t for t in range(n)],
                counters=[2 + t for t in range(n)], row_offsets=[5 * t for t in range(n)],
                column_offsets=[8 * t for t in range(n)])


def backward_update(backend, impl, b, grad, tables, options):
    """impl (an embedding_bags_backward_update) on the backend, in place in `tables`."""
    moved = [{k: backend.to(v) for k, v in t.items()} for t in tables]
    skipped = backend.run(
        impl, grad, b.tables_of, b.columns, b.poolings, b.values, b.offsets, b.weights,
        [t["rows"] for t in moved], [t["step"] for t in moved], [t["state"] for t in moved],
        [t["step_state"] for t in moved], [t["bits"] for t in moved],
        [t["dim"] for t in moved], [t["fmt"] for t in moved], **options)
    for t, m in zip(tables, moved):
        t.update({k: v.cpu() if torch.is_tensor(v) else v for k, v in m.items()})
    return skipped.cpu()


def assert_same_tables(got, want):
    for g, w in zip(got, want):
        for key in ("rows", "step", "state", "step_state"):
            assert same(g[key], w[key]), key


@pytest.mark.parametrize("bits,tables_of,poolings", CASES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("optimizer,learn_step,step_optimizer", TRAIN_OPTIONS)
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_backward_update_equals_backward_then_update(backend, bits, tables_of, poolings,
                                                    weighted, optimizer, learn_step,
                                                    step_optimizer):
    """Bit for bit: every table gets what embedding_bags_backward then embedding_bags_update
    give it, and what the reference gives it; a row with a non-finite gradient is skipped
    alike."""
    if weighted:
        poolings = ["sum"] * len(tables_of)
    b = KeyedBatch(mixed_specs(bits, fmts=TRAIN_FORMATS), tables_of, batch=9,
                   poolings=poolings, weighted=weighted)
    tables = [training_state(t, optimizer, step_optimizer) for t in b.tables]
    grad = torch.randn(9, b.width) * 0.1
    grad[:, 1] = float("nan")  # feature 0's column 1: every row it read is skipped
    options = update_options(tables, optimizer, learn_step, step_optimizer)
    fused, two, ref = clone_tables(tables), clone_tables(tables), clone_tables(tables)
    skipped = backward_update(backend, ops.embedding_bags_backward_update, b, grad, fused,
                              options)
    rows, grads = backend.run(ops.embedding_bags_backward, *backward_args(b, grad))
    skipped_two = update_all(backend, ops.embedding_bags_update, two, rows, grads, **options)
    assert same(skipped, skipped_two)
    assert int(skipped[tables_of[0]]) == b.feature(0)[0].unique().numel() > 0
    assert_same_tables(fused, two)
    skipped_ref = backward_update(backends("reference")[0].values[0],
                                  ops.embedding_bags_backward_update, b, grad, ref, options)
    assert same(skipped, skipped_ref)
    assert_same_tables(fused, ref)


@pytest.mark.usefixtures("cpu_capability")
@pytest.mark.parametrize("optimizer,learn_step,step_optimizer", TRAIN_OPTIONS)
def test_backward_update_thread_count(optimizer, learn_step, step_optimizer):
    """The rows are split over threads by their work: any thread count gives the same bits,
    tables of a few rows read by many positions included."""
    specs = [(3, 16, 8, "symmetric"), (2000, 24, 4, "symmetric_table"), (7, 8, 2, "symmetric")]
    b = KeyedBatch(specs, [0, 1, 2, 0], batch=2000, max_len=3)
    tables = [training_state(t, optimizer, step_optimizer) for t in b.tables]
    grad = torch.randn(2000, b.width)
    options = update_options(tables, optimizer, learn_step, step_optimizer)
    one, many = clone_tables(tables), clone_tables(tables)
    cpu = backends("cpu")[0].values[0]
    on_threads(1, lambda: backward_update(cpu, ops.embedding_bags_backward_update, b, grad, one,
                                          options))
    on_threads(3, lambda: backward_update(cpu, ops.embedding_bags_backward_update, b, grad,
                                          many, options))
    assert_same_tables(one, many)


@pytest.mark.parametrize("backend", backends("cpu", "reference", "cuda"))
def test_backward_update_empty_batch(backend):
    b = KeyedBatch(mixed_specs([8, 2], dims=(16, 8), fmts=TRAIN_FORMATS), [0, 1], batch=0)
    tables = [training_state(t, "adagrad", None) for t in b.tables]
    before = clone_tables(tables)
    options = update_options(tables, "adagrad", False, "sgd")
    skipped = backward_update(backend, ops.embedding_bags_backward_update, b,
                              torch.zeros(0, 24), tables, options)
    assert skipped.tolist() == [0, 0]
    assert_same_tables(tables, before)


# --- bad input -----------------------------------------------------------------------------

def lookup_raises(backend, b, exc, match):
    with pytest.raises(exc, match=match), backend.context():
        ops.embedding_bags(*b.lookup_args())


@pytest.mark.parametrize("backend", backends("cpu", "reference"))
def test_bad_lookup_names_the_feature(backend):
    b = KeyedBatch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.values[-1] = b.tables[1].rows.shape[0]  # feature 1's last id, one past its table
    lookup_raises(backend, b, IndexError, r"feature 1 \(table 1\) has id")
    b = KeyedBatch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.offsets[-1] += 1
    lookup_raises(backend, b, ValueError, "lengths and values disagree")
    b = KeyedBatch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.offsets[2] = b.offsets[1] - 1
    lookup_raises(backend, b, ValueError, "bag 1 of feature 0 has offsets")
    b = KeyedBatch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3, weighted=True)
    b.weights = b.weights[:-1]
    lookup_raises(backend, b, ValueError, "one weight per value")
    b = KeyedBatch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3, weighted=True,
                   poolings=["sum", "mean"])
    lookup_raises(backend, b, ValueError, "feature 1 pools by mean")
    b = KeyedBatch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.tables[1].rows = b.tables[1].rows.to("meta")
    lookup_raises(backend, b, ValueError, "table 1 is on meta")
    b = KeyedBatch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.columns = [0, 3]
    lookup_raises(backend, b, ValueError, "side by side")
    b = KeyedBatch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.offsets = b.offsets[:-1]
    lookup_raises(backend, b, ValueError, r"F \* B \+ 1")


@pytest.mark.parametrize("backend", backends("cpu", "reference"))
def test_bad_backward_and_update_arguments(backend):
    b = KeyedBatch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    with pytest.raises(ValueError, match=r"grad_out must be \[4, "), backend.context():
        ops.embedding_bags_backward(*backward_args(b, torch.zeros(5, b.width)))
    with pytest.raises(IndexError, match=r"feature \d \(table \d\) has id -1"), \
            backend.context():
        b.values[0] = -1
        ops.embedding_bags_psw_backward(torch.zeros(4, b.width), *b.table_args(), b.tables_of,
                                        b.columns, b.values, b.offsets)
    tables = trainable_tables([(10, 16, 4, "symmetric", "sgd", None)] * 2)
    args = ([t["rows"] for t in tables], [t["step"] for t in tables],
            [t["state"] for t in tables], [t["step_state"] for t in tables])
    meta = [t["bits"] for t in tables], [t["dim"] for t in tables], [t["fmt"] for t in tables]
    grads = [torch.zeros(2, 16)] * 2
    with pytest.raises(ValueError, match=r"table 1: unique_rows must be strictly increasing"), \
            backend.context():
        ops.embedding_bags_update(*args, [torch.tensor([1, 2]), torch.tensor([3, 3])], grads,
                                  *meta, optimizer="sgd")
    with pytest.raises(IndexError, match=r"table 0: row 10 is out of range"), backend.context():
        ops.embedding_bags_update(*args, [torch.tensor([1, 10]), torch.tensor([1, 2])], grads,
                                  *meta, optimizer="sgd")
    with pytest.raises(ValueError, match="one entry per table"), backend.context():
        ops.embedding_bags_update(*args, [torch.tensor([1, 2])], grads[:1], *meta,
                                  optimizer="sgd")
    with pytest.raises(ValueError, match="one entry per table"), backend.context():
        ops.embedding_bags_update(*args, [torch.tensor([1, 2])] * 2, grads, *meta,
                                  optimizer="sgd", row_offsets=[0])
    with pytest.raises(ValueError, match="column_offset must be a non-negative multiple of 8"), \
            backend.context():
        ops.embedding_bags_update(*args, [torch.tensor([1, 2])] * 2, grads, *meta,
                                  optimizer="sgd", column_offsets=[0, 12])


@pytest.mark.parametrize("backend", backends("cpu", "reference"))
def test_bad_backward_update_arguments(backend):
    """Checked before anything is read or written: the tables stay as they were."""
    b = KeyedBatch(mixed_specs([8, 4], fmts=TRAIN_FORMATS), [0, 1], batch=4, max_len=3)
    tables = [training_state(t, "adagrad", None) for t in b.tables]
    before = clone_tables(tables)
    options = update_options(tables, "adagrad", False, "sgd")
    grad = torch.zeros(4, b.width)

    def raises(exc, match, batch=b, grad=grad, tables=tables, **changed):
        with pytest.raises(exc, match=match):
            backward_update(backend, ops.embedding_bags_backward_update, batch, grad, tables,
                            dict(options, **changed))
        assert_same_tables(tables, before)

    raises(ValueError, r"grad_out must be \[4, ", grad=torch.zeros(5, b.width))
    raises(ValueError, "one entry per table", seeds=[1])
    raises(ValueError, "column_offset must be a non-negative multiple of 8",
           column_offsets=[0, 12])
    affine = clone_tables(tables)
    affine[1]["fmt"] = "affine"
    raises(ValueError, "table 1 must be", tables=affine)
    wrong = copy.copy(b)
    wrong.values = b.values.clone()
    wrong.values[-1] = b.tables[1].rows.shape[0]  # feature 1's last id, one past its table
    raises(IndexError, r"feature 1 \(table 1\) has id", batch=wrong)


# --- torch.compile -------------------------------------------------------------------------

@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiled_lookup(compiler):
    torch._dynamo.reset()
    b = KeyedBatch(mixed_specs([8, 3, 4], fmts=["affine", "symmetric_table", "symmetric"]),
                   [0, 1, 2, 0], batch=5, weighted=True)
    args = b.table_args()

    def lookup(values, offsets, weights):
        return ops.embedding_bags(*args, b.tables_of, b.columns, ["sum"] * 4, values, offsets,
                                  weights) * 2

    compiled = torch.compile(lookup, fullgraph=True, backend=compiler)
    for batch in (5, 9):  # the second re-traces with dynamic shapes
        b.sample(batch, weighted=True)
        torch.testing.assert_close(compiled(b.values, b.offsets, b.weights),
                                   lookup(b.values, b.offsets, b.weights))
