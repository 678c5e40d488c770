"""4-bit (NF4/FP4) decoding: jit helpers shared by the GEMM kernels, and dense dequantization (bit-identical
to bitsandbytes on CUDA)."""
import torch
import triton
import triton.language as tl

from ..nf4 import Quant4bit
from .common import INTERPRETED

# On a GPU the compiler contracts a product and a sum into one FMA (one rounding); bitsandbytes rounds twice.
# Seen on an H200: fp16 weights dequantized with the nested scale fused differed from bitsandbytes' in the
# last bit (bf16 hid it). The interpreter never contracts and cannot run inline assembly.
_EXPLICIT_ADD = tl.constexpr(not INTERPRETED)


@triton.jit
def add_rn(a, b):
    """a + b in fp32, rounded on its own: never folded into an FMA with the product that made a or b."""
    if _EXPLICIT_ADD:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a + b


@triton.jit
def block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask, NESTED: tl.constexpr,
                BS2: tl.constexpr):
    """fp32 absmax of the 4-bit blocks `block`. Double quantization is undone here, in the kernel, in
    bitsandbytes' order (code2[absmax] * absmax2, then + offset), so no PyTorch pass runs per call."""
    if NESTED:
        quant = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + quant) * tl.load(absmax2_ptr + block // BS2, mask=mask, other=0.0)
        return add_rn(scale, tl.load(offset_ptr))
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def decode_pair(packed, scale, code_ptr, dtype: tl.constexpr):
    """Both elements of each packed byte: the high nibble (even element) and the low nibble (odd element),
    each code * scale in fp32 rounded once to `dtype`, as bitsandbytes computes them. Kept as two tiles,
    never interleaved: the GEMMs pair them with the matching even/odd halves of the other operand."""
    even = (tl.load(code_ptr + (packed >> 4)) * scale).to(dtype)
    odd = (tl.load(code_ptr + (packed & 0xF)) * scale).to(dtype)
    return even, odd


@triton.jit
def code_regs(code_ptr):
    """The 16 code values as scalars, loaded once before a main loop (see lookup16)."""
    return (tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3),
            tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7),
            tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
            tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15))


@triton.jit
def lookup16(nib, c):
    """c[nib] for 4-bit codes `nib` from the 16 scalars `c` (code_regs): a tree of 15 selects on the nibble's
    bits, no memory access. The same fp32 values the gather returns, so the decode stays bit-exact; what it
    avoids is the per-element gather, which Triton's pipeliner stages through cp.async and shared memory."""
    b0 = (nib & 1) != 0
    l0 = tl.where(b0, c[1], c[0])
    l1 = tl.where(b0, c[3], c[2])
    l2 = tl.where(b0, c[5], c[4])
    l3 = tl.where(b0, c[7], c[6])
    l4 = tl.where(b0, c[9], c[8])
    l5 = tl.where(b0, c[11], c[10])
    l6 = tl.where(b0, c[13], c[12])
    l7 = tl.where(b0, c[15], c[14])
    b1 = (nib & 2) != 0
    m0 = tl.where(b1, l1, l0)
    m1 = tl.where(b1, l3, l2)
    m2 = tl.where(b1, l5, l4)
    m3 = tl.where(b1, l7, l6)
    b2 = (nib & 4) != 0
    h0 = tl.where(b2, m1, m0)
    h1 = tl.where(b2, m3, m2)
    return tl.where((nib & 8) != 0, h1, h0)


@triton.jit
def decode_pair_regs(packed, scale, c, dtype: tl.constexpr):
    """decode_pair with the code table in registers (lookup16)."""
    even = (lookup16(packed >> 4, c) * scale).to(dtype)
    odd = (lookup16(packed & 0xF, c) * scale).to(dtype)
    return even, odd


@triton.jit
def decode_4bit(w_ptr, code_ptr, scale_ptr, flat, mask, BS_SHIFT):
    """Values of the flat elements `flat` of a packed 4-bit weight, in fp32 (code[nibble] * block scale).
    The general case (any K, e.g. odd in_features): each element gathers its byte, nibble and scale."""
    byte = tl.load(w_ptr + (flat >> 1), mask=mask, other=0)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)
    scale = tl.load(scale_ptr + (flat >> BS_SHIFT), mask=mask, other=0.0)
    return tl.load(code_ptr + nibble) * scale


@triton.jit
def _dequantize_4bit_kernel(w_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, numel,
                            BS_SHIFT, NESTED: tl.constexpr, BS2: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK packed bytes per program, both elements of each (a block never splits a byte: blocksizes are
    even), with double quantization undone here rather than by a PyTorch pass per call."""
    byte = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    even = byte * 2
    mask = even < numel
    packed = tl.load(w_ptr + byte, mask=mask, other=0)
    scale = block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, even >> BS_SHIFT, mask, NESTED, BS2)
    hi, lo = decode_pair(packed, scale, code_ptr, out_ptr.dtype.element_ty)
    tl.store(out_ptr + even, hi, mask=mask)
    tl.store(out_ptr + even + 1, lo, mask=mask & (even + 1 < numel))


def weight_args(q: Quant4bit, nested: bool, absmax=None):
    """Pointer arguments (packed, code, absmax, code2, absmax2, offset) and flags (NESTED, BS_SHIFT, BS2) of a
    4-bit weight for the kernels: nested undoes double quantization in the kernel; otherwise `absmax` (default
    q.absmax) is fp32 and fills the unused pointer slots."""
    absmax = q.absmax if absmax is None else absmax
    ptrs = [q.packed, q.code, absmax] + ([q.code2, q.absmax2, q.offset] if nested else [absmax] * 3)
    return ptrs, dict(NESTED=nested, BS_SHIFT=q.blocksize.bit_length() - 1, BS2=q.blocksize2 if nested else 1)


def dequantize_4bit_triton(q: Quant4bit, dtype: torch.dtype, out: torch.Tensor = None) -> torch.Tensor:
    n, k = q.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=q.device)
    ptrs, flags = weight_args(q, q.code2 is not None)  # flat blocks: nested scales at any K
    block = 1024
    _dequantize_4bit_kernel[(triton.cdiv(triton.cdiv(n * k, 2), block),)](*ptrs, out, n * k, **flags, BLOCK=block)
    return out
