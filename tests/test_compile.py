"""Modules over packed tables traced whole by torch.compile(fullgraph=True): same output as
eager with the eager, aot_eager and (one case on the CPU) inductor backends."""
import pytest
import torch
from conftest import backends, random_bags
from torch import nn

from qembed import QuantizedEmbedding, QuantizedEmbeddingBag


class Model(nn.Module):
    def __init__(self, bits, fmt):
        super().__init__()
        self.bag = QuantizedEmbeddingBag(100, 16, mode="sum", padding_idx=0, bits=bits, format=fmt)
        self.mean = QuantizedEmbeddingBag(60, 16, mode="mean", include_last_offset=True,
                                          bits=bits, format=fmt, dtype=torch.bfloat16)
        self.emb = QuantizedEmbedding(50, 16, bits=bits, format=fmt)
        self.head = nn.Linear(16, 4)

    def forward(self, indices, offsets, psw, mean_indices, mean_offsets, tokens):
        x = self.bag(indices, offsets, psw) + self.mean(mean_indices, mean_offsets).float()
        return self.head(x + self.emb(tokens).sum(1))


def inputs():
    indices, offsets = random_bags(100, 8, padding_idx=0)
    mean_indices, mean_offsets = random_bags(60, 8, include_last_offset=True)
    return (indices, offsets, torch.randn(indices.numel()), mean_indices, mean_offsets,
            torch.randint(0, 50, (8, 3)))


# every format with the cheap backends; one inductor case (a CPU compile takes ~20 s here)
FORMATS = [(4, "affine"), (3, "symmetric"), (8, "symmetric_table")]
CASES = [(bits, fmt, backend) for bits, fmt in FORMATS for backend in ("eager", "aot_eager")]
CASES.append((4, "affine", "inductor"))


@pytest.mark.parametrize("bits,fmt,backend", CASES)
def test_compiled_matches_eager(bits, fmt, backend):
    torch._dynamo.reset()
    model = Model(bits, fmt).eval()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    # a second batch of other sizes re-traces with dynamic shapes (not worth it for inductor)
    batches = 1 if backend == "inductor" else 2
    with torch.no_grad():
        for _ in range(batches):
            args = inputs()
            torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_compiled_module_on_device(backend, compiler):
    torch._dynamo.reset()
    module = QuantizedEmbeddingBag(1000, 64, mode="sum", padding_idx=0, bits=4, format="affine")
    module.load_float_weight(torch.randn(1000, 64))
    module = module.to(backend.device)
    compiled = torch.compile(module, fullgraph=True, backend=compiler)
    indices, offsets = backend.to(random_bags(1000, 128, padding_idx=0))
    psw = backend.to(torch.randn(indices.numel()))
    with torch.no_grad():
        torch.testing.assert_close(compiled(indices, offsets, psw), module(indices, offsets, psw))
