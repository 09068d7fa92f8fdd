"""Bit packing: compiled kernels vs the reference, round trips, and the documented layout
checked against computations that share no code with either."""
import pytest
import torch
from conftest import BITS, DIMS
from hypothesis import given, settings
from hypothesis import strategies as st

from qembed import ops, reference

IMPLS = [ops, reference]


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
def test_pack_unpack_match_reference(bits, dim):
    codes = random_codes(7, dim, bits)
    packed = ops.pack(codes, bits)
    assert packed.shape == (7, dim * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(packed, reference.pack(codes, bits))
    assert torch.equal(packed, python_pack(codes, bits))
    # unpack reads the first dim*bits/8 bytes of wider rows (codes followed by parameters)
    wide = torch.cat([packed, torch.randint(0, 256, (7, 12), dtype=torch.uint8)], 1)
    for impl in IMPLS:
        assert torch.equal(impl.unpack(packed, bits, dim), codes)
        assert torch.equal(impl.unpack(wide, bits, dim), codes)
        column_major = wide.t().contiguous().t()
        assert torch.equal(impl.unpack(column_major, bits, dim), codes)


@pytest.mark.parametrize("bits", BITS)
def test_unpack_of_random_bytes_matches_reference(bits):
    packed = torch.randint(0, 256, (9, 136 * bits // 8), dtype=torch.uint8)
    codes = ops.unpack(packed, bits, 136)
    assert torch.equal(codes, reference.unpack(packed, bits, 136))
    assert torch.equal(python_pack(codes, bits), packed)


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), groups=st.integers(1, 20), n=st.integers(0, 4), data=st.data())
def test_round_trip_property(bits, groups, n, data):
    dim = 8 * groups
    raw = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n * dim, max_size=n * dim))
    codes = torch.tensor(raw, dtype=torch.uint8).reshape(n, dim)
    for impl in IMPLS:
        packed = impl.pack(codes, bits)
        assert torch.equal(packed, python_pack(codes, bits))
        assert torch.equal(impl.unpack(packed, bits, dim), codes)


def test_layout_1bit():
    codes = random_codes(3, 16, 1)
    bits = torch.stack([codes[:, i::8].long() << i for i in range(8)]).sum(0)
    assert torch.equal(ops.pack(codes, 1), bits.to(torch.uint8))


def test_layout_2bit():
    codes = random_codes(3, 16, 2)
    byte = codes[:, 0::4] | codes[:, 1::4] << 2 | codes[:, 2::4] << 4 | codes[:, 3::4] << 6
    assert torch.equal(ops.pack(codes, 2), byte)


def test_layout_4bit():
    codes = random_codes(3, 16, 4)
    # the even element sits in the low nibble
    assert torch.equal(ops.pack(codes, 4), codes[:, 0::2] | codes[:, 1::2] << 4)


def test_layout_8bit():
    codes = random_codes(3, 16, 8)
    assert torch.equal(ops.pack(codes, 8), codes)


def test_layout_single_code_positions():
    # one code of value 1 at each position i of a group lands on stream bit i*b
    for bits in BITS:
        for i in range(8):
            codes = torch.zeros(1, 8, dtype=torch.uint8)
            codes[0, i] = 1
            packed = ops.pack(codes, bits)[0].tolist()
            assert int.from_bytes(bytes(packed), "little") == 1 << (i * bits), (bits, i)
