"""The training step's formulas against an oracle that shares no code with the kernels or
qembed.reference: one lowp_update step recomputed in float64 straight from SPEC.md (and by
torch.optim where its rule is the same: SGD and Adam with L2 weight decay), compared with
the kernel's fp32 weights before rounding (weights_out), its optimizer state, its step and
its codes (round to nearest)."""
import pytest
import torch

from qembed import ops
from qembed.formats import qmax, qmin

ROWS, DIM = 24, 20  # D not a multiple of 8: divisors must count the real columns
LR, EPS, WD, BETAS, STEP_LR, ITERATION = 0.05, 1e-3, 0.02, (0.8, 0.95), 2e-3, 3


def symmetric_table(bits, fmt, gen):
    """Packed rows built by hand (no qembed code): random codes, positive steps inline or
    one for the table; returns (rows uint8, steps [R] float64, table step tensor or None)."""
    n_codes = -(-DIM // 8) * 8
    codes = torch.randint(0, 1 << bits, (ROWS, n_codes), generator=gen)
    codes[:, DIM:] = -qmin(bits)  # the pad holds the code of zero
    steps = torch.rand(ROWS if fmt == "symmetric" else 1, generator=gen, dtype=torch.float64)
    steps = (steps * 0.04 + 0.01).float()
    packed = torch.zeros(ROWS, n_codes * bits // 8, dtype=torch.uint8)
    for d in range(n_codes):  # code d: bits [d*bits, (d+1)*bits) of the row, low bit first
        for k in range(bits):
            bit = d * bits + k
            packed[:, bit // 8] |= (((codes[:, d] >> k) & 1) << (bit % 8)).to(torch.uint8)
    params = steps.view(torch.uint8).view(ROWS, 4) if fmt == "symmetric" else \
        torch.zeros(ROWS, 0, dtype=torch.uint8)
    pad = torch.zeros(ROWS, (-packed.shape[1]) % 4, dtype=torch.uint8)
    rows = torch.cat([packed, pad, params], 1)
    values = (codes[:, :DIM] + qmin(bits)).double() * steps.double().view(-1, 1)
    return rows, values, (steps if fmt == "symmetric_table" else None)


def read_codes(rows, bits):
    """Signed codes [R, DIM] of packed rows, by hand."""
    out = torch.zeros(ROWS, DIM, dtype=torch.long)
    for d in range(DIM):
        for k in range(bits):
            bit = d * bits + k
            out[:, d] |= ((rows[:, bit // 8].long() >> (bit % 8)) & 1) << k
    return out + qmin(bits)


def read_steps(rows, bits, fmt, table_step):
    if fmt == "symmetric_table":
        return table_step.double().expand(ROWS)
    at = (-(-DIM // 8) * bits + 3) // 4 * 4
    return rows[:, at: at + 4].contiguous().view(torch.float32).view(-1).double()


def torch_optim_step(name, w, g, m=None, v=None):
    """One step of torch.optim's SGD or Adam (float64) on rows w with gradient g; Adam starts
    from moments m, v at step ITERATION - 1."""
    p = torch.nn.Parameter(w.clone())
    if name == "sgd":
        opt = torch.optim.SGD([p], lr=LR, weight_decay=WD)
    else:
        opt = torch.optim.Adam([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        opt.state[p] = {"step": torch.tensor(float(ITERATION - 1)), "exp_avg": m.clone(),
                        "exp_avg_sq": v.clone()}
    p.grad = g.clone()
    opt.step()
    state = opt.state.get(p, {})
    return p.detach(), state.get("exp_avg"), state.get("exp_avg_sq")


def lsq_gradient(w, g, s, bits):
    """SPEC.md's step gradient sum_d g_d dQ/ds at x = w / s: Qn below the range, Qp above,
    round(x) - x inside."""
    x = w / s.view(-1, 1)
    dq = torch.where(x < qmin(bits), float(qmin(bits)),
                     torch.where(x > qmax(bits), float(qmax(bits)), torch.round(x) - x))
    return (g * dq).sum(1)


def adam_scalar(s, gs, m, v):
    m = BETAS[0] * m + (1 - BETAS[0]) * gs
    v = BETAS[1] * v + (1 - BETAS[1]) * gs * gs
    hat_m, hat_v = m / (1 - BETAS[0] ** ITERATION), v / (1 - BETAS[1] ** ITERATION)
    return s - STEP_LR * hat_m / (hat_v.sqrt() + EPS), m, v


@pytest.mark.parametrize("fmt", ["symmetric", "symmetric_table"])
@pytest.mark.parametrize("step_optimizer", [None, "sgd", "adam"], ids=["fixed", "lsq-sgd",
                                                                        "lsq-adam"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_one_step_matches_the_formulas(optimizer, step_optimizer, fmt):
    bits = {"sgd": 3, "adagrad": 4, "adam": 6}[optimizer]
    gen = torch.Generator().manual_seed(len(optimizer) * 7 + len(fmt))
    rows, w0, table_step = symmetric_table(bits, fmt, gen)
    uniq = torch.tensor([0, 2, 3, 7, 11, 12, 19, 23])
    g = torch.randn(uniq.numel(), DIM, generator=gen)
    width = {"sgd": 0, "adagrad": 1, "adam": 2 * DIM}[optimizer]
    state = torch.rand(ROWS, width, generator=gen) * 0.1
    step_state = torch.rand(ROWS if fmt == "symmetric" else 1, 2, generator=gen) * 1e-3
    old_state, old_step_state = state.clone(), step_state.clone()
    s0 = read_steps(rows, bits, fmt, table_step)
    kept = torch.empty(uniq.numel(), DIM)
    ops.lowp_update(rows, table_step, state, step_state, uniq, g, bits, DIM, fmt, optimizer, LR,
                    EPS, WD, BETAS, ITERATION, learn_step=step_optimizer is not None,
                    step_optimizer=step_optimizer or "sgd", step_lr=STEP_LR, stochastic=False,
                    weights_out=kept)

    # the optimizer step, in float64
    w, gd = w0[uniq], g.double()
    if optimizer == "adagrad":  # row-wise: G += mean_d (g + wd w)^2
        decayed = gd + WD * w
        acc = old_state[uniq, 0].double() + (decayed ** 2).sum(1) / DIM
        want = w - LR * decayed / (acc.sqrt() + EPS).view(-1, 1)
        torch.testing.assert_close(state[uniq, 0].double(), acc, rtol=1e-6, atol=0)
    else:
        m0, v0 = old_state[uniq, :DIM].double(), old_state[uniq, DIM:].double()
        want, m, v = torch_optim_step(optimizer, w, gd, m0, v0)
        if optimizer == "adam":
            torch.testing.assert_close(state[uniq, :DIM].double(), m, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(state[uniq, DIM:].double(), v, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(kept.double(), want, rtol=1e-5, atol=1e-7)

    # the step: LSQ's gradient at the updated rows, scaled by 1 / sqrt(Qp * n)
    s_new = read_steps(rows, bits, fmt, table_step)
    qp = max(qmax(bits), 1)
    updated = kept.double()  # the kernel's own rows: round(x) is not continuous
    if step_optimizer is None:
        assert torch.equal(s_new, s0)
    elif fmt == "symmetric":
        gs = lsq_gradient(updated, gd, s0[uniq], bits) / (qp * DIM) ** 0.5
        if step_optimizer == "sgd":
            new = s0[uniq] - STEP_LR * gs
        else:
            new, m, v = adam_scalar(s0[uniq], gs, old_step_state[uniq, 0].double(),
                                    old_step_state[uniq, 1].double())
            torch.testing.assert_close(step_state[uniq].double(), torch.stack([m, v], 1),
                                       rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(s_new[uniq], new, rtol=1e-5, atol=1e-9)
    else:
        gs = lsq_gradient(updated, gd, s0[uniq], bits).sum() / (qp * uniq.numel() * DIM) ** 0.5
        if step_optimizer == "sgd":
            one = s0[0] - STEP_LR * gs
        else:
            one, m, v = adam_scalar(s0[0], gs, old_step_state[0, 0].double(),
                                    old_step_state[0, 1].double())
            torch.testing.assert_close(step_state[0].double(), torch.stack([m, v]), rtol=1e-5,
                                       atol=1e-12)
        torch.testing.assert_close(s_new[0], one, rtol=1e-5, atol=1e-9)
    others = torch.ones(ROWS, dtype=torch.bool)
    others[uniq] = False
    if fmt == "symmetric":
        assert torch.equal(s_new[others], s0[others])

    # codes: the updated rows rounded to nearest with the new step, clamped to the range
    want_codes = torch.round(updated / s_new[uniq].view(-1, 1)).clamp(qmin(bits), qmax(bits))
    assert torch.equal(read_codes(rows, bits)[uniq], want_codes.long())
    assert torch.equal(read_codes(rows, bits)[others].double() * s0[others].view(-1, 1),
                       w0[others])
