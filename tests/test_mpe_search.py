"""The MPE search's ops, mpe_search_forward and mpe_search_backward, on the CPU and CUDA
kernels: against each other bit for bit, the pure-PyTorch reference, autograd through its
straight-through fake quantizer, and an independent computation of the expected value."""
import pytest
import torch
from conftest import (
    BACKENDS,
    COMPILED_BACKENDS,
    MODES,
    MPE_BITS,
    backends,
    random_bags,
    same,
    search_inputs,
)

from qembed import ops

SEARCH_BITS = [MPE_BITS, [0, 2, 4, 8], [3]]
SEARCH_BITS_IDS = ["0-6", "0248", "3"]


@pytest.mark.parametrize("dim", [16, 40])
@pytest.mark.parametrize("bits", SEARCH_BITS, ids=SEARCH_BITS_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_forward_equals_cpu_and_matches_reference(backend, mode, bits, dim):
    weight, row_group, logits, alpha, beta = search_inputs(rows=60, dim=dim, bits=bits)
    probs = torch.softmax(logits, 1)
    indices, offsets = random_bags(60, 20, max_len=40)
    offsets = None if mode == "none" else offsets
    args = (weight, indices, offsets, row_group, probs, alpha, beta, bits, mode)
    got, cpu, ref = (b.run(ops.mpe_search_forward, *args)
                     for b in (backend, BACKENDS["cpu"], BACKENDS["reference"]))
    assert got.device.type == backend.device and same(got, cpu)
    torch.testing.assert_close(cpu, ref, rtol=1e-5, atol=1e-6)


def test_expected_value_is_probability_weighted_quantization():
    # Independent of the reference: Q_b written out with explicit integer codes.
    weight, row_group, logits, alpha, beta = search_inputs()
    probs = torch.softmax(logits, 1)
    ids = torch.arange(weight.shape[0])
    got = ops.mpe_search_forward(weight, ids, None, row_group, probs, alpha, beta, MPE_BITS,
                                 "none")
    want = torch.zeros_like(weight)
    for k, b in enumerate(MPE_BITS):
        if b:
            q = torch.round((weight - beta) / alpha[k]).clamp(-(2 ** (b - 1)), 2 ** (b - 1) - 1)
            want += probs[row_group, k: k + 1] * (alpha[k] * q + beta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_autograd_through_reference(mode):
    weight, row_group, logits, alpha, beta = search_inputs()
    indices, offsets = random_bags(weight.shape[0], 7, max_len=6)
    offsets = None if mode == "none" else offsets
    grad_out = None
    grads = []
    for use_ref in (False, True):
        leaves = [t.clone().requires_grad_() for t in (weight, logits, alpha, beta)]
        w, lg, a, b = leaves
        with ops.use_reference(use_ref):
            out = ops.mpe_search_forward(w, indices, offsets, row_group, torch.softmax(lg, 1), a,
                                         b, MPE_BITS, mode)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        out.backward(grad_out)
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(["weight", "logits", "alpha", "beta"], *grads):
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dim", [16, 40])
@pytest.mark.parametrize("bits", SEARCH_BITS, ids=SEARCH_BITS_IDS)
@pytest.mark.parametrize("backend", backends(*COMPILED_BACKENDS))
def test_backward_equals_cpu_and_matches_reference(backend, bits, dim):
    """Every gradient bit for bit on every device (the partial sums are added in the CPU's
    row order), and close to the reference's closed form; an empty batch."""
    weight, row_group, logits, alpha, beta = search_inputs(rows=300, dim=dim, groups=7,
                                                           bits=bits)
    unique = torch.unique(torch.randint(0, 300, (200,)))
    args = (weight, unique, torch.randn(unique.numel(), dim), row_group,
            torch.softmax(logits, 1), alpha, beta, bits, 500)
    got, cpu, ref = (b.run(ops.mpe_search_backward, *args)
                     for b in (backend, BACKENDS["cpu"], BACKENDS["reference"]))
    assert all(g.device.type == backend.device and same(g, c) for g, c in zip(got, cpu))
    for c, r in zip(cpu, ref):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-6)
    empty = backend.run(ops.mpe_search_backward, weight, unique[:0], args[2][:0], *args[3:8], 0)
    assert [tuple(t.shape) for t in empty] == [(0, dim), (len(bits),), (dim,), (7, len(bits))]


def test_backward_independent_of_threads():
    weight, row_group, logits, alpha, beta = search_inputs(rows=400)
    unique = torch.arange(400)
    grad_rows = torch.randn(400, weight.shape[1])
    args = (weight, unique, grad_rows, row_group, torch.softmax(logits, 1), alpha, beta,
            MPE_BITS, 9)
    one = ops.mpe_search_backward(*args)
    torch.set_num_threads(2)
    try:
        two = ops.mpe_search_backward(*args)
    finally:
        torch.set_num_threads(1)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_bad_inputs_raise():
    weight, row_group, logits, alpha, beta = search_inputs()
    probs = torch.softmax(logits, 1)
    ids = torch.arange(4)
    with pytest.raises(ValueError, match="alpha must be positive"):
        ops.mpe_search_forward(weight, ids, None, row_group, probs, -alpha, beta, MPE_BITS,
                               "none")
    with pytest.raises(ValueError, match="bit widths"):
        ops.mpe_search_forward(weight, ids, None, row_group, probs, alpha, beta,
                               [0, 1, 2, 3, 4, 5, 9], "none")
    with pytest.raises(IndexError):
        ops.mpe_search_forward(weight, ids, None, row_group + 10, probs, alpha, beta, MPE_BITS,
                               "none")


@pytest.mark.parametrize("backend", backends("cuda"))
def test_validated_in_debug_mode(backend, monkeypatch):
    weight, row_group, logits, alpha, beta = search_inputs()
    probs = torch.softmax(logits, 1)
    args = (weight, torch.tensor([1, 60]), None, row_group, probs, alpha, beta, MPE_BITS, "none")
    got = backend.run(ops.mpe_search_forward, *args)  # row 60 skipped: zeros
    assert not got[1].any()
    monkeypatch.setenv("QEMBED_CUDA_VALIDATE", "1")
    with pytest.raises(IndexError, match="out of range"):
        backend.run(ops.mpe_search_forward, *args)
    with pytest.raises(ValueError, match="alpha must be positive"):
        backend.run(ops.mpe_search_forward, weight, torch.tensor([1]), None, row_group, probs,
                    -alpha, beta, MPE_BITS, "none")
