"""4-bit (NF4/FP4) -> dense dequantization, bit-identical to bitsandbytes on CUDA."""
import torch
import triton
import triton.language as tl

from ..nf4 import Quant4bit, block_scales


@triton.jit
def decode_4bit(w_ptr, code_ptr, scale_ptr, flat, mask, BS_SHIFT):
    """Values of the flat elements `flat` of a packed 4-bit weight, in fp32 (code[nibble] * block scale)."""
    byte = tl.load(w_ptr + (flat >> 1), mask=mask, other=0)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)
    scale = tl.load(scale_ptr + (flat >> BS_SHIFT), mask=mask, other=0.0)
    return tl.load(code_ptr + nibble) * scale


@triton.jit
def _dequantize_4bit_kernel(w_ptr, code_ptr, scale_ptr, out_ptr, numel, BS_SHIFT, BLOCK: tl.constexpr):
    flat = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < numel
    values = decode_4bit(w_ptr, code_ptr, scale_ptr, flat, mask, BS_SHIFT)
    tl.store(out_ptr + flat, values.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_4bit_triton(q: Quant4bit, dtype: torch.dtype, out: torch.Tensor = None) -> torch.Tensor:
    n, k = q.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=q.device)
    block = 1024
    _dequantize_4bit_kernel[(triton.cdiv(n * k, block),)](
        q.packed, q.code, block_scales(q).contiguous(), out, n * k, q.blocksize.bit_length() - 1, BLOCK=block)
    return out
