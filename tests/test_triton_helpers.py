"""The kernels' shared helpers: in-kernel Philox against its PyTorch mirror, and the interpreter's bf16 tl.dot
workaround (DESIGN.md: the interpreter multiplies bf16 bit patterns as integers)."""
import pytest
import torch
import triton
import triton.language as tl

from lora_kernels import reference
from lora_kernels.ops.common import INTERPRETED, UPCAST_DOT, mma, philox_uniform
from tests.conftest import DEVICE


@triton.jit
def _uniform_kernel(out_ptr, seed, M, N, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    u = philox_uniform(seed, rows[:, None], cols[None, :])
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], u, mask=(rows[:, None] < M) & (cols[None, :] < N))


@pytest.mark.parametrize("seed", [2, 12345, 2**31 - 2])
def test_philox_kernel_is_bit_identical_to_reference(seed):
    m, n = 37, 50
    out = torch.empty(m, n, device=DEVICE)
    _uniform_kernel[(triton.cdiv(m, 16), triton.cdiv(n, 32))](out, seed, m, n, BM=16, BN=32)
    expected = reference.philox_uniform(seed, torch.arange(m).unsqueeze(1), torch.arange(n).unsqueeze(0))
    assert torch.equal(out.cpu(), expected)


def test_philox_reference_statistics():
    u = reference.philox_uniform(99, torch.arange(256).unsqueeze(1), torch.arange(256).unsqueeze(0))
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    other = reference.philox_uniform(100, torch.arange(256).unsqueeze(1), torch.arange(256).unsqueeze(0))
    assert (u == other).float().mean() < 0.01  # a new seed gives a new stream


# Random123's published known-answer vectors for Philox4x32-10 (counter, key, output words).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_reference_known_answers(counter, key, expected):
    words = reference.philox4x32_10(*[torch.tensor(c, dtype=torch.int64) for c in counter], *key)
    assert tuple(int(w) for w in words) == expected


def test_philox_reference_chunks_agree(monkeypatch):
    """Chunking over rows (for speed) changes no bit, for row-vectors, full grids and counters near 2^32."""
    rows = torch.arange(2**32 - 70, 2**32 - 1).unsqueeze(1)
    cols = torch.arange(2**31 - 40, 2**31 + 9).unsqueeze(0)
    whole = reference.philox_uniform(77, rows, cols)
    grid_r, grid_c = torch.broadcast_tensors(rows, cols)
    monkeypatch.setattr(reference, "_PHILOX_CHUNK", 100)
    assert torch.equal(reference.philox_uniform(77, rows, cols), whole)
    assert torch.equal(reference.philox_uniform(77, grid_r, grid_c), whole)
    assert torch.equal(reference.philox_uniform(77, rows[5, 0], cols[0, 7]), whole[5, 7])
    assert reference.philox_uniform(77, rows[:0], cols).shape == (0, cols.shape[1])


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, UPCAST: tl.constexpr):
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
    c = mma(a, b, tl.zeros((16, 16), dtype=tl.float32), UPCAST)
    tl.store(c_ptr + r[:, None] * 16 + r[None, :], c)


def _dot(a, b, upcast):
    c = torch.empty(16, 16, device=DEVICE)
    _dot_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), c, UPCAST=upcast)
    return c.cpu()


def test_bf16_dot_workaround():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    expected = a.float() @ b.float()
    assert UPCAST_DOT == INTERPRETED  # the workaround is on exactly under the interpreter
    torch.testing.assert_close(_dot(a, b, UPCAST_DOT), expected, rtol=1e-5, atol=1e-5)
    if INTERPRETED:
        raw = _dot(a, b, False)
        if torch.allclose(raw, expected, rtol=1e-2, atol=1e-2):
            pytest.skip("this Triton's interpreter computes bf16 tl.dot correctly: the workaround is no longer needed")
        assert not torch.allclose(raw, expected, rtol=1e-2, atol=1e-2)


@triton.jit
def _decode_bytes_kernel(packed_ptr, code_ptr, scale_ptr, out_ptr, REGS: tl.constexpr):
    from lora_kernels.ops.dequant import code_regs, decode_pair, decode_pair_regs

    offs = tl.arange(0, 256)
    packed = tl.load(packed_ptr + offs)
    scale = tl.load(scale_ptr + offs)
    if REGS:
        even, odd = decode_pair_regs(packed, scale, code_regs(code_ptr), tl.bfloat16)
    else:
        even, odd = decode_pair(packed, scale, code_ptr, tl.bfloat16)
    tl.store(out_ptr + 2 * offs, even)
    tl.store(out_ptr + 2 * offs + 1, odd)


def test_register_code_table_decodes_every_byte_as_the_gather():
    """lookup16's select tree returns code[nibble] exactly: all 256 bytes, a random code table, random scales."""
    gen = torch.Generator().manual_seed(4)
    code = (torch.rand(16, generator=gen) * 2 - 1).to(DEVICE)
    scale = (torch.rand(256, generator=gen) + 0.01).to(DEVICE)
    packed = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    outs = []
    for regs in (False, True):
        out = torch.empty(512, dtype=torch.bfloat16, device=DEVICE)
        _decode_bytes_kernel[(1,)](packed, code, scale, out, REGS=regs)
        outs.append(out.cpu())
    expected = torch.stack([code.cpu()[torch.arange(256) >> 4], code.cpu()[torch.arange(256) & 15]], 1)
    expected = (expected * scale.cpu()[:, None]).reshape(-1)
    assert torch.equal(outs[1], outs[0])  # bit for bit
    # the interpreter truncates fp32 -> bf16 where CUDA rounds (DESIGN.md): within one bf16 ulp of the value
    assert ((outs[1].float() - expected).abs() <= expected.abs() * 2.0**-7).all()
