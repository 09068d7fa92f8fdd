"""ALPT's step sizes where the other tests do not reach: the initial steps (per row and per
table) against SPEC.md's s0 = 2 mean|w0| / sqrt(Qp), and a two-pass step whose second pass
never comes (the rows are then re-quantized with the module's rounding, the step unchanged,
exactly as a one-pass step without a learned step)."""
import pytest
import torch

import qembed
from qembed import formats, reference


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("step_per", ["row", "table"])
def test_initial_steps(bits, step_per):
    rows, dim = 70, 12
    w = torch.randn(rows, dim) * 0.05
    w[9] = 0  # a zero row takes the table's step
    m = qembed.LowPrecisionEmbeddingBag(rows, dim, _weight=w, padding_idx=4, bits=bits,
                                        step_per=step_per, seed=11)
    w[4] = 0  # the padding row starts at zero
    root_qp = max(formats.qmax(bits), 1) ** 0.5
    table_step = 2 * w.double().abs().mean() / root_qp
    fmt = "symmetric" if step_per == "row" else "symmetric_table"
    if step_per == "table":
        torch.testing.assert_close(m.step.double(), table_step.reshape(1), rtol=1e-6, atol=0)
        steps = m.step.expand(rows)
    else:
        want = 2 * w.double().abs().mean(1) / root_qp
        want[want == 0] = table_step
        steps = reference.row_params(m.qweight, bits, dim, fmt)[0]
        torch.testing.assert_close(steps.double(), want, rtol=1e-6, atol=0)
    # the codes: w / s rounded stochastically (update counter 0), clamped to the range
    values = m.dequantize()
    lo = torch.floor(w / steps[:, None]).clamp(formats.qmin(bits), formats.qmax(bits))
    hi = torch.ceil(w / steps[:, None]).clamp(formats.qmin(bits), formats.qmax(bits))
    q = torch.round(values / steps[:, None])
    assert ((q == lo) | (q == hi)).all()
    stochastic = reference.quantize(w, bits, fmt, steps.contiguous() if step_per == "row"
                                    else m.step, stochastic=True, seed=11, counter=0)
    assert torch.equal(m.qweight, stochastic)


def test_random_initial_table_step_follows_init_std():
    """Without weights, w0 ~ N(0, std^2): the table's step is 2 E|w0| / sqrt(Qp)."""
    m = qembed.LowPrecisionEmbeddingBag(20000, 16, bits=4, step_per="table", init_std=0.01)
    expect = 2 * 0.01 * (2 / torch.pi) ** 0.5 / 7 ** 0.5
    assert abs(float(m.step) / expect - 1) < 0.01


def twin_modules(**options):
    common = dict(mode="sum", bits=3, optimizer="adagrad", lr=0.2, seed=5, init_std=0.1)
    return (qembed.LowPrecisionEmbeddingBag(50, 12, step_grad="two_pass", learn_step=True,
                                            step_lr=0.5, **common, **options),
            qembed.LowPrecisionEmbeddingBag(50, 12, learn_step=False, **common, **options))


@pytest.mark.parametrize("step_per", ["row", "table"])
def test_two_pass_step_whose_second_pass_never_comes(step_per):
    two_pass, plain = twin_modules(step_per=step_per)
    assert torch.equal(two_pass.qweight, plain.qweight)
    step0 = None if two_pass.step is None else two_pass.step.clone()
    ids, offsets = torch.randint(0, 50, (30,)), torch.arange(0, 30, 3)
    grad_out = torch.randn(10, 12)
    for m in (two_pass, plain):
        m(ids, offsets).backward(grad_out)  # a plain backward: no two_pass_backward
    # until the next lookup, the rows hold the update rounded to nearest
    assert two_pass._pending is not None
    # the next forward re-quantizes them with the module's (stochastic) rounding, at the
    # update's counter, the step unchanged: the one-pass update without a learned step
    later = torch.randint(0, 50, (6,)), torch.arange(0, 6, 2)
    with torch.no_grad():
        torch.testing.assert_close(two_pass(*later), plain(*later))
    assert two_pass._pending is None
    assert torch.equal(two_pass.qweight, plain.qweight)
    assert step0 is None or torch.equal(two_pass.step, step0)
    # and the next step counts on from there
    for m in (two_pass, plain):
        m(ids, offsets).backward(grad_out)
        with torch.no_grad():
            m(*later)
    assert int(two_pass.num_updates) == int(plain.num_updates) == 2
    assert torch.equal(two_pass.qweight, plain.qweight)


def test_two_pass_pending_rows_are_finished_by_the_next_update():
    """A second backward without a forward in between (the user's own update_rows call)
    finishes the pending rows first."""
    two_pass, plain = twin_modules()
    ids, offsets = torch.randint(0, 50, (30,)), torch.arange(0, 30, 3)
    grad_out = torch.randn(10, 12)
    for m in (two_pass, plain):
        m(ids, offsets).backward(grad_out)
    rows = torch.tensor([1, 7, 30])
    grad = torch.randn(3, 12)
    for m in (two_pass, plain):
        m.update_rows(rows, grad)
    with torch.no_grad():
        two_pass(ids, offsets)
    assert torch.equal(two_pass.qweight, plain.qweight)
