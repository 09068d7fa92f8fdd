"""torch.library.opcheck on every qembed operator (schema, fake tensor, autograd
registration, AOT dispatch with dynamic shapes) with a few representative argument sets, on
the CPU and on a CUDA device (the compiled kernels, or the Triton ones where registered)."""
import pytest
import torch
from conftest import (
    MPE_BITS,
    KeyedBatch,
    backends,
    make_table,
    mixed_specs,
    mixed_table,
    random_bags,
    random_table,
    search_inputs,
    trainable_tables,
    training_state,
)

from qembed import formats, ops

FMT = formats.FORMATS
# Ops whose output size depends on the data or that write their arguments: the checks that
# compare a traced or re-run output with the eager one do not apply.
EAGER_ONLY = ("test_schema", "test_faketensor")


def codes(n, dim, bits):
    return torch.randint(0, 1 << bits, (n, dim), dtype=torch.uint8)


def raw_bytes(n, width):
    return torch.randint(0, 256, (n, width), dtype=torch.uint8)


def dequantize_args(bits, fmt):
    t = random_table(7, 24, bits, fmt)
    return t.rows, bits, 24, FMT[fmt], t.step


def embedding_bag_args(bits, fmt, mode, with_psw, ilo, padding_idx, dtype, index_dtype):
    t = random_table(20, 16, bits, fmt)
    indices, offsets = random_bags(20, 6, index_dtype=index_dtype, include_last_offset=ilo,
                                   padding_idx=None if padding_idx < 0 else padding_idx)
    psw = torch.randn(indices.numel()) if with_psw else None
    return (t.rows, indices, offsets, psw, t.step, bits, 16, FMT[fmt], mode, ilo, padding_idx,
            dtype)


def backward_args(mode, with_psw):
    indices, offsets = random_bags(30, 6, padding_idx=2)
    grad_out = torch.randn(indices.numel() if mode == 2 else 6, 16)
    psw = torch.randn(indices.numel()) if with_psw else None
    return grad_out, indices, offsets, psw, mode, False, 2


def psw_backward_args(bits, fmt, mode):
    t = random_table(30, 16, bits, fmt)
    indices, offsets = random_bags(30, 6)
    grad_out = torch.randn(indices.numel() if mode == 2 else 6, 16)
    return grad_out, t.rows, indices, offsets, t.step, bits, 16, FMT[fmt], mode, False, -1


def lowp_update_args(fmt, optimizer, learn_step, step_optimizer, with_weights, key_offsets=()):
    rows, dim, bits = 30, 16, 4
    table, step = make_table(rows, dim, bits, fmt, torch.Generator().manual_seed(12))
    indices, offsets = random_bags(rows, 6)
    uniq, grad = ops.embedding_bag_backward(torch.randn(6, dim), indices, offsets)
    state = torch.zeros(rows, {"adagrad": 1, "adam": 2 * dim}.get(optimizer, 0))
    step_state = torch.zeros(rows if fmt == "symmetric" else 1, 2)
    weights = torch.randn(uniq.numel(), dim) * 0.05 if with_weights else None
    weights_out = torch.zeros(uniq.numel(), dim) if optimizer != "none" else None
    return (table, step, state, step_state, uniq, grad, weights, weights_out, bits, dim,
            FMT[fmt], formats.OPTIMIZERS[optimizer], 0.1, 1e-8, 0.0, 0.9, 0.999, 1, learn_step,
            formats.STEP_OPTIMIZERS[step_optimizer], 1e-3, True, 0, 1, *key_offsets)


def search_forward_args(mode, bits):
    weight, row_group, logits, alpha, beta = search_inputs(bits=bits)
    indices, offsets = random_bags(weight.shape[0], 5)
    return (weight, indices, offsets, row_group, torch.softmax(logits, 1), alpha, beta, bits,
            mode, False)


def search_backward_args():
    weight, row_group, logits, alpha, beta = search_inputs()
    unique = torch.unique(torch.randint(0, weight.shape[0], (20,)))
    return (weight, unique, torch.randn(unique.numel(), 16), row_group,
            torch.softmax(logits, 1), alpha, beta, MPE_BITS, 100)


def mixed_lookup_args(layout, mode, with_psw):
    segments, seg_bits, steps, beta, location, _ = mixed_table(30, 16, [0, 2, 5], layout)
    indices, offsets = random_bags(30, 5)
    psw = torch.randn(indices.numel()) if with_psw else None
    return (segments, seg_bits, steps, beta, location, indices, offsets, psw, mode, False,
            torch.float32)


def keyed_batch(weighted=True):
    """Three tables (one read by two features) and a batch over them."""
    return KeyedBatch(mixed_specs([8, 3, 4], fmts=["affine", "symmetric_table", "symmetric"]),
                      [0, 1, 2, 0], batch=5, weighted=weighted)


def bags_args(poolings, weighted, index_dtype, dtype):
    b = keyed_batch(weighted)
    tables, steps, bits, dims, fmts = b.table_args()
    return (tables, steps, bits, dims, [FMT[f] for f in fmts], b.tables_of, b.columns,
            poolings, b.values.to(index_dtype), b.offsets.to(index_dtype), b.weights, dtype)


def bags_backward_args(poolings, weighted):
    b = keyed_batch(weighted)
    return (torch.randn(b.batch, b.width), [t.dim for t in b.tables], b.tables_of, b.columns,
            poolings, b.values, b.offsets, b.weights)


def bags_psw_backward_args():
    b = keyed_batch()
    tables, steps, bits, dims, fmts = b.table_args()
    return (torch.randn(b.batch, b.width), tables, steps, bits, dims, [FMT[f] for f in fmts],
            b.tables_of, b.columns, b.values, b.offsets)


def bags_update_args(learn_step, stochastic, key_offsets=()):
    tables = trainable_tables([(20, 16, 4, "symmetric", "adagrad", "adam"),
                               (10, 8, 7, "symmetric_table", "adagrad", "adam")])
    unique = [torch.tensor([1, 4, 9]), torch.tensor([0, 2])]
    grads = [torch.randn(3, 16), torch.randn(2, 8)]
    return ([t["rows"] for t in tables], [t["step"] for t in tables],
            [t["state"] for t in tables], [t["step_state"] for t in tables], unique, grads,
            [4, 7], [16, 8], [FMT["symmetric"], FMT["symmetric_table"]],
            formats.OPTIMIZERS["adagrad"], 0.1, 1e-8, 0.0, 0.9, 0.999, learn_step,
            formats.STEP_OPTIMIZERS["adam"], 0.01, stochastic, [1, 2], [3, 4], *key_offsets)


def bags_backward_update_args(learn_step, weighted):
    b = KeyedBatch(mixed_specs([4, 7, 2], fmts=["symmetric", "symmetric_table"]), [0, 1, 2, 0],
                   batch=5, weighted=weighted)
    tables = [training_state(t, "adagrad", "adam") for t in b.tables]
    return (torch.randn(b.batch, b.width), b.tables_of, b.columns, [0, 1, 0, 0] if not weighted
            else [0, 0, 0, 0], b.values, b.offsets, b.weights, [t["rows"] for t in tables],
            [t["step"] for t in tables], [t["state"] for t in tables],
            [t["step_state"] for t in tables], [t["bits"] for t in tables],
            [t["dim"] for t in tables], [FMT[t["fmt"]] for t in tables],
            formats.OPTIMIZERS["adagrad"], 0.1, 1e-8, 0.0, 0.9, 0.999, learn_step,
            formats.STEP_OPTIMIZERS["adam"], 0.01, True, [1, 2, 3], [3, 4, 5])


# op name -> argument sets (built inside the test, so from its seeded generator) and the
# opcheck utils to run (None: all)
CASES = {
    "pack": [lambda: (codes(5, 16, 4), 4), lambda: (codes(3, 136, 3), 3),
             lambda: (codes(0, 8, 8), 8)],
    "unpack": [lambda: (raw_bytes(5, 12), 4, 16),  # rows wider than their codes
               lambda: (raw_bytes(4, 119), 7, 136), lambda: (raw_bytes(6, 1), 1, 8)],
    "quantize": [lambda: (torch.randn(6, 32), 8, FMT["affine"], None, False, 0, 0),
                 lambda: (torch.randn(6, 32), 4, FMT["symmetric"], torch.rand(6) + 0.1, True,
                          2**40 + 3, 9),
                 lambda: (torch.randn(6, 32), 3, FMT["symmetric_table"], torch.tensor([0.2]),
                          True, 1, 2)],
    "dequantize": [lambda: dequantize_args(8, "affine"), lambda: dequantize_args(5, "symmetric"),
                   lambda: dequantize_args(2, "symmetric_table")],
    "embedding_bag": [
        lambda: embedding_bag_args(4, "affine", 0, True, False, -1, torch.float32, torch.int64),
        lambda: embedding_bag_args(3, "symmetric", 1, False, True, 2, torch.float32, torch.int32),
        lambda: embedding_bag_args(6, "symmetric_table", 2, True, False, 5, torch.float16,
                                   torch.int64),
        lambda: embedding_bag_args(8, "affine", 0, False, True, -1, torch.bfloat16, torch.int32),
    ],
    "embedding_bag_backward": [lambda: backward_args(0, True), lambda: backward_args(1, False),
                               lambda: backward_args(2, True)],
    "embedding_bag_psw_backward": [lambda: psw_backward_args(4, "symmetric", 0),
                                   lambda: psw_backward_args(3, "affine", 2),
                                   lambda: psw_backward_args(7, "symmetric_table", 0)],
    "lowp_update": [lambda: lowp_update_args("symmetric", "adagrad", True, "sgd", False),
                    lambda: lowp_update_args("symmetric_table", "adam", True, "adam", False),
                    lambda: lowp_update_args("symmetric", "none", True, "adam", True),
                    lambda: lowp_update_args("symmetric", "sgd", False, "sgd", False),
                    lambda: lowp_update_args("symmetric", "adam", False, "sgd", False, (7, 16))],
    "mpe_search_forward": [lambda: search_forward_args(1, MPE_BITS),
                           lambda: search_forward_args(0, [0, 2, 8]),
                           lambda: search_forward_args(2, [3])],
    "mpe_search_backward": [search_backward_args],
    "mpe_embedding_bag": [lambda: mixed_lookup_args("map32", 0, False),
                          lambda: mixed_lookup_args("map16", 2, True),
                          lambda: mixed_lookup_args("ranges", 1, False)],
    "embedding_bags": [
        lambda: bags_args([0, 0, 0, 0], True, torch.int64, torch.float32),
        lambda: bags_args([1, 0, 1, 0], False, torch.int32, torch.bfloat16),
    ],
    "embedding_bags_backward": [lambda: bags_backward_args([0, 1, 0, 1], False),
                                lambda: bags_backward_args([0, 0, 0, 0], True)],
    "embedding_bags_psw_backward": [bags_psw_backward_args],
    "embedding_bags_update": [lambda: bags_update_args(True, True),
                              lambda: bags_update_args(False, False),
                              lambda: bags_update_args(True, True, ([5, 0], [0, 8]))],
    "embedding_bags_backward_update": [lambda: bags_backward_update_args(True, False),
                                       lambda: bags_backward_update_args(False, True)],
    "advise_huge_pages": [lambda: (torch.empty(3 << 20, dtype=torch.uint8),),
                          lambda: (torch.empty(5, 16),)],
}
UTILS = {"embedding_bag_backward": EAGER_ONLY, "lowp_update": EAGER_ONLY}


def opcheck_cases():
    """(backend, op, case) for every op and argument set on the CPU and on a CUDA device (the
    CUDA kernels, or the Triton ones registered where the extension has none), but
    advise_huge_pages, which advises host memory, on the CPU only."""
    return [pytest.param(param.values[0], name, i, marks=param.marks,
                         id=f"{param.id}-{name}-{i}")
            for param in backends("cpu", "cuda") for name in CASES
            if param.id == "cpu" or name != "advise_huge_pages"
            for i in range(len(CASES[name]))]


def test_every_registered_op_is_checked():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("qembed::")}
    assert registered == set(CASES)


@pytest.mark.parametrize("backend,name,case", opcheck_cases())
def test_opcheck(backend, name, case):
    assert ops.HAS_EXTENSION
    args = backend.to(list(CASES[name][case]()))
    kwargs = {"test_utils": UTILS[name]} if name in UTILS else {}
    torch.library.opcheck(getattr(torch.ops.qembed, name).default, args, **kwargs)
