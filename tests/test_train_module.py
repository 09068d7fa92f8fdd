"""LowPrecisionEmbeddingBag / LowPrecisionEmbedding: training inside backward, against the
ops and the reference, checkpointing, and a small model that learns."""
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, backends, random_bags, same
from torch import nn

import qembed
from qembed import ops, reference
from qembed.formats import qmax


def batch(rows, bags, length, gen):
    return (torch.randint(0, rows, (bags * length,), generator=gen),
            torch.arange(0, bags * length, length))


def clone_state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("opts", [
    dict(bits=4, optimizer="adagrad"),
    dict(bits=8, optimizer="adam", step_per="table", step_optimizer="adam", step_lr=1e-4),
    dict(bits=2, optimizer="sgd", rounding="nearest", learn_step=False, weight_decay=0.1),
    dict(bits=3, optimizer="adagrad", step_grad="two_pass", step_lr=1e-3)])
def test_module_step_matches_ops(opts):
    gen = torch.Generator().manual_seed(7)
    rows, dim = 300, 16
    m = qembed.LowPrecisionEmbeddingBag(rows, dim, mode="mean", padding_idx=3, lr=0.1, seed=5,
                                        **opts)
    before = clone_state(m)
    idx, off = batch(rows, 32, 5, gen)
    target = torch.randn(32, dim, generator=gen)
    dense = m.dequantize()
    expect_out = F.embedding_bag(idx, dense, off, mode="mean", padding_idx=3)
    closure = lambda: (m(idx, off) - target).square().sum()  # noqa: E731
    out = m(idx, off)
    assert torch.equal(out, ops.embedding_bag(m.qweight, idx, off, m.bits, dim, m.format, m.step,
                                              mode="mean", padding_idx=3))
    torch.testing.assert_close(out, expect_out)
    qembed.two_pass_backward(m, closure)
    assert int(m.num_updates) == 1

    # The same step by hand with the reference update, from the kernel's forward (which the
    # lookup tests compare with the reference up to float reordering).
    ref = {k: v.clone() for k, v in before.items()}
    step = ref.get("step")
    rows_u, grad = reference.embedding_bag_backward(2 * (out.detach() - target), idx, off,
                                                    mode="mean", padding_idx=3)
    kw = dict(bits=m.bits, dim=dim, fmt=m.format, lr=0.1, eps=m.eps, weight_decay=m.weight_decay,
              betas=m.betas, step_optimizer=m.step_optimizer, step_lr=m.step_lr, seed=5,
              iteration=1, counter=1)
    sr = m.rounding == "stochastic"
    if m.step_grad == "two_pass":
        w = torch.empty(rows_u.numel(), dim)
        reference.lowp_update(ref["qweight"], step, ref["state"], ref["step_state"], rows_u,
                              grad, optimizer=m.optimizer, stochastic=False, weights_out=w, **kw)
        out2 = ops.embedding_bag(ref["qweight"], idx, off, m.bits, dim, m.format, step,
                                 mode="mean", padding_idx=3)
        _, grad2 = reference.embedding_bag_backward(2 * (out2 - target), idx, off, mode="mean",
                                                    padding_idx=3)
        reference.lowp_update(ref["qweight"], step, ref["state"], ref["step_state"], rows_u,
                              grad2, optimizer="none", learn_step=True, stochastic=sr,
                              weights=w, **kw)
    else:
        reference.lowp_update(ref["qweight"], step, ref["state"], ref["step_state"], rows_u,
                              grad, optimizer=m.optimizer, learn_step=m.learn_step,
                              stochastic=sr, **kw)
    assert torch.equal(ref["qweight"], m.qweight) and torch.equal(ref["state"], m.state)
    assert torch.equal(ref["step_state"], m.step_state)
    assert step is None or torch.equal(step, m.step)
    assert not torch.equal(m.qweight, before["qweight"])
    assert torch.equal(m.qweight[3], before["qweight"][3])  # padding row untouched


def test_no_fp32_table_and_memory():
    rows, dim, bits = 4096, 32, 4
    m = qembed.LowPrecisionEmbeddingBag(rows, dim, bits=bits, optimizer="adagrad")
    idx, off = batch(rows, 64, 8, torch.Generator().manual_seed(0))
    m(idx, off).sum().backward()
    for name, t in list(m.named_buffers()) + list(m.named_parameters()):
        assert not (t.is_floating_point() and t.numel() >= rows * dim), name
    assert m.nbytes == rows * (dim * bits // 8 + 8)


def test_training_reduces_loss():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    rows, dim, fields = 1000, 16, 4
    truth = torch.randn(rows, generator=gen)

    def data(n):
        idx = torch.randint(0, rows, (n, fields), generator=gen)
        y = (truth[idx].sum(1) + 0.3 * torch.randn(n, generator=gen) > 0).float()
        return idx, y

    test_idx, test_y = data(2000)
    for opts in (dict(bits=8), dict(bits=4, optimizer="adam", lr=0.01),
                 dict(bits=2, step_per="table", step_optimizer="adam", step_lr=1e-4)):
        emb = qembed.LowPrecisionEmbeddingBag(rows, dim, mode="sum", **{"lr": 0.1, **opts})
        head = nn.Linear(dim, 1)
        opt = torch.optim.Adam(head.parameters(), lr=0.01)
        evaluate = lambda: F.binary_cross_entropy_with_logits(  # noqa: E731
            head(emb(test_idx)).squeeze(1), test_y).item()
        with torch.no_grad():
            start = evaluate()
        for _ in range(150):
            idx, y = data(256)
            loss = F.binary_cross_entropy_with_logits(head(emb(idx)).squeeze(1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            end = evaluate()
        assert end < start - 0.1, (opts, start, end)


def test_checkpoint_resume_is_exact():
    gen = torch.Generator().manual_seed(2)
    rows, dim = 500, 16
    batches = [batch(rows, 16, 6, gen) for _ in range(8)]
    opts = dict(bits=4, optimizer="adam", step_optimizer="adam", step_lr=1e-3, seed=9)

    def train(m, bs):
        for idx, off in bs:
            m(idx, off).square().sum().backward()

    full = qembed.LowPrecisionEmbeddingBag(rows, dim, **opts)
    train(full, batches)
    first = qembed.LowPrecisionEmbeddingBag(rows, dim, **opts)
    train(first, batches[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = qembed.LowPrecisionEmbeddingBag(rows, dim, **{**opts, "seed": 0})
    resumed.load_state_dict(torch.load(buf))
    train(resumed, batches[3:])
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_nonfinite_gradient_skips_rows_and_warns_once():
    rows, dim = 50, 16
    m = qembed.LowPrecisionEmbeddingBag(rows, dim, mode="sum", bits=8)
    before = clone_state(m)
    idx = torch.tensor([1, 2, 3, 4])
    off = torch.tensor([0, 2])
    scale = torch.tensor([[float("nan")], [1.0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (m(idx, off) * scale).sum().backward()
        (m(idx, off) * scale).sum().backward()
    assert int(m.nonfinite_rows) == 4
    assert len([w for w in caught if "non-finite" in str(w.message)]) == 1
    assert torch.equal(m.qweight[[1, 2]], before["qweight"][[1, 2]])
    assert torch.equal(m.state[[1, 2]], before["state"][[1, 2]])
    assert not torch.equal(m.state[[3, 4]], before["state"][[3, 4]])


def test_psw_gradient_and_embedding_module():
    gen = torch.Generator().manual_seed(4)
    m = qembed.LowPrecisionEmbeddingBag(100, 8, mode="sum", bits=6)
    idx, off = batch(100, 10, 4, gen)
    psw = torch.randn(idx.numel(), generator=gen, requires_grad=True)
    dense = m.dequantize()
    psw_ref = psw.detach().clone().requires_grad_()
    m(idx, off, psw).sum().backward()
    F.embedding_bag(idx, dense, off, mode="sum", per_sample_weights=psw_ref).sum().backward()
    torch.testing.assert_close(psw.grad, psw_ref.grad)

    e = qembed.LowPrecisionEmbedding(100, 8, bits=5, padding_idx=0)
    x = torch.randint(0, 100, (6, 3), generator=gen)
    out = e(x)
    assert out.shape == (6, 3, 8)
    torch.testing.assert_close(out, F.embedding(x, e.dequantize()))
    before = e.qweight.clone()
    out.sum().backward()
    touched = torch.unique(x[x != 0])
    assert (e.qweight[touched] != before[touched]).any()
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(e.qweight[untouched], before[untouched])


def test_sparse_grad_mode_and_from_float():
    gen = torch.Generator().manual_seed(6)
    fp = nn.EmbeddingBag(200, 16, mode="sum")
    m = qembed.LowPrecisionEmbeddingBag.from_float(fp, bits=8, fused_update=False,
                                                   rounding="nearest")
    steps = reference.row_params(m.qweight, 8, 16, "symmetric")[0]
    assert (m.dequantize() - fp.weight).abs().max() <= steps.max() / 2 + 1e-6
    torch.testing.assert_close(steps, 2 * fp.weight.abs().mean(1).detach() / qmax(8) ** 0.5)
    before = m.qweight.clone()
    idx, off = batch(200, 8, 4, gen)
    g = torch.randn(8, 16, generator=gen)
    m(idx, off).backward(g)
    m(idx, off).backward(g)
    assert torch.equal(m.qweight, before)
    rows, grad = m.sparse_grad
    want_rows, want = ops.embedding_bag_backward(g, idx, off)
    assert torch.equal(rows, want_rows)
    torch.testing.assert_close(grad, 2 * want)
    m.update_rows(rows, grad)
    assert not torch.equal(m.qweight, before) and int(m.num_updates) == 1
    m.write_rows(rows, torch.zeros(rows.numel(), 16))
    assert not m.dequantize_rows(rows).any()


@pytest.mark.parametrize("step_per", ["row", "table"])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_training_on_device_equals_cpu(backend, step_per):
    """LowPrecisionEmbeddingBag trained on the device (lookup, both backwards, fused update)
    ends bit for bit where the same module trained on the CPU does."""
    torch.manual_seed(0)
    module = qembed.LowPrecisionEmbeddingBag(500, 64, mode="sum", bits=4, optimizer="adagrad",
                                             step_per=step_per)
    on_device = qembed.LowPrecisionEmbeddingBag(500, 64, mode="sum", bits=4, optimizer="adagrad",
                                                step_per=step_per)
    on_device.load_state_dict(module.state_dict())
    on_device = on_device.to(backend.device)
    for _ in range(3):
        indices, offsets = random_bags(500, 64, max_len=30)
        psw = torch.rand(indices.numel())
        grad_out = torch.randn(64, 64)
        for m, b in ((module, BACKENDS["cpu"]), (on_device, backend)):
            w = b.to(psw).requires_grad_()
            m(b.to(indices), b.to(offsets), w).backward(b.to(grad_out))
    for name, buf in module.state_dict().items():
        assert same(on_device.state_dict()[name], buf), name
