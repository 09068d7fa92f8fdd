"""Interchange with torch.ao's packed rows: qembed reads rows made by
torch.ops.quantized.embedding_bag_{byte,4bit,2bit}_prepack and writes rows its lookup ops
read, with the same results."""
import pytest
import torch
from conftest import bag_lengths, pool_per_bag, random_bags, random_psw
from torch import nn

from qembed import QuantizedEmbeddingBag

AO = {8: ("byte", torch.float32), 4: ("4bit", torch.float16), 2: ("2bit", torch.float16)}
CASES = [("sum", False), ("sum", True), ("mean", False)]
CASE_IDS = ["sum", "sum-psw", "mean"]


def ao_prepack(weight, bits):
    return getattr(torch.ops.quantized, f"embedding_bag_{AO[bits][0]}_prepack")(weight)


def ao_lookup(packed, bits, indices, offsets, mode, psw, include_last_offset):
    """The ao op; it has no mean (mode=1 returns the sum in torch 2.13), so mean is its sum
    divided by the bag lengths (empty bags stay zero)."""
    op = getattr(torch.ops.quantized, f"embedding_bag_{AO[bits][0]}_rowwise_offsets")
    out = op(packed, indices, offsets, mode=0, per_sample_weights=psw,
             include_last_offset=include_last_offset)
    if mode == "mean":
        lengths = bag_lengths(offsets, indices.numel(), include_last_offset)
        out = out / lengths.clamp(min=1)[:, None]
    return out


def param_bytes(bits):
    return 2 * AO[bits][1].itemsize  # scale and bias after the codes


def trained_weight(rows, dim):
    return torch.randn(rows, dim) * torch.rand(rows, 1) * 0.5 + torch.randn(rows, 1) * 0.1


@pytest.mark.parametrize("include_last_offset", [False, True], ids=["no_last", "last"])
@pytest.mark.parametrize("mode,with_psw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dim", [16, 64, 136])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_from_torch_ao_matches_ao_lookup(bits, dim, mode, with_psw, include_last_offset):
    weight = trained_weight(50, dim)
    packed = ao_prepack(weight, bits)
    module = QuantizedEmbeddingBag.from_torch_ao(packed, bits, mode=mode,
                                                 include_last_offset=include_last_offset)
    assert (module.num_embeddings, module.embedding_dim, module.bits) == (50, dim, bits)
    # the rows read as SPEC's affine format are within half a step of the weights (plus
    # what ao's rounding with fp16 parameters adds)
    scale = packed[:, -param_bytes(bits):].contiguous().view(AO[bits][1])[:, :1].float()
    slack = 1e-3 * weight.abs().amax()
    assert ((module.dequantize() - weight).abs() <= scale / 2 + slack).all()

    indices, offsets = random_bags(50, 25, include_last_offset=include_last_offset)
    psw = random_psw(indices.numel()) if with_psw else None
    expected = ao_lookup(packed, bits, indices, offsets, mode, psw, include_last_offset)
    torch.testing.assert_close(module(indices, offsets, psw), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,with_psw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dim", [16, 64, 136])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_to_torch_ao_feeds_ao_lookup(bits, dim, mode, with_psw):
    fp = nn.EmbeddingBag(60, dim, mode=mode, _weight=trained_weight(60, dim))
    module = QuantizedEmbeddingBag.from_float(fp, bits=bits)
    packed = module.to_torch_ao()
    assert packed.shape == (60, dim * bits // 8 + param_bytes(bits))

    indices, offsets = random_bags(60, 30)
    psw = random_psw(indices.numel()) if with_psw else None
    out = module(indices, offsets, psw)
    ao = ao_lookup(packed, bits, indices, offsets, mode, psw, False)
    # fp16 scale and bias (4 and 2 bits) each round by at most 2^-11 relative, so a value
    # scale*u + bias moves by at most 2^-11 * (scale*u_max + |bias|) (0 for fp32 params)
    rel = 0.0 if bits == 8 else 2.0**-11
    w = module.dequantize()
    row_bound = rel * (w.amax(1) - w.amin(1) + w.amin(1).abs()) * 1.01 + 1e-6
    terms = row_bound[indices] * (psw.abs() if psw is not None else 1)
    bound = pool_per_bag(terms, offsets, mean=mode == "mean")
    assert ((out - ao).abs() <= bound[:, None] + 1e-5).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_torch_ao_round_trip(bits):
    module = QuantizedEmbeddingBag(40, 32, bits=bits, mode="sum")
    packed = module.to_torch_ao()
    back = QuantizedEmbeddingBag.from_torch_ao(packed, bits, mode="sum")
    assert torch.equal(back.to_torch_ao(), packed)
    if bits == 8:  # fp32 parameters: the rows come back bit for bit
        assert torch.equal(back.qweight, module.qweight)
