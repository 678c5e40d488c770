"""The fused (Q)LoRA linear op: forward, backward, torch.library registration, public functions.

    y   = x W^T + bias + s * (drop(x) A^T) B^T              xa = drop(x) A^T            [M, r], saved
    dxa = dy B                                            dx = dy W + s * drop'(dxa A)
    dA  = s * dxa^T drop(x)                               dB = s * dy^T xa
    W (4-bit or dense) is frozen: decoded again in backward, never saved, never given a gradient.
    drop(x) = x * keep / (1 - p); keep is regenerated from (seed, row, col) wherever it is needed, so no
    mask is stored and recomputation under activation checkpointing (which restores the RNG the seed is
    drawn from) reproduces it.

The fused path: xa by a small rank kernel (a cuBLAS matmul without dropout), then one GEMM kernel that decodes
W in its main loop and adds the LoRA term and bias in the epilogue before the single store of y (dx likewise).
The dequantize path (configs.choose_path; the GPU default, measured faster): W decoded into a buffer by one
kernel, cuBLAS for the matmuls and for adding bias and LoRA term; our epilogue kernel only where dropout's mask
or a bias of another dtype needs it. The reference path (CPU default) runs the same equations in plain PyTorch
(lora_kernels.reference). Eager calls go through _LinearFunction, torch.compile through the torch.library ops.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import torch

from .. import reference
from ..errors import FallbackWarning, KernelBuildError
from ..backend import use_triton
from ..nf4 import Quant4bit, block_scales, read_quant_state
from . import configs

_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------------------ helpers

def _is_4bit(qints) -> bool:
    return qints[2] > 0  # qints = [N, K, blocksize, blocksize2]; blocksize 0 marks a dense weight


def _quant_from_parts(packed, qmeta, qints) -> Quant4bit:
    n, k, bs, bs2 = qints
    nested = len(qmeta) == 5
    return Quant4bit(packed=packed, code=qmeta[0], absmax=qmeta[1], blocksize=bs, shape=(n, k), dtype=None,
                     quant_type="", code2=qmeta[2] if nested else None, absmax2=qmeta[3] if nested else None,
                     offset=qmeta[4] if nested else None, blocksize2=bs2)


def _dense_weight(weight, qmeta, qints, dtype):
    """W as a dense [N, K] tensor in `dtype` (reference path, and the Triton dequant path)."""
    if not _is_4bit(qints):
        return weight
    q = _quant_from_parts(weight, qmeta, qints)
    if use_triton(weight.device):
        from .dequant import dequantize_4bit_triton

        return dequantize_4bit_triton(q, dtype)
    return reference.dequantize_4bit_cpu(q, dtype)  # dequantize_4bit_ref's bits, bitsandbytes' speed where it can


_NO_CONTEXT = contextlib.nullcontext()


def _no_autocast(device: torch.device):
    """The op computes in x's dtype, as its fake says, whatever autocast is on around it: left on, autocast
    would recast the reference's matmuls (and the Triton path's dy @ B) to its own dtype and mix dtypes.
    Off already (inference, most calls): no context to enter, ~2 us of host time less per call."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return _NO_CONTEXT


def _seed_of(seed: torch.Tensor, dropout_p: float) -> Optional[int]:
    return int(seed.item()) if dropout_p > 0.0 else None


# ------------------------------------------------------------------------------------------ triton path

def _check_int32_extent(m, n, k):
    # The kernels index activations with int32 offsets; larger tensors would wrap around silently.
    if m * max(n, k) >= 2**31:
        raise ValueError(f"{m} rows x {max(n, k)} features exceeds the Triton kernels' int32 indexing; "
                         "split the batch into smaller micro-batches")
    if n * k >= 2**31:
        raise ValueError(f"a {n}x{k} weight exceeds the Triton kernels' int32 indexing")


def _int32_span(t):
    """t, or a contiguous copy when its strides reach 2^31 elements or more (a view into a huge buffer):
    the kernels' int32 offsets would wrap there. A tensor of 2^31 elements or more is left to
    _check_int32_extent's error rather than copied first."""
    if t is None or t.numel() == 0 or t.numel() >= 2**31 or t.is_contiguous():  # contiguous: span = numel
        return t
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return t.contiguous() if span >= 2**31 else t


_UNBUILDABLE = set()  # (direction, device, dtype, N, K): fused launches that failed to compile in this process


def _fused_or_fallback(direction, act, n, k, launch) -> bool:
    """Runs a fused launch; False (the caller takes the dequantize + matmul path) when its kernel failed to
    compile here, now or earlier. The first failure of each (direction, dtype, shape) warns once, naming the
    Triton version, the kernel and the config: a training step does not die of a compiler bug unexplained."""
    key = (direction, str(act.device), act.dtype, n, k)
    if key in _UNBUILDABLE:
        return False
    try:
        launch()
        return True
    except KernelBuildError as exc:
        _UNBUILDABLE.add(key)
        warnings.warn(f"lora_kernels: {exc}. The {direction} of this {n}x{k} layer ({act.dtype}) now runs "
                      "dequantize + matmul instead of the fused kernel, in this process.", FallbackWarning,
                      stacklevel=2)
        return False


def _forward_triton(x, weight, qmeta, qints, lora_A, lora_B, bias, scaling, dropout_p, seed):
    from .fused_linear_kernels import (BASE_4BIT, BASE_DENSE, BASE_NONE, launch_fused_linear, launch_lora_down,
                                       launch_qlora_fwd)

    m = x.shape[0]
    n, k = qints[0], qints[1]
    _check_int32_extent(m, n, k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    xa = b = None
    if lora_A is not None:
        a = lora_A.to(x.dtype)
        # Without dropout xa is a plain skinny GEMM: one cuBLAS call costs less host time than the rank kernel.
        xa = launch_lora_down(x, a.contiguous(), dropout_p, seed) if dropout_p > 0.0 else torch.mm(x, a.t())
        b = lora_B.to(x.dtype)
    lora = dict(left=xa, right=b, right_strides=(b.stride(1), b.stride(0)) if b is not None else None,
                bias=bias, scaling=scaling)
    from .. import csrc  # M <= 16 on CUDA: the csrc/ library's kernel, when built (LORA_KERNELS_PATH=csrc forces it)
    setting = configs.path_setting()  # read once per call: the csrc dispatch and the path both need it
    path = configs.choose_path(m, setting)
    if csrc.wanted_for_forward(x, _is_4bit(qints), setting):
        return csrc.linear_decode_fwd(x, _quant_from_parts(weight, qmeta, qints), xa, b, bias, scaling, out=out), xa

    def fused():
        if _is_4bit(qints) and k % 2 == 0:
            launch_qlora_fwd(x, _quant_from_parts(weight, qmeta, qints), out, xa=xa, b=b, bias=bias, scaling=scaling)
        elif _is_4bit(qints):
            q = _quant_from_parts(weight, qmeta, qints)
            launch_fused_linear(x, q.packed, (1, k), BASE_4BIT, out, code=q.code, scales=block_scales(q).contiguous(),
                                blocksize=q.blocksize, **lora)
        else:
            launch_fused_linear(x, weight, (weight.stride(1), weight.stride(0)), BASE_DENSE, out, **lora)

    if path == "dequant" or not _fused_or_fallback("forward", x, n, k, fused):
        w = _dense_weight(weight, qmeta, qints, x.dtype)
        if bias is None or bias.dtype == x.dtype:  # cuBLAS adds bias and LoRA term: fewer launches than ours
            if bias is None:
                torch.mm(x, w.t(), out=out)
            else:
                torch.addmm(bias, x, w.t(), out=out)
            if xa is not None:
                out.addmm_(xa, b.t(), alpha=scaling)
        else:
            torch.mm(x, w.t(), out=out)
            launch_fused_linear(x, None, (0, 0), BASE_NONE, out, acc_in=True, **lora)
    return out, xa


def _backward_dx_triton(dy, weight, qmeta, qints, dxa, a, scaling, dropout_p, seed):
    from .fused_linear_kernels import BASE_4BIT, BASE_DENSE, BASE_NONE, launch_fused_linear, launch_qlora_dx

    m = dy.shape[0]
    n, k = qints[0], qints[1]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    lora = dict(left=dxa, right=a, right_strides=(a.stride(0), a.stride(1)) if a is not None else None,
                scaling=scaling, dropout_p=dropout_p if dxa is not None else 0.0, seed=seed)

    def fused():
        if _is_4bit(qints) and k % 2 == 0:
            launch_qlora_dx(dy, _quant_from_parts(weight, qmeta, qints), dx, dxa=dxa, a=a, scaling=scaling,
                            dropout_p=lora["dropout_p"], seed=seed)
        elif _is_4bit(qints):
            q = _quant_from_parts(weight, qmeta, qints)
            launch_fused_linear(dy, q.packed, (k, 1), BASE_4BIT, dx, code=q.code, scales=block_scales(q).contiguous(),
                                blocksize=q.blocksize, **lora)
        else:
            launch_fused_linear(dy, weight, (weight.stride(0), weight.stride(1)), BASE_DENSE, dx, **lora)

    if configs.choose_path(m) == "dequant" or not _fused_or_fallback("backward", dy, n, k, fused):
        torch.mm(dy, _dense_weight(weight, qmeta, qints, dy.dtype), out=dx)
        if dxa is not None and lora["dropout_p"] == 0.0:
            dx.addmm_(dxa, a, alpha=scaling)
        elif dxa is not None:  # the dropout mask of the LoRA term is drawn in the kernel
            launch_fused_linear(dy, None, (0, 0), BASE_NONE, dx, acc_in=True, **lora)
    return dx


# ------------------------------------------------------------------------------------------ custom ops

def _linear_fwd_impl(x, weight, qmeta, qints, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """(y, xa) for x [M, K]; xa is empty when there is no LoRA term. qints = [N, K, blocksize, blocksize2];
    a 4-bit weight has qmeta = its code, absmax[, code2, absmax2, offset]; a dense one blocksize 0, qmeta []."""
    with _no_autocast(x.device):
        seed_value = _seed_of(seed, dropout_p)
        if x.shape[0] == 0:
            n = qints[0]  # xa as the fake says: [0, r], or (0,) without LoRA
            return x.new_empty((0, n)), x.new_empty((0, lora_A.shape[0]) if lora_A is not None else (0,))
        if use_triton(x.device):
            y, xa = _forward_triton(x, weight, qmeta, qints, lora_A, lora_B, bias, scaling, dropout_p, seed_value or 0)
        else:
            w = _dense_weight(weight, qmeta, qints, x.dtype)
            y, xa = reference.lora_linear_fwd_ref(x, w, lora_A, lora_B, scaling, bias, dropout_p, seed_value,
                                                  mask=reference.cpu_mask_kind())
        return y, (xa if xa is not None else x.new_empty((0,)))


@torch.library.custom_op("lora_kernels::linear_fwd", mutates_args=())
def _linear_fwd(x: torch.Tensor, weight: torch.Tensor, qmeta: list[torch.Tensor], qints: list[int],
                lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                scaling: float, dropout_p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward as a torch.library op (what torch.compile traces); see _linear_fwd_impl."""
    return _linear_fwd_impl(x, weight, qmeta, qints, lora_A, lora_B, bias, scaling, dropout_p, seed)


@_linear_fwd.register_fake
def _(x, weight, qmeta, qints, lora_A, lora_B, bias, scaling, dropout_p, seed):
    n = qints[0]
    xa_shape = (x.shape[0], lora_A.shape[0]) if lora_A is not None else (0,)
    return x.new_empty((x.shape[0], n)), x.new_empty(xa_shape)


def _linear_bwd_impl(dy, x, weight, qmeta, qints, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx, need_lora):
    """(dx, dA, dB); a gradient that is not needed comes back empty. The LoRA term is part of dx whether or
    not A and B need gradients."""
    with _no_autocast(dy.device):
        seed_value = _seed_of(seed, dropout_p)
        has_lora = lora_A is not None
        dy = dy.contiguous()
        need_lora = need_lora and has_lora
        if dy.shape[0] == 0:
            dx = x.new_zeros(x.shape) if need_dx else x.new_empty((0,))
            if need_lora:
                return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
            return dx, x.new_empty((0,)), x.new_empty((0,))
        if use_triton(dy.device):
            a = lora_A.to(dy.dtype).contiguous() if has_lora else None
            dxa = dy @ lora_B.to(dy.dtype) if has_lora else None
            dx = (_backward_dx_triton(dy, weight, qmeta, qints, dxa, a, scaling, dropout_p, seed_value or 0)
                  if need_dx else None)
            d_a = d_b = None
            if need_lora:
                if dropout_p > 0.0:
                    from .fused_linear_kernels import launch_lora_grad_a

                    d_a = (launch_lora_grad_a(dxa, x, dropout_p, seed_value) * scaling).to(lora_A.dtype)
                else:
                    d_a = ((dxa.t() @ x) * scaling).to(lora_A.dtype)
                d_b = ((dy.t() @ xa) * scaling).to(lora_B.dtype)
        else:
            w = _dense_weight(weight, qmeta, qints, dy.dtype)
            dx, d_a, d_b = reference.lora_linear_bwd_ref(dy, x, w, lora_A, lora_B, xa, scaling, dropout_p, seed_value,
                                                         need_dx=need_dx, need_lora=need_lora,
                                                         mask=reference.cpu_mask_kind())
        # Custom-op outputs may not alias each other: a fresh empty tensor for each missing gradient.
        return tuple(g if g is not None else x.new_empty((0,)) for g in (dx, d_a, d_b))


@torch.library.custom_op("lora_kernels::linear_bwd", mutates_args=())
def _linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, qmeta: list[torch.Tensor],
                qints: list[int], lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor],
                xa: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor,
                need_dx: bool, need_lora: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward as a torch.library op (what torch.compile traces); see _linear_bwd_impl."""
    return _linear_bwd_impl(dy, x, weight, qmeta, qints, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx,
                            need_lora)


@_linear_bwd.register_fake
def _(dy, x, weight, qmeta, qints, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx, need_lora):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    if lora_A is None or not need_lora:
        return dx, x.new_empty((0,)), x.new_empty((0,))
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, qmeta, qints, lora_A, lora_B, bias, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed, *qmeta)
    ctx.qints, ctx.scaling, ctx.dropout_p = qints, scaling, dropout_p
    ctx.has_lora = lora_A is not None
    ctx.bias_dtype = bias.dtype if bias is not None and bias.requires_grad else None


def _grads(ctx, dy, bwd):
    """(dx, dA, dB, dbias, number of qmeta tensors) from the saved context; bwd: the op or its impl."""
    x, weight, lora_A, lora_B, xa, seed, *qmeta = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_lora = ctx.has_lora and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
    dx = d_a = d_b = d_bias = None
    if need_dx or need_lora:
        dx, d_a, d_b = bwd(dy, x, weight, qmeta, ctx.qints, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, seed,
                           need_dx, need_lora)
        if not need_dx:
            dx = None
        if not need_lora:
            d_a = d_b = None
    if ctx.bias_dtype is not None:
        d_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, d_a, d_b, d_bias, len(qmeta)


def _backward(ctx, dy, _dxa_unused):
    dx, d_a, d_b, d_bias, n_meta = _grads(ctx, dy, _linear_bwd)
    return dx, None, [None] * n_meta, None, d_a, d_b, d_bias, None, None, None


torch.library.register_autograd("lora_kernels::linear_fwd", _backward, setup_context=_setup_context)


class _LinearFunction(torch.autograd.Function):
    """The same forward and backward in eager mode, without the torch.library dispatch around them: on an H200
    host that dispatch and its autograd wrapper cost about 0.3 ms per call (benchmarks/results/
    h200-probe-2026-11-29.md), more than the kernels at most layer shapes. Arguments as the op's; y only."""

    @staticmethod
    def forward(ctx, x, weight, qmeta, qints, lora_A, lora_B, bias, scaling, dropout_p, seed):
        y, xa = _linear_fwd_impl(x, weight, qmeta, qints, lora_A, lora_B, bias, scaling, dropout_p, seed)
        _setup_context(ctx, (x, weight, qmeta, qints, lora_A, lora_B, bias, scaling, dropout_p, seed), (y, xa))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the op: no double backward through the kernels
    def backward(ctx, dy):
        dx, d_a, d_b, d_bias, _ = _grads(ctx, dy, _linear_bwd_impl)
        return dx, None, None, None, d_a, d_b, d_bias, None, None, None


# The eager path: False sends every call through the torch.library op (tests compare the two).
EAGER_FUNCTION = True
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)  # looked up once


def _eager(*tensors) -> bool:
    """Whether a call may take _LinearFunction: not under torch.compile or a functorch transform, and only plain
    tensors (a tensor subclass, e.g. a FakeTensor or DTensor, goes through the op and its registrations)."""
    if not EAGER_FUNCTION or torch.compiler.is_compiling() or _functorch_active():
        return False
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


# ------------------------------------------------------------------------------------------ public functions

def _check_common(x, n, k, lora_A, lora_B, bias, dropout_p, device, what):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported are bfloat16, float16 and float32")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but {what} has in_features {k} (weight {n}x{k})")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must both be tensors or both be None")
    tensors = {"x": x}
    if lora_A is not None:
        if lora_A.dim() != 2 or lora_A.shape[1] != k or lora_A.shape[0] < 1:
            raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}, expected (r, {k}) with r >= 1")
        r = lora_A.shape[0]
        if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
            raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}, expected ({n}, {r}) to match lora_A "
                             f"{tuple(lora_A.shape)} and out_features {n}")
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if t.dtype not in _COMPUTE_DTYPES:
                raise TypeError(f"{name} has dtype {t.dtype}; supported are bfloat16, float16 and float32")
        tensors.update(lora_A=lora_A, lora_B=lora_B)
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
        if bias.dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"bias has dtype {bias.dtype}; supported are bfloat16, float16 and float32")
        tensors["bias"] = bias
    bad = {name: str(t.device) for name, t in tensors.items() if t.device != device}
    if bad:
        raise ValueError(f"tensors on different devices: weight on {device}, " +
                         ", ".join(f"{name} on {d}" for name, d in bad.items()))
    if not 0.0 <= _number("dropout_p", dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _number(name, value):
    """A Python number or one-element tensor as a float; anything else is a TypeError naming the argument."""
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(value).__name__}"
                        + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else "")) from exc


_NO_SEED = torch.zeros((), dtype=torch.int64)  # read-only: the seed of every call without dropout


def _draw_seed(dropout_p, training, lora_A):
    """Seed from torch's CPU generator: activation checkpointing restores it, so recompute sees the same."""
    p = float(dropout_p) if (training and lora_A is not None) else 0.0
    seed = torch.randint(2, 2**31 - 1, (), dtype=torch.int64) if p > 0.0 else _NO_SEED
    return p, seed


def _run(x, k, n, weight, qmeta, qints, lora_A, lora_B, scaling, bias, dropout_p, training):
    scaling = _number("scaling", scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    p, seed = _draw_seed(dropout_p, training, lora_A)
    # the op saves this x for backward, so both directions read it safely; a 2-D x is its own [M, K] view
    x2 = _int32_span(x if x.dim() == 2 else x.reshape(-1, k))
    if _eager(x2, weight, lora_A, lora_B, bias):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, lora_A, lora_B, bias)):
            y = _LinearFunction.apply(x2, weight, qmeta, qints, lora_A, lora_B, bias, scaling, p, seed)
        else:  # nothing to differentiate (inference, generation): the Function's bookkeeping would be host time only
            y, _ = _linear_fwd_impl(x2, weight, qmeta, qints, lora_A, lora_B, bias, scaling, p, seed)
    else:
        y, _ = _linear_fwd(x2, weight, qmeta, qints, lora_A, lora_B, bias, scaling, p, seed)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def qlora_linear(x, weight, quant_state, lora_A, lora_B, scaling, *, bias=None, dropout_p=0.0, training=False):
    """y = x W^T + bias + scaling * (dropout(x) lora_A^T) lora_B^T with W stored in bitsandbytes 4-bit.

    weight: bitsandbytes Params4bit or its packed data (any quant_storage dtype); quant_state: its QuantState.
    x: [..., in_features] bf16/fp16/fp32; lora_A [r, in_features], lora_B [out_features, r] (fp32 or the
    compute dtype), or both None for the base layer alone. Gradients flow to x, lora_A, lora_B (and bias if it
    requires grad), never to W. Dropout runs only when training=True. It computes in x's dtype whether or not
    autocast is on: to compute in the autocast dtype, cast x to it first (as patch_peft_model's forward does).
    """
    q = read_quant_state(weight, quant_state)
    n, k = q.shape
    _check_common(x, n, k, lora_A, lora_B, bias, dropout_p, q.device, "the 4-bit weight")
    return _run(x, k, n, q.packed, q.meta_tensors(), [n, k, q.blocksize, q.blocksize2], lora_A, lora_B, scaling,
                bias, dropout_p, training)


def lora_linear(x, weight, lora_A, lora_B, scaling, *, bias=None, dropout_p=0.0, training=False):
    """The same fused op for a dense [out_features, in_features] base weight of x's dtype."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [out_features, in_features] tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    n, k = weight.shape
    _check_common(x, n, k, lora_A, lora_B, bias, dropout_p, weight.device, "weight")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight requires grad, but the fused op gives the base weight no gradient (LoRA keeps it "
                         "frozen): freeze it with weight.requires_grad_(False) or pass weight.detach()")
    return _run(x, k, n, _int32_span(weight.detach()), [], [n, k, 0, 0], lora_A, lora_B, scaling, bias, dropout_p,
                training)
