"""Mixed-precision embeddings end to end: the search modules' forward and gradients against
SPEC.md's formulas in float64, the search -> sample -> retrain -> export flow on a planted
case, and retraining at mixed widths against one LowPrecisionEmbedding per width given the
same rows and gradients (Adam's iteration count, each width's stochastic rounding stream,
learned steps)."""
import pytest
import torch
import torch.nn.functional as F

from qembed import formats, mpe
from qembed.nn import (
    LowPrecisionEmbedding,
    MixedPrecisionEmbedding,
    MixedPrecisionSearchEmbedding,
    MixedPrecisionSearchEmbeddingBag,
    retrain_model,
)


def quantized(w, alpha, beta, bits):
    """LSQ+: alpha * clamp(round((w - beta) / alpha), Qn, Qp) + beta; zeros at 0 bits."""
    if bits == 0:
        return torch.zeros_like(w)
    x = torch.round((w - beta) / alpha).clamp(formats.qmin(bits), formats.qmax(bits))
    return alpha * x + beta


@pytest.mark.parametrize("mode", ["sum", "mean", "none"])
def test_search_forward_and_gradients(mode):
    rows, dim, bits, tau = 90, 12, [0, 1, 2, 4, 6], 0.5
    counts = torch.randint(0, 50, (rows,))
    if mode == "none":
        table = MixedPrecisionSearchEmbedding(rows, dim, groups=counts, num_groups=6,
                                              candidate_bits=bits, tau=tau, init_std=0.1)
    else:
        table = MixedPrecisionSearchEmbeddingBag(rows, dim, mode=mode, groups=counts,
                                                 num_groups=6, candidate_bits=bits, tau=tau,
                                                 init_std=0.1)
    with torch.no_grad():
        table.logits.normal_()
        table.beta.normal_(0, 0.02)
        table.alpha.mul_(torch.rand(len(bits)) + 0.5)
    w, alpha, beta = (t.detach().double() for t in (table.weight, table.alpha, table.beta))
    p = torch.softmax(table.logits.detach().double() / tau, 1)[table.row_group]  # [R, m]
    levels = torch.stack([quantized(w, alpha[k], beta, b) for k, b in enumerate(bits)], 1)
    expected_rows = (p[:, :, None] * levels).sum(1)  # [R, D]

    ids = torch.randint(0, rows, (30,))
    offsets = torch.tensor([0, 4, 4, 11, 20, 29])
    grad_out = torch.randn(30 if mode == "none" else 6, dim)
    dense = torch.zeros(rows, dim, dtype=torch.float64, requires_grad=True)
    if mode == "none":
        out = table(ids)
        want = F.embedding(ids, expected_rows)
        F.embedding(ids, dense).backward(grad_out.double())
    else:
        out = table(ids, offsets)
        want = F.embedding_bag(ids, expected_rows, offsets, mode=mode)
        F.embedding_bag(ids, dense, offsets, mode=mode).backward(grad_out.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)

    out.backward(grad_out)
    g = dense.grad  # dL/d(row value) of every row
    x = (w[:, None, :] - beta) / alpha[None, :, None]
    inside = torch.stack([(x[:, k] >= formats.qmin(b)) & (x[:, k] <= formats.qmax(b)) if b
                          else torch.zeros_like(w, dtype=torch.bool)
                          for k, b in enumerate(bits)], 1)
    grad_w = g * (p[:, :, None] * inside).sum(1)  # straight through inside each range
    torch.testing.assert_close(table.weight.grad.double(), grad_w, rtol=1e-5, atol=1e-7)
    grad_p = torch.zeros(table.logits.shape, dtype=torch.float64).index_add_(
        0, table.row_group, (g[:, None, :] * levels).sum(2))
    probs = torch.softmax(table.logits.detach().double() / tau, 1)
    grad_logits = probs * (grad_p - (probs * grad_p).sum(1, keepdim=True)) / tau
    torch.testing.assert_close(table.logits.grad.double(), grad_logits, rtol=1e-4, atol=1e-7)


def mirrors(table, **options):
    """One LowPrecisionEmbedding per stored width holding that width's rows (slot k: the
    k-th id of the width) with the table's codes, step and state, seeded with the width's
    stream; and each id's slot."""
    slot = torch.full((table.num_embeddings,), -1, dtype=torch.long)
    out = {}
    for s, b in enumerate(table.widths):
        ids = torch.nonzero(table.row_bits == b).flatten()
        slot[ids] = torch.arange(ids.numel())
        m = LowPrecisionEmbedding(ids.numel(), table.embedding_dim, bits=b, step_per="table",
                                  seed=int(table.seed) + 1_000_003 * b, **options)
        with torch.no_grad():
            m.qweight.copy_(getattr(table, f"codes{b}"))
            m.step.copy_(table.steps[s: s + 1])
            m.state.copy_(getattr(table, f"state{b}"))
            m.step_state.copy_(getattr(table, f"step_state{b}"))
        out[b] = m
    return out, slot


def train_side_by_side(table, twins, slot, batches):
    """The same linear loss on the mixed table and, row for row, on the per-width twins:
    every row gets the same gradient, summed in the same order. Every twin steps every
    time (an empty batch too), as every segment of the table counts each step."""
    table.train()
    row_bits = table.row_bits
    for ids, grad in batches:
        (table(ids) * grad).sum().backward()
        for b, twin in twins.items():
            sel = row_bits[ids] == b
            (twin(slot[ids[sel]]) * grad[sel]).sum().backward()


def assert_same_as_twins(table, twins):
    for s, b in enumerate(table.widths):
        twin = twins[b]
        assert torch.equal(getattr(table, f"codes{b}"), twin.qweight), b
        assert torch.equal(table.steps[s: s + 1], twin.step), b
        assert torch.equal(getattr(table, f"state{b}"), twin.state), b
        assert torch.equal(getattr(table, f"step_state{b}"), twin.step_state), b


RETRAIN_OPTIONS = {
    "adam-sr-learned-step-adam": dict(optimizer="adam", lr=0.02, betas=(0.8, 0.9),
                                      learn_step=True, step_optimizer="adam", step_lr=1e-3),
    "sgd-nearest-learned-step": dict(optimizer="sgd", lr=0.3, weight_decay=0.01,
                                     rounding="nearest", learn_step=True, step_lr=0.5),
    "adagrad-sr": dict(optimizer="adagrad", lr=0.05),
}


@pytest.mark.parametrize("name", sorted(RETRAIN_OPTIONS))
def test_mixed_width_retraining_equals_per_width_tables(name):
    options = RETRAIN_OPTIONS[name]
    rows, dim = 60, 12
    row_bits = torch.tensor([0, 1, 2, 4, 4, 8] * 9 + [7, 0, 3, 3, 5, 6])
    table = MixedPrecisionEmbedding(rows, dim, row_bits, seed=123, **options)
    steps = torch.tensor([0.4, 0.2, 0.1, 0.05, 0.03, 0.02, 0.015, 0.01])
    table.load_float_weight(torch.randn(rows, dim) * 0.3, steps, torch.randn(dim) * 0.05)
    twin_options = {k: v for k, v in options.items() if k != "learn_step"}
    twins, slot = mirrors(table, learn_step=options.get("learn_step", False),
                          **{"step_lr": 0.0, **twin_options})
    every_width = torch.arange(rows)
    no_seven = every_width[row_bits != 7]
    batches = [(ids, torch.randn(ids.numel(), dim))
               for ids in (every_width, no_seven[torch.randperm(no_seven.numel())[:20]],
                           torch.cat([every_width, every_width[:25]]), no_seven)]
    train_side_by_side(table, twins, slot, batches)
    assert int(table.num_updates) == 4 and all(int(t.num_updates) == 4 for t in twins.values())
    assert_same_as_twins(table, twins)


def test_search_sample_retrain_export_flow():
    """A planted case: rows 0-31 are looked up and must keep their values, rows 32-63 are
    never seen; the search gives the first two groups 6 bits and prunes the others; the
    retrained table is the per-width tables' and its export reads the same values."""
    rows, dim = 64, 8
    counts = torch.cat([torch.full((32,), 10), torch.zeros(32, dtype=torch.long)])
    search = MixedPrecisionSearchEmbedding(rows, dim, groups=counts, num_groups=4,
                                           candidate_bits=[0, 2, 6], tau=1.0, reg_lambda=1e-4,
                                           init_std=0.1)
    target = search.initial_weight.clone()
    opt = torch.optim.Adam([search.logits, search.alpha, search.beta], lr=0.05)
    for _ in range(60):
        ids = torch.randint(0, 32, (64,))
        loss = (search(ids) - target[ids]).square().sum(1).mean() + search.bit_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert search.sample().tolist() == [6, 6, 0, 0]

    options = dict(optimizer="adam", lr=0.01, learn_step=True, step_optimizer="adam",
                   step_lr=1e-4)
    table = retrain_model(search, **options)
    assert isinstance(table, MixedPrecisionEmbedding) and table.widths == [6]
    alpha6, beta = search.alpha.detach()[2].double(), search.beta.detach().double()
    start = table.dequantize().double()
    torch.testing.assert_close(start[:32], quantized(target[:32].double(), alpha6, beta, 6),
                               rtol=0, atol=1e-6)
    assert not start[32:].any()

    twins, slot = mirrors(table, **{k: v for k, v in options.items() if k != "learn_step"},
                          learn_step=True)
    batches = [(ids, torch.randn(ids.numel(), dim))
               for ids in (torch.randint(0, rows, (40,)) for _ in range(3))]
    train_side_by_side(table, twins, slot, batches)
    assert_same_as_twins(table, twins)
    values = torch.zeros(rows, dim)
    values[:32] = twins[6].dequantize() + table.beta
    torch.testing.assert_close(table.dequantize(), values, rtol=0, atol=1e-6)

    served = table.export()
    ids = torch.randint(0, rows, (5, 7))
    torch.testing.assert_close(served(ids), values[ids], rtol=0, atol=1e-6)
    assert served.nbytes == (32 * formats.code_bytes(dim, 6) + served.location.numel() * 4
                             + 4 + dim * 4)
    assert mpe.report(served).average_bits == 3.0
