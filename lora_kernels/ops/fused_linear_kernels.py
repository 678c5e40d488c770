"""Triton kernels of the fused (Q)LoRA linear and their launchers. Math and autograd: fused_linear.py.

- `_qlora_fwd_kernel`: y = x W^T + s * xa B^T + bias with W decoded from 4 bits (even in_features) in the
  main loop. The GEMM runs transposed, y^T = W x^T, so the decoded W is the left (register) operand of the
  tensor-core op and W's rows fill its M side, for decode-sized M too.
- `_qlora_dx_kernel`: dx = dy W + s * drop'(dxa A), the same 4-bit decode.
- `_fused_linear_kernel`: the generic GEMM out[m, j] = sum_i act[m, i] * Wop[i, j] for a dense W (forward
  Wop = W^T, dx Wop = W), a 4-bit W of odd in_features (per-element decode), and the epilogue alone after
  cuBLAS (the dequant path).
A packed byte holds two neighbours along K (even element in the high nibble). The 4-bit kernels never
interleave the two decoded halves: the forward reduces over even and odd K separately (x split into its
even and odd columns), dx produces its even and odd output columns separately.
"""
import torch
import triton
import triton.language as tl

from ..errors import KernelBuildError
from . import configs
from .common import UPCAST_DOT, INTERPRETED, mma, philox_uniform, rank_block
from ..nf4 import block_scales
from .dequant import block_scale, code_regs, decode_4bit, decode_pair, decode_pair_regs, weight_args

BASE_NONE, BASE_DENSE, BASE_4BIT = 0, 1, 2


@triton.jit
def _fused_linear_kernel(
    act_ptr, stride_am, stride_ai,  # activations [M, RED]: x (forward) or dy (backward)
    w_ptr, stride_wi, stride_wj,  # Wop[i, j] at i*stride_wi + j*stride_wj (dense: elements; 4-bit: flat index)
    code_ptr, scale_ptr,  # 4-bit only: 16-entry table, fp32 block scales
    left_ptr, stride_lm, stride_lr,  # LoRA left factor [M, R]: xa (forward) or dxa (backward)
    right_ptr, stride_rr, stride_rj,  # LoRA right factor [R, OUT]: B^T (forward) or A (backward)
    bias_ptr,
    out_ptr, stride_om, stride_oj,
    M, OUT, RED, R, M_BUCKET, DTYPE_BYTES,
    scaling, dropout_p, seed,
    BASE: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_IN: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, R_BLOCK: tl.constexpr,
    BS_SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, OUT, BLOCK_M, BLOCK_N, GROUP_M)
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
            if BASE == 2:  # odd in_features: bytes straddle rows, decode per element
                w = decode_4bit(w_ptr, code_ptr, scale_ptr, w_off, w_mask, BS_SHIFT).to(a.dtype)
            else:
                w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
            acc = mma(a, w, acc, UPCAST)

    out_offs = offs_m[:, None] * stride_om + offs_j[None, :] * stride_oj
    out_mask = mask_m[:, None] & mask_j[None, :]
    if ACC_IN:
        acc += tl.load(out_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        acc = _add_lora(acc, left_ptr, stride_lm, stride_lr, right_ptr, stride_rr, stride_rj, offs_m, offs_j, M, OUT,
                        R, scaling, dropout_p, seed, DROPOUT, UPCAST, R_BLOCK)
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


@triton.jit
def _tile_ids(M, OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program: GROUP_M row tiles share each column tile (and the W tile
    behind it) while it is in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(OUT, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    return first_m + (pid % group_size), (pid % (GROUP_M * num_n)) // group_size


@triton.jit
def _add_lora(acc, left_ptr, stride_lm, stride_lr, right_ptr, stride_rr, stride_rj, rows, cols, ROWS, COLS, R,
              scaling, dropout_p, seed, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, R_BLOCK: tl.constexpr):
    """acc + scaling * drop'(left[rows, :] @ right[:, cols]), the rank walked in chunks of R_BLOCK."""
    if DROPOUT:
        # Backward only: drop' applies x's mask, whose (row, col) is this tile's (m, k), to the LoRA term
        # alone, so it needs an accumulator of its own (configs.py prunes tiles that would spill).
        low = tl.zeros(acc.shape, dtype=tl.float32)
        for r0 in range(0, R, R_BLOCK):
            left, right = _lora_tiles(left_ptr, stride_lm, stride_lr, right_ptr, stride_rr, stride_rj,
                                      rows, cols, r0, ROWS, COLS, R, R_BLOCK)
            low = mma(left, right, low, UPCAST)
        keep = philox_uniform(seed, rows[:, None], cols[None, :]) >= dropout_p
        acc += tl.where(keep, low * (scaling / (1.0 - dropout_p)), 0.0)
    else:
        # Scaling folded into the left operand: the LoRA term accumulates straight into acc, which saves a
        # second fp32 accumulator (and the spills it caused at r = 64).
        for r0 in range(0, R, R_BLOCK):
            left, right = _lora_tiles(left_ptr, stride_lm, stride_lr, right_ptr, stride_rr, stride_rj,
                                      rows, cols, r0, ROWS, COLS, R, R_BLOCK)
            left = (left.to(tl.float32) * scaling).to(left.dtype)
            acc = mma(left, right, acc, UPCAST)
    return acc


@triton.jit
def _qlora_fwd_kernel(
    x_ptr, stride_xm, stride_xk,  # x [M, K]; X_PAIRS: an int32 view of 16-bit x, one element per K pair
    packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,  # the 4-bit weight W [N, K]
    xa_ptr, stride_xam, stride_xar,  # xa = drop(x) A^T [M, R]
    b_ptr, stride_bn, stride_br,  # lora_B [N, R]
    bias_ptr, out_ptr, stride_om, stride_on,
    M, N, K, R, M_BUCKET, DTYPE_BYTES, scaling,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, NESTED: tl.constexpr, BS_SHIFT: tl.constexpr,
    BS2: tl.constexpr, ROW_SCALE: tl.constexpr, SUB_K: tl.constexpr, X_PAIRS: tl.constexpr,
    UPCAST: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    CODE_REGS: tl.constexpr = False,
):
    """y^T[n, m] = sum_k W[n, k] x[m, k] over K in SUB_K-wide steps, each the even-k and the odd-k half.
    ROW_SCALE (K a multiple of the blocksize, SUB_K at most one block): one scale per row and step."""
    dtype = out_ptr.dtype.element_ty
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    half_k = K // 2
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if CODE_REGS:
        codes = code_regs(code_ptr)
    for k0 in range(0, K, BLOCK_K):
        for s0 in tl.static_range(0, BLOCK_K, SUB_K):
            offs_p = (k0 + s0) // 2 + tl.arange(0, SUB_K // 2)  # K pairs: bytes of a W row
            mask_p = offs_p < half_k
            packed = tl.load(packed_ptr + offs_n[:, None] * half_k + offs_p[None, :],
                             mask=mask_n[:, None] & mask_p[None, :], other=0)
            if ROW_SCALE:
                block = (offs_n * K + k0 + s0) >> BS_SHIFT
                scale = block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block,
                                    mask_n & (offs_n * 0 + k0 + s0 < K), NESTED, BS2)[:, None]
            else:  # a block boundary may fall inside the step: a scale per byte (both nibbles share it)
                block = (offs_n[:, None] * K + 2 * offs_p[None, :]) >> BS_SHIFT
                scale = block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block,
                                    mask_n[:, None] & mask_p[None, :], NESTED, BS2)
            if CODE_REGS:
                w_even, w_odd = decode_pair_regs(packed, scale, codes, dtype)
            else:
                w_even, w_odd = decode_pair(packed, scale, code_ptr, dtype)
            x_mask = mask_p[:, None] & mask_m[None, :]
            if X_PAIRS:  # one 32-bit load per K pair, split into its two 16-bit halves (little-endian)
                pairs = tl.load(x_ptr + offs_p[:, None] * stride_xk + offs_m[None, :] * stride_xm, mask=x_mask,
                                other=0)
                x_even = (pairs & 0xFFFF).to(tl.uint16).to(dtype, bitcast=True)
                x_odd = ((pairs >> 16) & 0xFFFF).to(tl.uint16).to(dtype, bitcast=True)
            else:
                x_ptrs = x_ptr + (2 * offs_p)[:, None] * stride_xk + offs_m[None, :] * stride_xm
                x_even = tl.load(x_ptrs, mask=x_mask, other=0.0)
                x_odd = tl.load(x_ptrs + stride_xk, mask=x_mask, other=0.0)
            acc = mma(w_even, x_even, acc, UPCAST)
            acc = mma(w_odd, x_odd, acc, UPCAST)
    if HAS_LORA:  # y^T += scaling * B xa^T
        acc = _add_lora(acc, b_ptr, stride_bn, stride_br, xa_ptr, stride_xar, stride_xam, offs_n, offs_m, N, M, R,
                        scaling, 0.0, 0, False, UPCAST, R_BLOCK)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_m[None, :] * stride_om, acc.to(dtype),
             mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _qlora_dx_kernel(
    dy_ptr, stride_dm, stride_dn,  # dy [M, N]
    packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,  # the 4-bit weight W [N, K]
    dxa_ptr, stride_dxm, stride_dxr,  # dxa = dy B [M, R]
    a_ptr, stride_ar, stride_ak,  # lora_A [R, K]
    dx_ptr, stride_om, stride_ok,
    M, N, K, R, M_BUCKET, DTYPE_BYTES, scaling, dropout_p, seed,
    HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, NESTED: tl.constexpr, BS_SHIFT: tl.constexpr,
    BS2: tl.constexpr, ROW_SCALE: tl.constexpr, UPCAST: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx[m, k] = sum_n dy[m, n] W[n, k] for the BLOCK_N columns k of this tile, as its even and odd
    columns (one byte of W each) in two accumulators; BLOCK_K is the step over n.
    ROW_SCALE (K a multiple of the blocksize, BLOCK_N at most one block): one scale per row of W and step."""
    dtype = dx_ptr.dtype.element_ty
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_k * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # K pairs: byte columns of W
    mask_m = offs_m < M
    half_k = K // 2
    mask_p = offs_p < half_k
    acc_even = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        g = tl.load(dy_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        packed = tl.load(packed_ptr + offs_n[:, None] * half_k + offs_p[None, :],
                         mask=mask_n[:, None] & mask_p[None, :], other=0)
        if ROW_SCALE:
            block = (offs_n * K + pid_k * BLOCK_N) >> BS_SHIFT
            scale = block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask_n, NESTED, BS2)[:, None]
        else:
            block = (offs_n[:, None] * K + 2 * offs_p[None, :]) >> BS_SHIFT
            scale = block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block,
                                mask_n[:, None] & mask_p[None, :], NESTED, BS2)
        w_even, w_odd = decode_pair(packed, scale, code_ptr, dtype)
        acc_even = mma(g, w_even, acc_even, UPCAST)
        acc_odd = mma(g, w_odd, acc_odd, UPCAST)
    _dx_store(acc_even, 2 * offs_p, offs_m, dxa_ptr, stride_dxm, stride_dxr, a_ptr, stride_ar, stride_ak, dx_ptr,
              stride_om, stride_ok, M, K, R, scaling, dropout_p, seed, HAS_LORA, DROPOUT, UPCAST, R_BLOCK)
    _dx_store(acc_odd, 2 * offs_p + 1, offs_m, dxa_ptr, stride_dxm, stride_dxr, a_ptr, stride_ar, stride_ak, dx_ptr,
              stride_om, stride_ok, M, K, R, scaling, dropout_p, seed, HAS_LORA, DROPOUT, UPCAST, R_BLOCK)


@triton.jit
def _dx_store(acc, offs_k, offs_m, dxa_ptr, stride_dxm, stride_dxr, a_ptr, stride_ar, stride_ak, dx_ptr, stride_om,
              stride_ok, M, K, R, scaling, dropout_p, seed, HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr,
              UPCAST: tl.constexpr, R_BLOCK: tl.constexpr):
    """dx[:, offs_k] = acc + scaling * drop'(dxa A[:, offs_k]), x's mask at (m, k)."""
    if HAS_LORA:
        acc = _add_lora(acc, dxa_ptr, stride_dxm, stride_dxr, a_ptr, stride_ar, stride_ak, offs_m, offs_k, M, K, R,
                        scaling, dropout_p, seed, DROPOUT, UPCAST, R_BLOCK)
    tl.store(dx_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


_GEMM_KEY = ["M_BUCKET", "DTYPE_BYTES", "R", "HAS_LORA"]  # + the extents and flags of each kernel
_LAST_CONFIG = {}  # "current": the config the autotuner launched (or compiled) last


def _note_config(name):
    _LAST_CONFIG["current"] = name

_fused_linear_tuned = triton.autotune(
    configs=configs.gemm_configs(note=_note_config), key=_GEMM_KEY + ["OUT", "RED", "BASE", "HAS_BIAS", "DROPOUT"],
    prune_configs_by={"early_config_prune": configs.prune_for("generic")},
)(_fused_linear_kernel)
# The forward's K step: at most one scale block (one scale per row each); without ROW_SCALE a scale per byte
# is live beside the decoded halves, so steps of 32 (64-wide ones spilled: tests/test_gpu_compile.py).
UNALIGNED_SUB_K = 32
_qlora_fwd = triton.heuristics({"SUB_K": lambda a: min(a["BLOCK_K"], 1 << a["BS_SHIFT"]) if a["ROW_SCALE"]
                                else min(a["BLOCK_K"], UNALIGNED_SUB_K)})(_qlora_fwd_kernel)
_qlora_fwd_tuned = triton.autotune(
    configs=configs.gemm_configs(note=_note_config), key=_GEMM_KEY + ["N", "K", "HAS_BIAS", "NESTED", "ROW_SCALE"],
    prune_configs_by={"early_config_prune": configs.prune_for("qlora_fwd")},
)(_qlora_fwd)
# dx's scales: one per row of W and step when its BLOCK_N output columns sit inside one block.
_qlora_dx = triton.heuristics({"ROW_SCALE": lambda a: a["K"] % (1 << a["BS_SHIFT"]) == 0
                               and a["BLOCK_N"] <= (1 << a["BS_SHIFT"])})(_qlora_dx_kernel)
_qlora_dx_tuned = triton.autotune(
    configs=configs.gemm_configs(note=_note_config), key=_GEMM_KEY + ["N", "K", "DROPOUT", "NESTED"],
    prune_configs_by={"early_config_prune": configs.prune_for("qlora_dx")},
)(_qlora_dx)


@triton.jit
def _lora_down_kernel(
    x_ptr, stride_xm, stride_xk,
    a_ptr, stride_ar, stride_ak,  # lora_A [R, K]
    out_ptr, stride_os, stride_om, stride_or,  # xa [M, R], or fp32 partial sums [SPLIT, M, R]
    M, K, R, k_per_split, dropout_p, seed,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """xa = drop(x) @ A^T over this program's K range (program_id 2 of the splits), the mask regenerated
    from (seed, row, col)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    split = tl.program_id(2)
    mask_m = offs_m < M
    mask_r = offs_r < R
    k_start = split * k_per_split
    k_end = min(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
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
    tl.store(out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or,
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

def build_error(exc) -> bool:
    """Whether `exc` is Triton failing to compile a kernel (as opposed to a bad argument or a CUDA error)."""
    from triton.compiler.errors import CompilationError

    if isinstance(exc, CompilationError) or type(exc).__name__ in ("PTXASError", "OutOfResources"):
        return True
    return isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("PassManager::run failed", "Pipeline failed", "LLVM ERROR", "Illegal shared layout"))


def _launch_gemm(kernel, tuned, grid, args, flags, config):
    """Run a GEMM: the autotuned kernel on a GPU; under the interpreter, `config` (a GPU tile, as the tests
    pass it) or the small interpreter tile. config: dict of BLOCK_M/BLOCK_N/BLOCK_K/GROUP_M. A compile error
    is raised as KernelBuildError naming the kernel, the config and the Triton version."""
    _LAST_CONFIG.pop("current", None)
    tile = config or (configs.INTERPRETER_GEMM if INTERPRETED else None)
    try:
        if tile is not None:
            kernel[grid](*args, **flags, **tile)
        else:
            tuned[grid](*args, **flags)
    except Exception as exc:
        if not build_error(exc):
            raise
        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        where = (f"{tile['BLOCK_M']}x{tile['BLOCK_N']}x{tile['BLOCK_K']}" if tile is not None
                 else _LAST_CONFIG.get("current", "unknown (autotuning)"))
        raise KernelBuildError(name, where, triton.__version__, exc) from exc


def _grid(m, n_out):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)


def launch_fused_linear(act, w, w_strides, base, out, *, code=None, scales=None, blocksize=0,
                        left=None, right=None, right_strides=None, bias=None, acc_in=False,
                        scaling=1.0, dropout_p=0.0, seed=0, config=None):
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
        code if code is not None else dummy, scales if scales is not None else dummy,
        left if has_lora else dummy, left.stride(0) if has_lora else 0, left.stride(1) if has_lora else 0,
        right if has_lora else dummy, right_strides[0] if has_lora else 0, right_strides[1] if has_lora else 0,
        bias if bias is not None else dummy,
        out, out.stride(0), out.stride(1),
        m, n_out, red, r, configs.m_bucket(m), act.element_size(),
        float(scaling), float(dropout_p), int(seed),
    ]
    flags = dict(BASE=base, HAS_LORA=has_lora, HAS_BIAS=bias is not None, ACC_IN=acc_in,
                 DROPOUT=dropout_p > 0.0, UPCAST=UPCAST_DOT, R_BLOCK=rank_block(r, configs.GEMM_RANK_BLOCK_MAX),
                 BS_SHIFT=blocksize.bit_length() - 1 if blocksize else 0)
    if base == BASE_NONE and not INTERPRETED:
        _fused_linear_kernel[_grid(m, n_out)](*args, **flags, **configs.epilogue_config(act.element_size()))
    else:
        _launch_gemm(_fused_linear_kernel, _fused_linear_tuned, _grid(m, n_out), args, flags, config)
    return out


def _weight_args(q):
    """Pointer arguments of a 4-bit weight (packed, code, absmax, code2, absmax2, offset) and its flags. With
    in_features a multiple of the blocksize the kernels undo double quantization per (row, block); otherwise
    they gather a scale per byte, and one fp32 gather (block_scales, a PyTorch pass) spills less than three."""
    nested = q.code2 is not None and q.shape[1] % q.blocksize == 0
    return weight_args(q, nested, q.absmax if nested or q.code2 is None else block_scales(q).contiguous())


def _pair_view(x):
    """16-bit x as int32 [M, K/2] (one element per K pair), through a contiguous copy when x's layout does not
    allow the view; None for other dtypes, or a view whose copy is still misaligned (then x is read strided)."""
    if x.element_size() != 2:
        return None
    for t in (x, x.contiguous()):
        if t.stride(1) == 1 and t.stride(0) % 2 == 0 and t.storage_offset() % 2 == 0:
            return t.view(torch.int32)
    return None


def launch_qlora_fwd(x, q, out, *, xa=None, b=None, bias=None, scaling=1.0, config=None):
    """out [M, N] = x @ W^T + scaling * xa @ b^T + bias for a 4-bit W of even in_features."""
    m, k = x.shape
    n = q.shape[0]
    if bias is not None:
        bias = bias.contiguous()
    pairs = _pair_view(x)
    has_lora = xa is not None
    r = xa.shape[1] if has_lora else 0
    ptrs, wflags = _weight_args(q)
    dummy = out
    xk = (pairs.stride(0), pairs.stride(1)) if pairs is not None else (x.stride(0), x.stride(1))
    args = [pairs if pairs is not None else x, *xk, *ptrs,
            xa if has_lora else dummy, xa.stride(0) if has_lora else 0, xa.stride(1) if has_lora else 0,
            b if has_lora else dummy, b.stride(0) if has_lora else 0, b.stride(1) if has_lora else 0,
            bias if bias is not None else dummy, out, out.stride(0), out.stride(1),
            m, n, k, r, configs.m_bucket(m), x.element_size(), float(scaling)]
    flags = dict(HAS_LORA=has_lora, HAS_BIAS=bias is not None, ROW_SCALE=k % q.blocksize == 0,
                 X_PAIRS=pairs is not None, UPCAST=UPCAST_DOT, R_BLOCK=rank_block(r, configs.GEMM_RANK_BLOCK_MAX),
                 CODE_REGS=configs.CODE_REGS and x.element_size() == 2, **wflags)
    _launch_gemm(_qlora_fwd, _qlora_fwd_tuned, _grid(m, n), args, flags, config)
    return out


def launch_qlora_dx(dy, q, dx, *, dxa=None, a=None, scaling=1.0, dropout_p=0.0, seed=0, config=None):
    """dx [M, K] = dy @ W + scaling * drop'(dxa @ a) for a 4-bit W of even in_features."""
    m, n = dy.shape
    k = q.shape[1]
    has_lora = dxa is not None
    r = dxa.shape[1] if has_lora else 0
    ptrs, wflags = _weight_args(q)
    dummy = dx
    args = [dy, dy.stride(0), dy.stride(1), *ptrs,
            dxa if has_lora else dummy, dxa.stride(0) if has_lora else 0, dxa.stride(1) if has_lora else 0,
            a if has_lora else dummy, a.stride(0) if has_lora else 0, a.stride(1) if has_lora else 0,
            dx, dx.stride(0), dx.stride(1),
            m, n, k, r, configs.m_bucket(m), dy.element_size(), float(scaling), float(dropout_p), int(seed)]
    flags = dict(HAS_LORA=has_lora, DROPOUT=has_lora and dropout_p > 0.0, UPCAST=UPCAST_DOT,
                 R_BLOCK=rank_block(r, configs.GEMM_RANK_BLOCK_MAX), **wflags)
    _launch_gemm(_qlora_dx, _qlora_dx_tuned, _grid(m, k), args, flags, config)
    return dx


def _rank_kernel_tiles(x):
    """(tiles, R_BLOCK cap) for x's dtype; the interpreter keeps its small tiles but the same cap."""
    tiles, cap = configs.lora_config(x.element_size(), configs.device_arch(x))
    return (dict(configs.INTERPRETER_LORA) if INTERPRETED else tiles), cap


# Below this many programs over (M, r) tiles, the down-projection splits K too: at decode sizes one program
# would otherwise stream all of A alone (r x K) while the other SMs idle.
LORA_DOWN_MIN_PROGRAMS = 132


def launch_lora_down(x, a, dropout_p, seed, *, split=None):
    """xa [M, R] = drop(x) @ a^T in x's dtype (a already in x's dtype). Few (M, r) tiles: K split over programs
    into fp32 partial sums, added after. `split` overrides the choice (tests)."""
    m, k = x.shape
    r = a.shape[0]
    tiles, cap = _rank_kernel_tiles(x)
    rb = rank_block(r, cap)
    programs = triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(r, rb)
    if split is None:
        split = min(triton.cdiv(k, tiles["BLOCK_K"]), max(1, LORA_DOWN_MIN_PROGRAMS // programs))
    k_per_split = triton.cdiv(triton.cdiv(k, split), tiles["BLOCK_K"]) * tiles["BLOCK_K"]
    split = triton.cdiv(k, k_per_split)
    out = torch.empty((split, m, r) if split > 1 else (1, m, r), dtype=torch.float32 if split > 1 else x.dtype,
                      device=x.device)
    grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(r, rb), split)
    _lora_down_kernel[grid](x, x.stride(0), x.stride(1), a, a.stride(0), a.stride(1), out, out.stride(0),
                            out.stride(1), out.stride(2), m, k, r, k_per_split, float(dropout_p), int(seed),
                            DROPOUT=dropout_p > 0.0, UPCAST=UPCAST_DOT, R_BLOCK=rb, **tiles)
    return out.sum(0).to(x.dtype) if split > 1 else out[0]


def launch_lora_grad_a(dxa, x, dropout_p, seed, *, tiles=None, split=None):
    """fp32 [R, K] = dxa^T @ drop(x), split over M so that enough programs run; partial sums are added after.
    tiles / split override the launch (the tests run the GPU's own tiles and splits through the interpreter)."""
    m, k = x.shape
    r = dxa.shape[1]
    default_tiles, cap = _rank_kernel_tiles(x)
    tiles = dict(tiles or default_tiles)
    rb = rank_block(r, cap)
    if split is None:
        programs = triton.cdiv(k, tiles["BLOCK_K"]) * triton.cdiv(r, rb)
        split = max(1, min(triton.cdiv(m, 4 * tiles["BLOCK_M"]), triton.cdiv(264, programs)))
    rows = triton.cdiv(triton.cdiv(m, split), tiles["BLOCK_M"]) * tiles["BLOCK_M"]
    split = triton.cdiv(m, rows)
    partial = torch.empty((split, r, k), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(k, tiles["BLOCK_K"]), triton.cdiv(r, rb), split)
    _lora_grad_a_kernel[grid](dxa, dxa.stride(0), dxa.stride(1), x, x.stride(0), x.stride(1), partial,
                              m, k, r, rows, float(dropout_p), int(seed), DROPOUT=dropout_p > 0.0,
                              UPCAST=UPCAST_DOT, R_BLOCK=rb, **tiles)
    return partial.sum(0) if split > 1 else partial[0]
