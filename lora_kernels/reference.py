"""Pure-PyTorch oracles for every kernel: the CPU backend and what the tests compare the kernels with.

`upcast` computes in that dtype (torch.float32 or torch.float64) instead of the input dtype; the tests'
error bounds compare the kernels' error against an upcast reference with PyTorch's own error in bf16/fp16.
"""
from __future__ import annotations

from typing import Optional

import torch

from .nf4 import Quant4bit, block_scales

_M32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al., 2011).
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10


def dequantize_4bit_ref(q: Quant4bit, dtype: torch.dtype) -> torch.Tensor:
    n, k = q.shape
    packed = q.packed
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: n * k]
    scales = block_scales(q).repeat_interleave(q.blocksize)[: n * k]
    values = q.code[nibbles.long()] * scales  # fp32, as bitsandbytes
    return values.to(dtype).reshape(n, k)


def _mul_lo_hi(a: torch.Tensor, b: int):
    """(a*b) mod 2^32 and (a*b) >> 32 for uint32 values held in int64, without int64 overflow."""
    hi_part = (a >> 16) * b  # both partial products stay below 2^48
    lo_part = (a & 0xFFFF) * b
    return (((hi_part & 0xFFFF) << 16) + lo_part) & _M32, (hi_part + (lo_part >> 16)) >> 16


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """The four output words of Philox4x32-10 for counters (c0..c3: int64 tensors of uint32 values, any
    broadcastable shapes; the words grow to the broadcast shape as the rounds mix them) and key (k0, k1)."""
    k0, k1 = int(k0) & _M32, int(k1) & _M32
    for _ in range(PHILOX_ROUNDS):
        lo_b, hi_b = _mul_lo_hi(c2, _ROUND_B)
        lo_a, hi_a = _mul_lo_hi(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


# Elements per chunk of philox_uniform on CPU: the ~200 int64 passes of ten rounds then run in cache. A GPU
# wants few large launches instead.
_PHILOX_CHUNK = 1 << 16
_PHILOX_CHUNK_GPU = 1 << 24


def philox_uniform(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) fp32 from Philox4x32-10 with counter (col, row, 0, 0) and key (seed, 0).

    Bit-identical to the kernels' `philox_uniform` (ops/common.py): the dropout mask depends only on
    the seed and the element's (row, col) in the 2-D view of x, so backward and recomputation regenerate it.
    """
    shape = torch.broadcast_shapes(rows.shape, cols.shape)
    rows = (rows.to(torch.int64) & _M32).reshape((1,) * (len(shape) - rows.dim()) + tuple(rows.shape))
    cols = (cols.to(torch.int64) & _M32).reshape((1,) * (len(shape) - cols.dim()) + tuple(cols.shape))
    out = torch.empty(shape, dtype=torch.float32, device=rows.device)
    if out.numel() == 0:
        return out
    if len(shape) == 0:
        rows, cols, out = rows.reshape(1), cols.reshape(1), out.reshape(1)
    inner = max(1, out[0].numel())
    step = max(1, (_PHILOX_CHUNK if out.device.type == "cpu" else _PHILOX_CHUNK_GPU) // inner)
    zero = torch.zeros((), dtype=torch.int64, device=rows.device)
    for i in range(0, out.shape[0], step):
        r = rows if rows.shape[0] == 1 else rows[i:i + step]
        c = cols if cols.shape[0] == 1 else cols[i:i + step]
        word = philox4x32_10(c, r, zero, zero, seed, 0)[0]
        out[i:i + step] = (word >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return out.reshape(shape)


def dropout_keep_mask(seed: int, m: int, k: int, p: float, device=None) -> torch.Tensor:
    """Boolean [m, k] mask of kept elements for dropout probability p."""
    rows = torch.arange(m, device=device).unsqueeze(1)
    cols = torch.arange(k, device=device).unsqueeze(0)
    return philox_uniform(seed, rows, cols) >= p


def apply_dropout(x2d: torch.Tensor, p: float, seed: Optional[int]) -> torch.Tensor:
    if p == 0.0 or seed is None:
        return x2d
    keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, x2d.device)
    return torch.where(keep, x2d / (1.0 - p), torch.zeros((), dtype=x2d.dtype, device=x2d.device))


def lora_linear_ref(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=None,
                    upcast: Optional[torch.dtype] = None):
    """y = x W^T + bias + scaling * (drop(x) A^T) B^T with a dense W; autograd-capable.

    Without upcast, everything runs in x's dtype, as a plain PyTorch bf16/fp16 program would.
    `seed=None` means no dropout (eval, or p = 0).
    """
    dtype = upcast or x.dtype
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(dtype)
    y = x2 @ weight.to(dtype).t()
    if lora_A is not None:
        xd = apply_dropout(x2, dropout_p, seed)
        xa = xd @ lora_A.to(dtype).t()
        y = y + scaling * (xa @ lora_B.to(dtype).t())
    if bias is not None:
        y = y + bias.to(dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_fwd_ref(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed):
    """Forward of the op in the input dtype, returning (y, xa) like the kernels (xa = drop(x) A^T)."""
    dtype = x2d.dtype
    y = x2d @ weight.to(dtype).t()
    xa = None
    if lora_A is not None:
        xa = apply_dropout(x2d, dropout_p, seed) @ lora_A.to(dtype).t()
        y = y + scaling * (xa @ lora_B.to(dtype).t())
    if bias is not None:
        y = y + bias.to(dtype)
    return y, xa


def lora_linear_bwd_ref(dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx=True,
                        need_lora=True):
    """The op's backward written out (the kernels implement the same equations):

        dxa = dy B                      dx = dy W + s * drop'(dxa A)
        dA  = s * dxa^T drop(x)         dB = s * dy^T xa
    """
    dtype = dy.dtype
    dx = dy @ weight.to(dtype) if need_dx else None
    if lora_A is None:
        return dx, None, None
    dxa = dy @ lora_B.to(dtype)
    if need_dx:
        dx = dx + scaling * apply_dropout(dxa @ lora_A.to(dtype), dropout_p, seed)
    if not need_lora:
        return dx, None, None
    d_a = (scaling * (dxa.t() @ apply_dropout(x2d, dropout_p, seed))).to(lora_A.dtype)
    d_b = (scaling * (dy.t() @ xa)).to(lora_B.dtype)
    return dx, d_a, d_b
