"""A shard of a table (some of its rows and columns, a table of its own) updated with the
ops' row_offset and column_offset against the whole table updated: the shard's codes, steps
and state equal the whole table's over its rows and columns, bit for bit, wherever the
update reads nothing outside the shard (per-element optimizers and fixed steps when columns
are split)."""
import pytest
import torch
from test_train_ops import STATE_WIDTH, make_table, run_update, same

from qembed import ops, reference
from qembed.formats import code_bytes, param_offset, row_bytes

ROWS, DIM, BITS = 40, 32, 5
SPLITS = {"rows": (slice(12, 31), slice(0, DIM)), "columns": (slice(0, ROWS), slice(8, 24)),
          "both": (slice(20, ROWS), slice(24, DIM))}


def shard_rows(table, bits, fmt, rows, cols):
    """The packed rows of the shard: its columns' codes, the rows' inline step."""
    codes = reference.unpack(table[:, :code_bytes(DIM, bits)], bits, DIM)[rows, cols]
    width = cols.stop - cols.start
    out = torch.zeros(codes.shape[0], row_bytes(width, bits, fmt), dtype=torch.uint8)
    out[:, :code_bytes(width, bits)] = reference.pack(codes, bits)
    out[:, param_offset(width, bits):] = table[rows, param_offset(DIM, bits):]
    return out


def shard_state(state, optimizer, rows, cols):
    if optimizer == "adam":  # [m | v]
        return torch.cat([state[rows, cols], state[rows, DIM + cols.start: DIM + cols.stop]], 1)
    return state[rows]


def single_table_bags_update(impl):
    """embedding_bags_update (ops or reference) over one table, as lowp_update is called."""
    def update(table, step, state, step_state, uniq, grad, bits, dim, fmt, optimizer, lr,
               iteration, learn_step, stochastic, seed, counter, row_offset=0, column_offset=0):
        steps = [step if step is not None else torch.zeros(0)]
        args = ([table], steps, [state], [step_state], [uniq], [grad], [bits], [dim], [fmt])
        if impl is reference:
            from qembed.formats import optimizer_id
            return impl.embedding_bags_update(
                *args, optimizer_id(optimizer), lr, 1e-8, 0.0, 0.9, 0.999, learn_step, "sgd",
                0.1, stochastic, [seed], [counter], [row_offset], [column_offset])[0]
        return impl.embedding_bags_update(
            *args, optimizer=optimizer, lr=lr, learn_step=learn_step, step_lr=0.1,
            stochastic=stochastic, seeds=[seed], counters=[counter], row_offsets=[row_offset],
            column_offsets=[column_offset])[0]
    return update


IMPLS = {"lowp_update": ops.lowp_update, "reference": reference.lowp_update,
         "embedding_bags_update": single_table_bags_update(ops),
         "reference_bags": single_table_bags_update(reference)}
# (optimizer, fmt, learn_step) whose update of a row reads only that row's own columns
PER_ELEMENT = [("sgd", "symmetric", False), ("adam", "symmetric_table", False),
               ("adam", "symmetric", False)]
PER_ROW = [("adagrad", "symmetric", True), ("adam", "symmetric", True),
           ("adagrad", "symmetric_table", False)]


def cases():
    for split in SPLITS:
        for optimizer, fmt, learn in PER_ELEMENT + (PER_ROW if split == "rows" else []):
            yield split, optimizer, fmt, learn


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("split,optimizer,fmt,learn_step", list(cases()))
def test_shard_update_equals_the_whole_table(impl, split, optimizer, fmt, learn_step):
    gen = torch.Generator().manual_seed(hash((split, optimizer, fmt, learn_step)) % 2**31)
    table, step = make_table(ROWS, DIM, BITS, fmt, gen)
    state = torch.rand(ROWS, STATE_WIDTH[optimizer](DIM), generator=gen)
    step_state = torch.zeros(ROWS, 0)
    uniq = torch.randperm(ROWS, generator=gen)[:25].sort().values
    grad = torch.randn(uniq.numel(), DIM, generator=gen) * 0.05
    kw = dict(bits=BITS, dim=DIM, fmt=fmt, optimizer=optimizer, lr=0.1, iteration=3,
              learn_step=learn_step, stochastic=True, seed=2**35 + 9, counter=3)
    update = IMPLS[impl]
    whole = run_update(update, table, step, state, step_state, uniq, grad, **kw)

    rows, cols = SPLITS[split]
    mine = (uniq >= rows.start) & (uniq < rows.stop)
    local = (shard_rows(table, BITS, fmt, rows, cols), step,
             shard_state(state, optimizer, rows, cols), step_state[rows],
             uniq[mine] - rows.start, grad[mine][:, cols].contiguous())
    kw.update(dim=cols.stop - cols.start)
    got = run_update(update, *local, row_offset=rows.start, column_offset=cols.start, **kw)
    assert same(got[0], shard_rows(whole[0], BITS, fmt, rows, cols))
    assert same(got[2], shard_state(whole[2], optimizer, rows, cols))
    assert same(got[1], whole[1])
    # the offsets matter: keyed from 0, the shard rounds differently
    unkeyed = run_update(update, *local, **kw)
    assert not same(unkeyed[0], got[0])


@pytest.mark.parametrize("impl", [ops.lowp_update, reference.lowp_update])
def test_bad_offsets_are_named(impl):
    table, _ = make_table(4, 16, 4, "symmetric", torch.Generator().manual_seed(0))
    args = (table, None, torch.zeros(4, 0), torch.zeros(4, 0), torch.tensor([1]),
            torch.zeros(1, 16), 4, 16)
    with pytest.raises(ValueError, match="column_offset must be a non-negative multiple of 8"):
        impl(*args, optimizer="sgd", column_offset=4)
    with pytest.raises(ValueError, match="row_offset must not be negative"):
        impl(*args, optimizer="sgd", row_offset=-1)
    with pytest.raises(ValueError, match="column_offset"):
        ops.embedding_bags_update([table], [torch.zeros(0)], [torch.zeros(4, 0)],
                                  [torch.zeros(4, 0)], [torch.tensor([1])], [torch.zeros(1, 16)],
                                  [4], [16], ["symmetric"], optimizer="sgd", column_offsets=[12])
