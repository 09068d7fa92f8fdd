"""embedding_bags (every feature of a batch in one lookup), its backward, its per-sample
weight gradient and the fused update of all tables: against the reference, against the
single-table ops feature by feature, and on bad input. No TorchRec needed."""
from __future__ import annotations

import pytest
import torch
from conftest import BITS, FORMATS, random_table

from qembed import formats, ops, reference


class Batch:
    """Random tables and a key-major batch over them: feature f reads table tables_of[f]."""

    def __init__(self, specs, tables_of, batch, max_len=4, poolings=None, weighted=False,
                 index_dtype=torch.int64, offset_dtype=None, columns=None):
        self.tables = [random_table(rows, dim, bits, fmt) for rows, dim, bits, fmt in specs]
        self.tables_of = list(tables_of)
        self.poolings = poolings or ["sum"] * len(tables_of)
        self.sample(batch, max_len, weighted, index_dtype, offset_dtype)
        dims = [self.tables[t].dim for t in tables_of]
        if columns is None:  # side by side in feature order
            columns = [sum(dims[:f]) for f in range(len(dims))]
        self.columns = columns

    def sample(self, batch, max_len=4, weighted=False, index_dtype=torch.int64,
               offset_dtype=None):
        """A new batch of `batch` bags per feature, 0..max_len ids each."""
        self.batch = batch
        lengths = torch.randint(0, max_len + 1, (len(self.tables_of), batch))
        values = [torch.randint(0, self.tables[t].rows.shape[0], (int(lengths[f].sum()),))
                  for f, t in enumerate(self.tables_of)]
        self.values = torch.cat(values).to(index_dtype)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                                  lengths.reshape(-1).cumsum(0)]).to(offset_dtype or index_dtype)
        self.weights = torch.randn(self.values.numel()) if weighted else None
        return self

    def table_args(self):
        return ([t.rows for t in self.tables],
                [t.step if t.step is not None else torch.empty(0) for t in self.tables],
                [t.bits for t in self.tables], [t.dim for t in self.tables],
                [t.fmt for t in self.tables])

    def lookup(self, impl=ops, **kwargs):
        return impl.embedding_bags(*self.table_args(), self.tables_of, self.columns,
                                   self.poolings, self.values, self.offsets, self.weights,
                                   **kwargs)

    def feature(self, f):
        """(values, offsets with the end, weights) of feature f alone."""
        off = self.offsets.long()[f * self.batch: (f + 1) * self.batch + 1]
        start, end = int(off[0]), int(off[-1])
        w = None if self.weights is None else self.weights[start:end]
        return self.values[start:end], (off - start).to(self.offsets.dtype), w


def mixed_specs(bits_list, dims=(8, 16, 64, 24), fmts=FORMATS):
    return [(int(torch.randint(1, 300, ())), dims[i % len(dims)], b, fmts[i % len(fmts)])
            for i, b in enumerate(bits_list)]


CASES = [
    # (table bits, tables read by each feature, poolings)
    ([8, 4, 2], [0, 1, 2], ["sum", "mean", "sum"]),
    ([1, 3, 5, 7], [3, 0, 2, 1], ["mean", "sum", "sum", "mean"]),
    ([6, 8], [0, 1, 0, 0], ["sum", "mean", "mean", "sum"]),  # a table shared by three features
    ([4], [0], ["sum"]),
]


@pytest.mark.parametrize("bits,tables_of,poolings", CASES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lookup_matches_reference_and_single_table_op(bits, tables_of, poolings, index_dtype,
                                                      dtype):
    b = Batch(mixed_specs(bits), tables_of, batch=7, poolings=poolings, index_dtype=index_dtype)
    out = b.lookup(output_dtype=dtype)
    assert out.dtype == dtype and out.shape == (7, sum(b.tables[t].dim for t in tables_of))
    ref = b.lookup(reference, output_dtype=torch.float32)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-5)
    for f, t in enumerate(tables_of):  # the same kernel per bag as the single-table lookup
        values, offsets, _ = b.feature(f)
        one = b.tables[t].lookup(values, offsets, mode=poolings[f], include_last_offset=True,
                                 output_dtype=dtype)
        col = b.columns[f]
        assert torch.equal(out[:, col: col + b.tables[t].dim], one)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_width_and_format_with_weights(bits, fmt):
    b = Batch(mixed_specs([bits, 9 - bits], dims=(16, 136), fmts=[fmt]), [1, 0, 1], batch=5,
              max_len=6, weighted=True, index_dtype=torch.int32, offset_dtype=torch.int64)
    torch.testing.assert_close(b.lookup(), b.lookup(reference), rtol=1e-5, atol=1e-5)


def test_columns_in_any_order():
    """feature_columns places each feature's block anywhere (the KeyedTensor's order)."""
    plain = Batch(mixed_specs([8, 4, 2]), [0, 1, 2], batch=6)
    dims = [t.dim for t in plain.tables]
    plain.columns = [dims[2] + dims[1], dims[2], 0]  # blocks in the order 2, 1, 0
    out = plain.lookup()
    for f in range(3):
        values, offsets, _ = plain.feature(f)
        one = plain.tables[f].lookup(values, offsets, mode="sum", include_last_offset=True)
        assert torch.equal(out[:, plain.columns[f]: plain.columns[f] + dims[f]], one)


def test_empty_batch_and_empty_bags():
    b = Batch(mixed_specs([8, 3]), [0, 1], batch=0)
    assert b.lookup().shape == (0, b.tables[0].dim + b.tables[1].dim)
    b = Batch(mixed_specs([8, 3]), [0, 1], batch=5, max_len=0, poolings=["sum", "mean"])
    assert b.values.numel() == 0 and torch.equal(b.lookup(), torch.zeros(5, b.lookup().shape[1]))


def test_large_batch_many_threads_equals_one_thread():
    """Chunks dealt to the threads: any thread count gives the same bits."""
    b = Batch(mixed_specs([8, 4, 2, 6]), [0, 1, 2, 3, 1], batch=3000, max_len=3,
              poolings=["sum", "mean", "sum", "mean", "sum"])
    one = b.lookup()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        many = b.lookup()
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, many)


# --- backward ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,tables_of,poolings", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_backward_matches_reference_and_single_table_op(bits, tables_of, poolings, weighted):
    if weighted:
        poolings = ["sum"] * len(tables_of)
    b = Batch(mixed_specs(bits), tables_of, batch=9, poolings=poolings, weighted=weighted)
    grad = torch.randn(9, sum(b.tables[t].dim for t in tables_of))
    args = ([t.dim for t in b.tables], tables_of, b.columns, poolings, b.values, b.offsets,
            b.weights)
    rows, grads = ops.embedding_bags_backward(grad, *args)
    ref_rows, ref_grads = reference.embedding_bags_backward(grad, *args)
    for t in range(len(b.tables)):
        assert torch.equal(rows[t], ref_rows[t]) and torch.equal(grads[t], ref_grads[t])
        readers = [f for f, ft in enumerate(tables_of) if ft == t]
        if len(readers) == 1:  # a table of one feature: the single-table backward's bits
            f = readers[0]
            values, offsets, w = b.feature(f)
            col = b.columns[f]
            one_rows, one_grads = ops.embedding_bag_backward(
                grad[:, col: col + b.tables[t].dim], values, offsets, w, poolings[f], True)
            assert torch.equal(rows[t], one_rows) and torch.equal(grads[t], one_grads)


def test_backward_thread_count_and_empty_batch():
    b = Batch(mixed_specs([8, 2]), [0, 1, 0], batch=2000, max_len=3)
    grad = torch.randn(2000, 2 * b.tables[0].dim + b.tables[1].dim)
    args = ([t.dim for t in b.tables], b.tables_of, b.columns, b.poolings, b.values, b.offsets)
    one = ops.embedding_bags_backward(grad, *args)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        many = ops.embedding_bags_backward(grad, *args)
    finally:
        torch.set_num_threads(previous)
    for a, c in zip(one[0] + one[1], many[0] + many[1]):
        assert torch.equal(a, c)
    empty = Batch(mixed_specs([8, 2]), [0, 1], batch=0)
    rows, grads = ops.embedding_bags_backward(torch.zeros(0, 16 + 8), [16, 8], [0, 1], [0, 16],
                                              ["sum", "sum"], empty.values, empty.offsets)
    assert [r.numel() for r in rows] == [0, 0] and [tuple(g.shape) for g in grads] == [(0, 16), (0, 8)]


@pytest.mark.parametrize("bits,tables_of,_", CASES)
def test_weights_gradient(bits, tables_of, _):
    b = Batch(mixed_specs(bits), tables_of, batch=6, weighted=True)
    weights = b.weights.clone().requires_grad_()
    b.weights = weights
    out = b.lookup()
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = reference.embedding_bags_psw_backward(grad, *b.table_args(), tables_of, b.columns,
                                                b.values, b.offsets)
    torch.testing.assert_close(weights.grad, ref, rtol=1e-5, atol=1e-5)


# --- fused update of all tables ---------------------------------------------------------

def symmetric_tables(specs):
    """Trainable tables: symmetric codes with random steps, and optimizer state."""
    out = []
    for rows, dim, bits, fmt, optimizer, learn in specs:
        t = random_table(rows, dim, bits, fmt)
        width = {"sgd": 0, "adagrad": 1, "adam": 2 * dim}[optimizer]
        step_state = torch.rand(rows if fmt == "symmetric" else 1, 2 if learn == "adam" else 0)
        out.append(dict(rows=t.rows, step=t.step if t.step is not None else torch.empty(0),
                        state=torch.rand(rows, width), step_state=step_state, bits=bits,
                        dim=dim, fmt=fmt))
    return out


def clone_tables(tables):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in t.items()} for t in tables]


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("learn_step,step_optimizer", [(False, "sgd"), (True, "sgd"),
                                                       (True, "adam")])
@pytest.mark.parametrize("stochastic", [True, False])
def test_update_equals_single_table_update(optimizer, learn_step, step_optimizer, stochastic):
    specs = [(40, 16, 8, "symmetric"), (30, 24, 3, "symmetric_table"), (50, 8, 1, "symmetric"),
             (20, 136, 5, "symmetric")]
    tables = symmetric_tables([(*s, optimizer, step_optimizer if learn_step else None)
                               for s in specs])
    unique = [torch.randperm(t["rows"].shape[0])[: t["rows"].shape[0] // 2].sort().values
              for t in tables]
    grads = [torch.randn(u.numel(), t["dim"]) * 0.1 for u, t in zip(unique, tables)]
    grads[0][1, 3] = float("nan")  # a skipped row
    seeds, counters = [3, 2**40 + 1, 7, 0], [1, 5, 2, 9]
    mine = clone_tables(tables)
    opts = dict(optimizer=optimizer, lr=0.05, eps=1e-6, weight_decay=0.01, betas=(0.8, 0.95),
                learn_step=learn_step, step_optimizer=step_optimizer, step_lr=0.01,
                stochastic=stochastic)
    skipped = ops.embedding_bags_update(
        [t["rows"] for t in mine], [t["step"] for t in mine], [t["state"] for t in mine],
        [t["step_state"] for t in mine], unique, grads, [t["bits"] for t in mine],
        [t["dim"] for t in mine], [t["fmt"] for t in mine], seeds=seeds, counters=counters,
        **opts)
    assert skipped.tolist() == [1, 0, 0, 0]
    for i, (t, u, g, seed, counter, got) in enumerate(zip(tables, unique, grads, seeds,
                                                         counters, mine)):
        n = ops.lowp_update(t["rows"], t["step"] if t["fmt"] == "symmetric_table" else None,
                            t["state"], t["step_state"], u, g, t["bits"], t["dim"], t["fmt"],
                            iteration=counter, seed=seed, counter=counter, **opts)
        for key in ("rows", "step", "state", "step_state"):
            assert torch.equal(got[key], t[key]), key
        assert int(n) == int(skipped[i])
    again = clone_tables(tables)
    reference.embedding_bags_update(
        [t["rows"] for t in again], [t["step"] for t in again], [t["state"] for t in again],
        [t["step_state"] for t in again], unique, grads, [t["bits"] for t in again],
        [t["dim"] for t in again], [t["fmt"] for t in again], formats.optimizer_id(optimizer),
        0.05, 1e-6, 0.01, 0.8, 0.95, learn_step, step_optimizer, 0.01, stochastic, seeds,
        [c + 1 for c in counters])
    ops.embedding_bags_update(
        [t["rows"] for t in mine], [t["step"] for t in mine], [t["state"] for t in mine],
        [t["step_state"] for t in mine], unique, grads, [t["bits"] for t in mine],
        [t["dim"] for t in mine], [t["fmt"] for t in mine], seeds=seeds,
        counters=[c + 1 for c in counters], **opts)
    for got, ref in zip(mine, again):
        for key in ("rows", "step", "state", "step_state"):
            assert torch.equal(got[key], ref[key]), key


# --- bad input -----------------------------------------------------------------------------

def test_bad_input_names_the_feature():
    b = Batch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.values[-1] = b.tables[1].rows.shape[0]  # feature 1's last id, one past its table
    with pytest.raises(IndexError, match=r"feature 1 \(table 1\) has id"):
        b.lookup()
    b = Batch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.offsets[-1] += 1
    with pytest.raises(ValueError, match="values"):
        b.lookup()
    b = Batch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3, weighted=True)
    b.weights = b.weights[:-1]
    with pytest.raises(ValueError, match="one weight per value"):
        b.lookup()
    b = Batch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3, weighted=True,
              poolings=["sum", "mean"])
    with pytest.raises(ValueError, match="feature 1 pools by mean"):
        b.lookup()
    b = Batch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.tables[1].rows = b.tables[1].rows.to("meta")
    with pytest.raises(ValueError, match="table 1 is on meta"):
        b.lookup()
    b = Batch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.columns = [0, 3]
    with pytest.raises(ValueError, match="side by side"):
        b.lookup()
    b = Batch(mixed_specs([8, 4]), [0, 1], batch=4, max_len=3)
    b.offsets = b.offsets[:-1]
    with pytest.raises(ValueError, match="F \\* B \\+ 1"):
        b.lookup()


# --- torch.library -------------------------------------------------------------------------

def opcheck_batch():
    return Batch(mixed_specs([8, 3, 4], fmts=["affine", "symmetric_table", "symmetric"]),
                 [0, 1, 2, 0], batch=5, weighted=True)


def test_opcheck_lookup_and_backward():
    b = opcheck_batch()
    fmt_ids = [formats.format_id(t.fmt) for t in b.tables]
    tables, steps, bits, dims, _ = b.table_args()
    weights = b.weights.clone().requires_grad_()
    torch.library.opcheck(torch.ops.qembed.embedding_bags.default,
                          (tables, steps, bits, dims, fmt_ids, b.tables_of, b.columns,
                           [0, 0, 0, 0], b.values, b.offsets, weights, torch.float32))
    torch.library.opcheck(torch.ops.qembed.embedding_bags.default,
                          (tables, steps, bits, dims, fmt_ids, b.tables_of, b.columns,
                           [1, 0, 1, 0], b.values.int(), b.offsets.int(), None, torch.bfloat16))
    grad = torch.randn(5, sum(dims[t] for t in b.tables_of))
    torch.library.opcheck(torch.ops.qembed.embedding_bags_backward.default,
                          (grad, dims, b.tables_of, b.columns, [0, 1, 0, 1], b.values,
                           b.offsets, None))
    torch.library.opcheck(torch.ops.qembed.embedding_bags_psw_backward.default,
                          (grad, tables, steps, bits, dims, fmt_ids, b.tables_of, b.columns,
                           b.values, b.offsets))


def test_opcheck_update():
    tables = symmetric_tables([(20, 16, 4, "symmetric", "adagrad", "adam"),
                               (10, 8, 7, "symmetric_table", "adagrad", "adam")])
    unique = [torch.tensor([1, 4, 9]), torch.tensor([0, 2])]
    grads = [torch.randn(3, 16), torch.randn(2, 8)]
    torch.library.opcheck(torch.ops.qembed.embedding_bags_update.default,
                          ([t["rows"] for t in tables], [t["step"] for t in tables],
                           [t["state"] for t in tables], [t["step_state"] for t in tables],
                           unique, grads, [4, 7], [16, 8], [0, 1], 1, 0.1, 1e-8, 0.0, 0.9, 0.999,
                           True, 1, 0.01, True, [1, 2], [3, 4]))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_lookup(backend):
    torch._dynamo.reset()
    b = opcheck_batch()
    args = b.table_args()

    def lookup(values, offsets, weights):
        return ops.embedding_bags(*args, b.tables_of, b.columns, ["sum"] * 4, values, offsets,
                                  weights) * 2

    compiled = torch.compile(lookup, fullgraph=True, backend=backend)
    for batch in (5, 9):  # the second re-traces with dynamic shapes
        b.sample(batch, weighted=True)
        torch.testing.assert_close(compiled(b.values, b.offsets, b.weights),
                                   lookup(b.values, b.offsets, b.weights))
