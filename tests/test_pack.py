"""pack and unpack on the CPU and CUDA kernels and the reference: round trips, and the
documented layout checked against computations that share no code with any of them; bad
input."""
import pytest
import torch
from conftest import BITS, DIMS, backends
from hypothesis import given, settings
from hypothesis import strategies as st

from qembed import ops, reference

BACKENDS = backends("cpu", "reference", "cuda")


def random_codes(n: int, dim: int, bits: int) -> torch.Tensor:
    return torch.randint(0, 1 << bits, (n, dim), dtype=torch.uint8)


def python_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """SPEC "Storage": 8 codes take `bits` bytes, code i at bits [i*b, i*b + b) of the group
    read as a little-endian integer."""
    out = []
    for row in codes.tolist():
        packed = b""
        for g in range(0, len(row), 8):
            group = sum(c << (i * bits) for i, c in enumerate(row[g:g + 8]))
            packed += group.to_bytes(bits, "little")
        out.append(list(packed))
    return torch.tensor(out, dtype=torch.uint8).reshape(codes.shape[0], codes.shape[1] * bits // 8)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_unpack_match_python(backend, bits, dim):
    codes = random_codes(7, dim, bits)
    packed = backend.run(ops.pack, codes, bits)
    assert packed.shape == (7, dim * bits // 8) and packed.dtype == torch.uint8
    assert packed.device.type == backend.device
    assert torch.equal(packed.cpu(), python_pack(codes, bits))
    # unpack reads the first dim*bits/8 bytes of wider rows (codes followed by parameters)
    wide = torch.cat([packed.cpu(), torch.randint(0, 256, (7, 12), dtype=torch.uint8)], 1)
    column_major = wide.t().contiguous().t()
    for rows in (packed, wide, column_major):
        assert torch.equal(backend.run(ops.unpack, rows, bits, dim).cpu(), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_of_random_bytes(backend, bits):
    packed = torch.randint(0, 256, (9, 136 * bits // 8), dtype=torch.uint8)
    codes = backend.run(ops.unpack, packed, bits, 136).cpu()
    assert torch.equal(python_pack(codes, bits), packed)
    assert torch.equal(codes, reference.unpack(packed, bits, 136))


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), groups=st.integers(1, 20), n=st.integers(0, 4), data=st.data())
@pytest.mark.parametrize("backend", backends("cpu", "reference"))
def test_round_trip_property(backend, bits, groups, n, data):
    dim = 8 * groups
    raw = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n * dim, max_size=n * dim))
    codes = torch.tensor(raw, dtype=torch.uint8).reshape(n, dim)
    packed = backend.run(ops.pack, codes, bits)
    assert torch.equal(packed, python_pack(codes, bits))
    assert torch.equal(backend.run(ops.unpack, packed, bits, dim), codes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_1bit(backend):
    codes = random_codes(3, 16, 1)
    bits = torch.stack([codes[:, i::8].long() << i for i in range(8)]).sum(0)
    assert torch.equal(backend.run(ops.pack, codes, 1).cpu(), bits.to(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_2bit(backend):
    codes = random_codes(3, 16, 2)
    byte = codes[:, 0::4] | codes[:, 1::4] << 2 | codes[:, 2::4] << 4 | codes[:, 3::4] << 6
    assert torch.equal(backend.run(ops.pack, codes, 2).cpu(), byte)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_4bit(backend):
    codes = random_codes(3, 16, 4)
    # the even element sits in the low nibble
    assert torch.equal(backend.run(ops.pack, codes, 4).cpu(), codes[:, 0::2] | codes[:, 1::2] << 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_8bit(backend):
    codes = random_codes(3, 16, 8)
    assert torch.equal(backend.run(ops.pack, codes, 8).cpu(), codes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_single_code_positions(backend):
    # one code of value 1 at each position i of a group lands on stream bit i*b
    for bits in BITS:
        for i in range(8):
            codes = torch.zeros(1, 8, dtype=torch.uint8)
            codes[0, i] = 1
            packed = backend.run(ops.pack, codes, bits)[0].tolist()
            assert int.from_bytes(bytes(packed), "little") == 1 << (i * bits), (bits, i)


# (id, call, exception, message)
ERRORS = [
    ("pack-code-too-large", lambda: ops.pack(torch.full((2, 8), 16, dtype=torch.uint8), 4),
     ValueError, r"code 16 does not fit in 4 bits"),
    ("pack-not-uint8", lambda: ops.pack(torch.zeros(2, 8, dtype=torch.int32), 4), TypeError,
     r"codes must be uint8, got Int"),
    ("pack-bits-9", lambda: ops.pack(torch.zeros(2, 8, dtype=torch.uint8), 9), ValueError,
     r"bits must be in 1..8, got 9"),
    ("pack-dim-0", lambda: ops.pack(torch.zeros(2, 0, dtype=torch.uint8), 4), ValueError,
     r"embedding dim must be positive, got 0"),
    ("unpack-too-narrow", lambda: ops.unpack(torch.zeros(2, 7, dtype=torch.uint8), 4, 16),
     ValueError, r"rows of 7 bytes cannot hold 16 codes of 4 bits"),
    ("unpack-bits-0", lambda: ops.unpack(torch.zeros(2, 8, dtype=torch.uint8), 0, 16),
     ValueError, r"bits must be in 1..8, got 0"),
]


@pytest.mark.parametrize("call,exc,match", [pytest.param(*c[1:], id=c[0]) for c in ERRORS])
@pytest.mark.parametrize("backend", backends("cpu", "reference"))
def test_errors(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        with backend.context():
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_rejects_wide_codes(backend):
    with pytest.raises(ValueError, match="does not fit"):
        backend.run(ops.pack, torch.full((2, 8), 4, dtype=torch.uint8), 2)
