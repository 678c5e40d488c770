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


_BNB_TABLES = None  # {"nf4": code, "fp4": code} as bitsandbytes' CPU kernels hard-code them; {} without bitsandbytes


def _bnb_quant_type(q: Quant4bit):
    """'nf4'/'fp4' when bitsandbytes' native CPU decode computes exactly what dequantize_4bit_ref does for q,
    else None: its own table (its kernels hard-code it), a CPU weight, an even element count (it decodes odd
    counts in a slower Python path) and blocksize < 2048 (larger ones take another Python path on AVX512 CPUs)."""
    global _BNB_TABLES
    if q.packed.device.type != "cpu" or q.blocksize >= 2048 or (q.shape[0] * q.shape[1]) % 2:
        return None
    if _BNB_TABLES is None:
        try:
            import bitsandbytes.functional as bnb_f

            _BNB_TABLES = {t: bnb_f.get_4bit_type(t, device="cpu").float() for t in ("nf4", "fp4")}
            if not hasattr(torch.ops.bitsandbytes, "dequantize_4bit"):
                _BNB_TABLES = {}
        except (ImportError, AttributeError, RuntimeError):
            _BNB_TABLES = {}
    for name, table in _BNB_TABLES.items():
        if q.code.shape == table.shape and torch.equal(q.code, table):
            return name
    return None


def dequantize_4bit_cpu(q: Quant4bit, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_4bit_ref's result, from bitsandbytes' native CPU decode where that gives the same bits (about
    8x faster on one core): the CPU production path. It decodes the flat (N*K,) weight: its 2-D CPU decode is
    wrong when K % 16 == 0 and K % blocksize != 0 (bitsandbytes 0.50.2), its flat one is not. The scales are
    block_scales(q), which undoes double quantization exactly as bitsandbytes does."""
    quant_type = _bnb_quant_type(q)
    if quant_type is None:
        return dequantize_4bit_ref(q, dtype)
    n, k = q.shape
    packed = q.packed if q.packed.dtype == torch.uint8 else q.packed.view(torch.uint8)
    flat = torch.ops.bitsandbytes.dequantize_4bit(packed, block_scales(q), q.blocksize, quant_type, [n * k], dtype)
    return flat.view(n, k)


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


def torch_keep_mask(seed: int, m: int, k: int, p: float, device=None) -> torch.Tensor:
    """Boolean [m, k] mask of kept elements from torch's own generator seeded with `seed`: the CPU production
    mask (~35x faster than Philox in PyTorch). The same (seed, m, k) gives the same mask, so forward, backward
    and recomputation agree; it is not the kernels' mask (Philox is, and stays the oracle of the tests)."""
    gen = torch.Generator(device=device or "cpu").manual_seed(int(seed))
    return torch.rand((m, k), generator=gen, device=device) >= p


def cpu_mask_kind() -> str:
    """The mask the op's PyTorch path draws: "torch" (torch_keep_mask) under LORA_KERNELS_BACKEND=auto, the CPU
    production path; "philox" (the kernels' own mask, bit for bit) under LORA_KERNELS_BACKEND=reference, which is
    what the tests compare the kernels with."""
    from .backend import backend_setting

    return "philox" if backend_setting() == "reference" else "torch"


def apply_dropout(x2d: torch.Tensor, p: float, seed: Optional[int],
                  keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """drop(x) with the Philox mask of `seed`, or with `keep` when given (a mask computed once for several uses)."""
    if p == 0.0 or seed is None:
        return x2d
    if keep is None:
        keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, x2d.device)
    return torch.where(keep, x2d / (1.0 - p), torch.zeros((), dtype=x2d.dtype, device=x2d.device))


def _keep_mask(mask: str, seed: Optional[int], m: int, k: int, p: float, device) -> Optional[torch.Tensor]:
    if p == 0.0 or seed is None:
        return None
    if mask == "philox":
        return dropout_keep_mask(seed, m, k, p, device)
    if mask == "torch":
        return torch_keep_mask(seed, m, k, p, device)
    raise ValueError(f"mask must be 'philox' or 'torch', got {mask!r}")


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


def lora_linear_fwd_ref(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, mask="philox"):
    """Forward of the op in the input dtype, returning (y, xa) like the kernels (xa = drop(x) A^T).
    mask: "philox" (the kernels' mask, the oracle) or "torch" (torch_keep_mask, the CPU production path).
    drop(x) A^T is computed as (keep * x) A^T / (1 - p): the 1/(1-p) on the [M, r] product, not on x."""
    dtype = x2d.dtype
    y = torch.nn.functional.linear(x2d, weight.to(dtype), None if bias is None else bias.to(dtype))
    xa = None
    if lora_A is not None:
        keep = _keep_mask(mask, seed, x2d.shape[0], x2d.shape[1], dropout_p, x2d.device)
        xa = _masked(x2d, keep) @ lora_A.to(dtype).t()
        if keep is not None:
            xa = xa * (1.0 / (1.0 - dropout_p))
        y = y.addmm_(xa, lora_B.to(dtype).t(), alpha=scaling)
    return y, xa


def _masked(t, keep):
    return t if keep is None else torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


def lora_linear_bwd_ref(dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx=True,
                        need_lora=True, mask="philox"):
    """The op's backward written out (the kernels implement the same equations):

        dxa = dy B                      dx = dy W + s * drop'(dxa A)
        dA  = s * dxa^T drop(x)         dB = s * dy^T xa

    The dropout mask is generated once and serves both dx and dA; 1/(1-p) is folded into the scaling.
    """
    dtype = dy.dtype
    dx = dy @ weight.to(dtype) if need_dx else None
    if lora_A is None:
        return dx, None, None
    dxa = dy @ lora_B.to(dtype)
    keep = _keep_mask(mask, seed, x2d.shape[0], x2d.shape[1], dropout_p, x2d.device)
    s_drop = scaling / (1.0 - dropout_p) if keep is not None else scaling
    if need_dx:
        dx = dx.add_(_masked(dxa @ lora_A.to(dtype), keep), alpha=s_drop)
    if not need_lora:
        return dx, None, None
    d_a = (s_drop * (dxa.t() @ _masked(x2d, keep))).to(lora_A.dtype)
    d_b = (scaling * (dy.t() @ xa)).to(lora_B.dtype)
    return dx, d_a, d_b
