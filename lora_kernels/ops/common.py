"""Pieces shared by the kernel families: interpreter detection, the tensor-core dot, Philox dropout."""
import triton
import triton.language as tl

from ..backend import interpreting

# Decided once, as triton.jit decides interpretation at import time.
INTERPRETED = interpreting()
# Triton's interpreter computes tl.dot on bf16 operands wrongly (it multiplies the raw uint16 bits), so
# under the interpreter every dot runs on fp32 copies. GPU code never takes that branch.
UPCAST_DOT = INTERPRETED


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b on tensor cores, fp32 accumulation; fp32 operands use exact (ieee) products."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def philox_uniform(seed, rows, cols):
    """Uniform [0, 1) from Philox4x32-10, counter (col, row, 0, 0), key (seed, 0).

    Mirrors lora_kernels.reference.philox_uniform bit for bit; `rows` [BM, 1] and `cols` [1, BN] broadcast.
    """
    c0 = (cols + rows * 0).to(tl.uint32)
    c1 = (rows + cols * 0).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = c2 + seed  # uint32 + int32 stays uint32; works when triton specializes seed as a constant
    k1 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def rank_block(r: int, cap: int = 64) -> int:
    """Rank tile: a power of two of at least 16 (tl.dot on GPU needs dims >= 16), at most `cap` per chunk."""
    return min(cap, max(16, next_pow2(r)))
