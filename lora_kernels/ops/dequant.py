"""4-bit (NF4/FP4) -> dense dequantization, bit-identical to bitsandbytes on CUDA."""
import torch
import triton
import triton.language as tl

from ..nf4 import Quant4bit, block_scales


@triton.jit
def decode_4bit(w_ptr, code_ptr, scale_ptr, flat, mask, BS_SHIFT):
    """Values of the flat elements `flat` of a packed 4-bit weight, in fp32 (code[nibble] * block scale).
    The general case (any K): each element gathers its byte, nibble and scale."""
    byte = tl.load(w_ptr + (flat >> 1), mask=mask, other=0)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)
    scale = tl.load(scale_ptr + (flat >> BS_SHIFT), mask=mask, other=0.0)
    return tl.load(code_ptr + nibble) * scale


@triton.jit
def decode_4bit_rows(w_ptr, code_ptr, scale_ptr, rows, col0, K, N, dtype: tl.constexpr, COLS: tl.constexpr,
                     BS_SHIFT: tl.constexpr, K_ALIGNED: tl.constexpr):
    """W[rows, col0:col0+COLS] in `dtype` for an even K: each packed byte is loaded once and gives two
    neighbouring elements (high nibble first). col0 is a multiple of COLS; masked outside [0, N) x [0, K)."""
    half = tl.arange(0, COLS // 2)
    byte = rows[:, None] * (K // 2) + (col0 // 2 + half)[None, :]
    mask = (rows[:, None] < N) & ((col0 // 2 + half)[None, :] < K // 2)
    packed = tl.load(w_ptr + byte, mask=mask, other=0)
    if K_ALIGNED and COLS <= (1 << BS_SHIFT):
        # Rows start on block boundaries and the tile sits inside one block per row: one scale per row.
        scale = tl.load(scale_ptr + ((rows * K + col0) >> BS_SHIFT), mask=rows < N, other=0.0)[:, None]
    else:
        scale = tl.load(scale_ptr + (byte >> (BS_SHIFT - 1)), mask=mask, other=0.0)
    hi = (tl.load(code_ptr + (packed >> 4)) * scale).to(dtype)
    lo = (tl.load(code_ptr + (packed & 0xF)) * scale).to(dtype)
    return tl.reshape(tl.join(hi, lo), (rows.shape[0], COLS))


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
