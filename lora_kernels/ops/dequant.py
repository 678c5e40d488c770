"""4-bit (NF4/FP4) decoding: jit helpers shared by the GEMM kernels, and dense dequantization (bit-identical
to bitsandbytes on CUDA)."""
import torch
import triton
import triton.language as tl

from ..nf4 import Quant4bit


@triton.jit
def block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask, NESTED: tl.constexpr,
                BS2: tl.constexpr):
    """fp32 absmax of the 4-bit blocks `block`. Double quantization is undone here, in the kernel, in
    bitsandbytes' order (code2[absmax] * absmax2, then + offset), so no PyTorch pass runs per call."""
    if NESTED:
        quant = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + quant) * tl.load(absmax2_ptr + block // BS2, mask=mask, other=0.0)
        return scale + tl.load(offset_ptr)
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


def dequantize_4bit_triton(q: Quant4bit, dtype: torch.dtype, out: torch.Tensor = None) -> torch.Tensor:
    n, k = q.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=q.device)
    nested = q.code2 is not None
    block = 1024
    _dequantize_4bit_kernel[(triton.cdiv(triton.cdiv(n * k, 2), block),)](
        q.packed, q.code, q.absmax, *([q.code2, q.absmax2, q.offset] if nested else [q.absmax] * 3), out, n * k,
        q.blocksize.bit_length() - 1, NESTED=nested, BS2=q.blocksize2 if nested else 1, BLOCK=block)
    return out
