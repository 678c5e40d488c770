"""Triton kernels of the fused (Q)LoRA linear and their launchers. Math and autograd: fused_linear.py.

One GEMM kernel serves forward and backward: out[m, j] = sum_i act[m, i] * Wop[i, j], with Wop = W^T
(forward: i = k, j = n) or W (backward dx: i = n, j = k), read as dense or decoded from 4 bits in the main
loop, then the epilogue adds scaling * drop'(left @ right) and a bias before the single store.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .common import UPCAST_DOT, INTERPRETED, mma, philox_uniform, rank_block
from .dequant import decode_4bit, decode_4bit_rows

BASE_NONE, BASE_DENSE, BASE_4BIT = 0, 1, 2


@triton.jit
def _fused_linear_kernel(
    act_ptr, stride_am, stride_ai,  # activations [M, RED]: x (forward) or dy (backward)
    w_ptr, stride_wi, stride_wj,  # Wop[i, j] at i*stride_wi + j*stride_wj (dense: elements; 4-bit: flat index)
    code_ptr, scale_ptr, K_W,  # 4-bit only: 16-entry table, fp32 block scales, in_features of W
    left_ptr, stride_lm, stride_lr,  # LoRA left factor [M, R]: xa (forward) or dxa (backward)
    right_ptr, stride_rr, stride_rj,  # LoRA right factor [R, OUT]: B^T (forward) or A (backward)
    bias_ptr,
    out_ptr, stride_om, stride_oj,
    M, OUT, RED, R, M_BUCKET, DTYPE_BYTES,
    scaling, dropout_p, seed,
    BASE: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_IN: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, R_BLOCK: tl.constexpr,
    BS_SHIFT: tl.constexpr, PAIRED: tl.constexpr, W_TRANS: tl.constexpr, K_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each Wop column tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(OUT, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_j = offs_j < OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if BASE != 0:
        for i0 in range(0, RED, BLOCK_K):
            offs_i = i0 + tl.arange(0, BLOCK_K)
            mask_i = offs_i < RED
            a = tl.load(act_ptr + offs_m[:, None] * stride_am + offs_i[None, :] * stride_ai,
                        mask=mask_m[:, None] & mask_i[None, :], other=0.0)
            w_mask = mask_i[:, None] & mask_j[None, :]
            w_off = offs_i[:, None] * stride_wi + offs_j[None, :] * stride_wj
            if BASE == 2 and PAIRED:
                # K_W even: each byte holds two neighbours along W's rows; decode a [n, k] tile byte by byte.
                if W_TRANS:  # forward: Wop = W^T, tile rows are n (this program's outputs)
                    w = tl.trans(decode_4bit_rows(w_ptr, code_ptr, scale_ptr, offs_j, i0, K_W, OUT, a.dtype,
                                                  BLOCK_K, BS_SHIFT, K_ALIGNED))
                else:  # backward dx: Wop = W, tile rows are n (the reduction)
                    w = decode_4bit_rows(w_ptr, code_ptr, scale_ptr, offs_i, pid_n * BLOCK_N, K_W, RED, a.dtype,
                                         BLOCK_N, BS_SHIFT, K_ALIGNED)
            elif BASE == 2:
                w = decode_4bit(w_ptr, code_ptr, scale_ptr, w_off, w_mask, BS_SHIFT).to(a.dtype)
            else:
                w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
            acc = mma(a, w, acc, UPCAST)

    out_offs = offs_m[:, None] * stride_om + offs_j[None, :] * stride_oj
    out_mask = mask_m[:, None] & mask_j[None, :]
    if ACC_IN:
        acc += tl.load(out_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        if DROPOUT:
            # Backward only: drop' applies x's mask, whose (row, col) is this tile's (m, j = k), to the LoRA
            # term alone, so it needs an accumulator of its own (configs.py prunes tiles that would spill).
            low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, R_BLOCK):
                left, right = _lora_tiles(left_ptr, stride_lm, stride_lr, right_ptr, stride_rr, stride_rj,
                                          offs_m, offs_j, r0, M, OUT, R, R_BLOCK)
                low = mma(left, right, low, UPCAST)
            keep = philox_uniform(seed, offs_m[:, None], offs_j[None, :]) >= dropout_p
            acc += tl.where(keep, low * (scaling / (1.0 - dropout_p)), 0.0)
        else:
            # Scaling folded into the left operand: the LoRA term accumulates straight into acc, which
            # saves a second BLOCK_M x BLOCK_N fp32 accumulator (and the spills it caused at r = 64).
            for r0 in range(0, R, R_BLOCK):
                left, right = _lora_tiles(left_ptr, stride_lm, stride_lr, right_ptr, stride_rr, stride_rj,
                                          offs_m, offs_j, r0, M, OUT, R, R_BLOCK)
                left = (left.to(tl.float32) * scaling).to(left.dtype)
                acc = mma(left, right, acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _lora_tiles(left_ptr, stride_lm, stride_lr, right_ptr, stride_rr, stride_rj, offs_m, offs_j, r0, M, OUT, R,
                R_BLOCK: tl.constexpr):
    offs_r = r0 + tl.arange(0, R_BLOCK)
    mask_r = offs_r < R
    left = tl.load(left_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                   mask=(offs_m < M)[:, None] & mask_r[None, :], other=0.0)
    right = tl.load(right_ptr + offs_r[:, None] * stride_rr + offs_j[None, :] * stride_rj,
                    mask=mask_r[:, None] & (offs_j < OUT)[None, :], other=0.0)
    return left, right


_fused_linear_tuned = triton.autotune(
    configs=configs.gemm_configs(),
    # W_TRANS and PAIRED choose the candidates too (configs.config_allowed): a square forward and backward
    # must not share a tuning.
    key=["M_BUCKET", "OUT", "RED", "R", "DTYPE_BYTES", "BASE", "HAS_LORA", "HAS_BIAS", "DROPOUT", "W_TRANS",
         "PAIRED"],
    prune_configs_by={"early_config_prune": configs.prune_gemm_configs},
)(_fused_linear_kernel)


@triton.jit
def _lora_down_kernel(
    x_ptr, stride_xm, stride_xk,
    a_ptr, stride_ar, stride_ak,  # lora_A [R, K]
    out_ptr, stride_om, stride_or,  # xa [M, R]
    M, K, R, dropout_p, seed,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """xa = drop(x) @ A^T, the mask regenerated from (seed, row, col)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            keep = philox_uniform(seed, offs_m[:, None], offs_k[None, :]) >= dropout_p
            x = tl.where(keep, x, 0.0)
        a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                      mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = mma(x, a_t, acc, UPCAST)
    if DROPOUT:
        acc = acc / (1.0 - dropout_p)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_grad_a_kernel(
    dxa_ptr, stride_dm, stride_dr,  # dxa = dy @ B [M, R]
    x_ptr, stride_xm, stride_xk,
    out_ptr,  # fp32 partials [SPLIT, R, K], contiguous
    M, K, R, rows_per_split, dropout_p, seed,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial sums over one M-split of dxa^T @ drop(x) (dA without the scaling)."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    split = tl.program_id(2)
    mask_k = offs_k < K
    mask_r = offs_r < R
    acc = tl.zeros((R_BLOCK, BLOCK_K), dtype=tl.float32)
    m_start = split * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        d_t = tl.load(dxa_ptr + offs_m[None, :] * stride_dm + offs_r[:, None] * stride_dr,
                      mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            keep = philox_uniform(seed, offs_m[:, None], offs_k[None, :]) >= dropout_p
            x = tl.where(keep, x, 0.0)
        acc = mma(d_t, x, acc, UPCAST)
    if DROPOUT:
        acc = acc / (1.0 - dropout_p)
    tl.store(out_ptr + split * R * K + offs_r[:, None] * K + offs_k[None, :], acc,
             mask=mask_r[:, None] & mask_k[None, :])


# ----------------------------------------------------------------------------------------------- launchers

def launch_fused_linear(act, w, w_strides, base, out, *, code=None, scales=None, blocksize=0, k_w=0, w_trans=False,
                        left=None, right=None, right_strides=None, bias=None, acc_in=False,
                        scaling=1.0, dropout_p=0.0, seed=0):
    """out[M, OUT] (+)= act @ Wop + scaling * drop'(left @ right) + bias. `out` is written in place."""
    m, red = act.shape
    n_out = out.shape[1]
    has_lora = left is not None
    r = left.shape[1] if has_lora else 0
    if bias is not None:
        bias = bias.contiguous()  # the epilogue reads bias[j] at bias_ptr + j
    dummy = out
    args = [
        act, act.stride(0), act.stride(1),
        w if w is not None else dummy, w_strides[0], w_strides[1],
        code if code is not None else dummy, scales if scales is not None else dummy, k_w,
        left if has_lora else dummy, left.stride(0) if has_lora else 0, left.stride(1) if has_lora else 0,
        right if has_lora else dummy, right_strides[0] if has_lora else 0, right_strides[1] if has_lora else 0,
        bias if bias is not None else dummy,
        out, out.stride(0), out.stride(1),
        m, n_out, red, r, configs.m_bucket(m), act.element_size(),
        float(scaling), float(dropout_p), int(seed),
    ]
    flags = dict(BASE=base, HAS_LORA=has_lora, HAS_BIAS=bias is not None, ACC_IN=acc_in,
                 DROPOUT=dropout_p > 0.0, UPCAST=UPCAST_DOT, R_BLOCK=rank_block(r, configs.GEMM_RANK_BLOCK_MAX),
                 BS_SHIFT=blocksize.bit_length() - 1 if blocksize else 0, PAIRED=base == BASE_4BIT and k_w % 2 == 0,
                 W_TRANS=w_trans, K_ALIGNED=bool(blocksize) and k_w % blocksize == 0)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    if INTERPRETED:
        _fused_linear_kernel[grid](*args, **flags, **configs.INTERPRETER_GEMM)
    elif base == BASE_NONE:
        _fused_linear_kernel[grid](*args, **flags, **configs.epilogue_config(act.element_size()))
    else:
        _fused_linear_tuned[grid](*args, **flags)
    return out


def _rank_kernel_tiles(x):
    """(tiles, R_BLOCK cap) for x's dtype; the interpreter keeps its small tiles but the same cap."""
    tiles, cap = configs.lora_config(x.element_size())
    return (dict(configs.INTERPRETER_LORA) if INTERPRETED else tiles), cap


def launch_lora_down(x, a, dropout_p, seed):
    """xa [M, R] = drop(x) @ a^T in x's dtype (a already in x's dtype)."""
    m, k = x.shape
    r = a.shape[0]
    out = torch.empty((m, r), dtype=x.dtype, device=x.device)
    tiles, cap = _rank_kernel_tiles(x)
    rb = rank_block(r, cap)
    grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(r, rb))
    _lora_down_kernel[grid](x, x.stride(0), x.stride(1), a, a.stride(0), a.stride(1), out, out.stride(0),
                            out.stride(1), m, k, r, float(dropout_p), int(seed), DROPOUT=dropout_p > 0.0,
                            UPCAST=UPCAST_DOT, R_BLOCK=rb, **tiles)
    return out


def launch_lora_grad_a(dxa, x, dropout_p, seed):
    """fp32 [R, K] = dxa^T @ drop(x), split over M so that enough programs run."""
    m, k = x.shape
    r = dxa.shape[1]
    tiles, cap = _rank_kernel_tiles(x)
    rb = rank_block(r, cap)
    programs = triton.cdiv(k, tiles["BLOCK_K"]) * triton.cdiv(r, rb)
    split = 1 if INTERPRETED else max(1, min(triton.cdiv(m, 4 * tiles["BLOCK_M"]), triton.cdiv(264, programs)))
    rows = triton.cdiv(triton.cdiv(m, split), tiles["BLOCK_M"]) * tiles["BLOCK_M"]
    split = triton.cdiv(m, rows)
    partial = torch.empty((split, r, k), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(k, tiles["BLOCK_K"]), triton.cdiv(r, rb), split)
    _lora_grad_a_kernel[grid](dxa, dxa.stride(0), dxa.stride(1), x, x.stride(0), x.stride(1), partial,
                              m, k, r, rows, float(dropout_p), int(seed), DROPOUT=dropout_p > 0.0,
                              UPCAST=UPCAST_DOT, R_BLOCK=rb, **tiles)
    return partial.sum(0) if split > 1 else partial[0]
