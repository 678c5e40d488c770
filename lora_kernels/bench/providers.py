"""The layer benchmark providers: one QLoRA linear layer y = x W^T + s (x A^T) B^T computed different ways.

Every provider builds its own weights from the same seed (the same W, quantized the same way, the same
A and B), so that only its own tensors are alive while it is measured (peak memory means something), and
returns a `Case`: a no-argument callable plus the tensors whose .grad is reset between runs.

    lora_kernels     lk.qlora_linear on the packed NF4 weight; r=0 passes lora_A=lora_B=None. On CPU by default
                     (lora_kernels[patched]): the peft_bnb layer patched by patch_peft_model, which runs PEFT's
                     forward there, i.e. what a CPU user gets; LORA_KERNELS_PATCH_CPU=op measures the op instead
    peft_bnb         stock PEFT LoRA layer (peft.tuners.lora.bnb.Linear4bit) on bitsandbytes' Linear4bit,
                     built by get_peft_model as a user's model would be; r=0: the bare Linear4bit
    dequant_cublas   bnb.functional.dequantize_4bit -> torch.matmul (x W^T) -> torch.addmm(y, x A^T, B^T, alpha=s)
    cublas_bf16      F.linear(x, W) with W dense bf16, no LoRA, r=0 only: the GEMM the targets compare with
    lora_kernels_fused / lora_kernels_dequant
                     lk.qlora_linear with LORA_KERNELS_PATH forcing one of its two paths (CUDA, Triton only)

Adapters are in the compute dtype (bf16) for every provider, scaling = alpha / r, no dropout, no bias.
layer_fwd runs under torch.no_grad() with the layer in eval mode (so bitsandbytes takes its inference
paths, e.g. its GEMV kernel at M=1); layer_fwd_bwd runs forward + backward(dy) with gradients for x, A, B.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

from .presets import LAYER_PROVIDERS

BLOCKSIZE = 64  # what transformers' BitsAndBytesConfig uses


@contextlib.contextmanager
def temporary_env(env: dict):
    """os.environ with `env` set inside the block; the previous values (or their absence) come back after it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Skip(Exception):
    """The provider does not run this case; the message says why (printed, never silent)."""


@dataclass
class Case:
    fn: object
    label: str
    grad_to_none: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    raw: object = None  # the provider's y = layer(x), before the forward-only / forward+backward wrapper

    def environment(self):
        return temporary_env(self.env)


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _generator(device, seed):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def make_weight(n, k, device, dtype, seed=0):
    """W [n, k] ~ N(0, 1/k): the same for every provider of one shape."""
    import torch

    w = torch.randn(n, k, generator=_generator(device, seed), device=device, dtype=torch.float32)
    return w.div_(math.sqrt(k)).to(dtype)


def make_inputs(m, n, k, device, dtype, seed=1, with_dy=True):
    """x [m, k] and dy [m, n] (the upstream gradient for layer_fwd_bwd; None if not with_dy)."""
    import torch

    gen = _generator(device, seed)
    x = torch.randn(m, k, generator=gen, device=device, dtype=torch.float32).to(dtype)
    if not with_dy:
        return x, None
    dy = torch.randn(m, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return x, dy


def make_lora(n, k, r, device, dtype, seed=2):
    """A [r, k], B [n, r] in the compute dtype; B is small and non-zero, as after some training."""
    import torch

    gen = _generator(device, seed)
    a = torch.randn(r, k, generator=gen, device=device, dtype=torch.float32).div_(math.sqrt(k)).to(dtype)
    b = torch.randn(n, r, generator=gen, device=device, dtype=torch.float32).mul_(0.01).to(dtype)
    return a, b


def quantize_nf4(w):
    """(packed uint8 data, QuantState): NF4, blocksize 64, double quantization, as QLoRA loads a model."""
    import bitsandbytes.functional as bnbF
    import torch

    return bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4",
                              quant_storage=torch.uint8)


def linear4bit_from_packed(packed, state, k, n, compute_dtype):
    """A bitsandbytes Linear4bit holding an already-quantized weight (no dense copy is made)."""
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=compute_dtype, compress_statistics=True,
                              quant_type="nf4", quant_storage=torch.uint8, device="meta")
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                                     compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                     module=layer, bnb_quantized=True)
    return layer


def cpu_patch_default(device) -> bool:
    """Whether a patched PEFT layer on this device runs PEFT's own forward (CPU, LORA_KERNELS_BACKEND=auto,
    LORA_KERNELS_PATCH_CPU unset: patch.py's default there). The CPU rows then measure that, as a user gets it."""
    import torch

    from ..patch import _cpu_default

    return torch.device(device).type == "cpu" and _cpu_default(torch.empty(0))


def lora_kernels_label(device) -> str:
    """What lk.qlora_linear runs on this device: 'lora_kernels' (Triton on CUDA), or with a note."""
    import torch

    from ..backend import interpreting, use_triton

    try:
        triton = use_triton(torch.device(device))
    except RuntimeError:
        triton = False
    if not triton:
        return "lora_kernels[reference]"
    if torch.device(device).type != "cuda" and interpreting():
        return "lora_kernels[interpreter]"
    return "lora_kernels"


def _forward_only(fn):
    import torch

    def run():
        with torch.no_grad():
            fn()
    return run


def _forward_backward(fn, dy):
    def run():
        fn().backward(dy)
    return run


def build_case(provider, mode, n, k, m, r, *, x, dy, device, dtype="bf16", alpha=16.0) -> Case:
    """The callable that runs `provider` once for x [m, k] and the weight [n, k] at rank r."""
    if provider not in LAYER_PROVIDERS:
        raise ValueError(f"unknown layer provider {provider!r}")
    builder = _BUILDERS[provider]
    train = mode == "layer_fwd_bwd"
    tdtype = torch_dtype(dtype)
    scaling = alpha / r if r else 0.0
    case = builder(n=n, k=k, r=r, device=device, dtype=tdtype, scaling=scaling, alpha=alpha, train=train, x=x)
    case.raw = case.fn
    grads = [x] if train else []
    if train:
        grads += [t for t in case.grad_to_none if t is not x]
        case.grad_to_none = grads
        case.fn = _forward_backward(case.fn, dy)
    else:
        case.grad_to_none = []
        case.fn = _forward_only(case.fn)
    return case


def _adapters(n, k, r, device, dtype, train):
    if r == 0:
        return None, None, []
    a, b = make_lora(n, k, r, device, dtype)
    if train:
        a.requires_grad_(True)
        b.requires_grad_(True)
    return a, b, [a, b]


def _lora_kernels(*, n, k, r, device, dtype, scaling, alpha, train, x, path=None, **_):
    import lora_kernels as lk

    label = lora_kernels_label(device)
    env = {}
    if path is not None:
        if label != "lora_kernels":
            raise Skip(f"forces the Triton {path} path, but {label} runs on {device}: it would measure "
                       "the same thing as lora_kernels")
        env = {"LORA_KERNELS_PATH": path}
        label = f"lora_kernels_{path}"
    if path is None and cpu_patch_default(device):
        # What a CPU user gets: the PEFT layer, patched, which runs PEFT's forward there by default.
        layer, params, model = _peft_layer(n=n, k=k, r=r, device=device, dtype=dtype, alpha=alpha, train=train)
        if model is not None:
            lk.patch_peft_model(model)

        def patched():
            return layer(x)
        return Case(fn=patched, label="lora_kernels[patched]", grad_to_none=params, env=env)
    packed, state = quantize_nf4(make_weight(n, k, device, dtype))
    a, b, params = _adapters(n, k, r, device, dtype, train)

    def fn():
        return lk.qlora_linear(x, packed, state, a, b, scaling)
    return Case(fn=fn, label=label, grad_to_none=params, env=env)


def _peft_bnb(*, n, k, r, device, dtype, alpha, train, x, **_):
    layer, params, _ = _peft_layer(n=n, k=k, r=r, device=device, dtype=dtype, alpha=alpha, train=train)

    def fn():
        return layer(x)
    return Case(fn=fn, label="peft_bnb", grad_to_none=params)


def _peft_layer(*, n, k, r, device, dtype, alpha, train):
    """(layer, trainable params, PEFT model or None) of the stock PEFT Linear4bit layer at rank r (r = 0: the
    bare bitsandbytes layer)."""
    from torch import nn

    packed, state = quantize_nf4(make_weight(n, k, device, dtype))
    base = linear4bit_from_packed(packed, state, k, n, dtype)
    peft_model = None
    if r == 0:
        layer, params = base, []
    else:
        import warnings

        from peft import LoraConfig, get_peft_model

        class _OneLayer(nn.Module):
            def __init__(self, proj):
                super().__init__()
                self.proj = proj

            def forward(self, inp):
                return self.proj(inp)

        holder = _OneLayer(base)
        holder.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; PEFT reads it to wrap Linear4bit
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, bias="none",
                            init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(holder, config, autocast_adapter_dtype=False)
        layer = peft_model.base_model.model.proj
        if type(layer).__name__ != "Linear4bit" or not hasattr(layer, "lora_A"):
            raise Skip(f"PEFT did not wrap the bitsandbytes layer (got {type(layer).__name__})")
        a, b = make_lora(n, k, r, device, dtype)
        layer.lora_A["default"].weight.data = a
        layer.lora_B["default"].weight.data = b
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        for p in params:
            p.requires_grad_(train)
    layer.train(train)
    return layer, params, peft_model


def _dequant_cublas(*, n, k, r, device, dtype, scaling, train, x, **_):
    import bitsandbytes.functional as bnbF
    import torch

    packed, state = quantize_nf4(make_weight(n, k, device, dtype))
    a, b, params = _adapters(n, k, r, device, dtype, train)

    def fn():
        w = bnbF.dequantize_4bit(packed, state)
        y = torch.matmul(x, w.t())
        if a is None:
            return y
        return torch.addmm(y, torch.matmul(x, a.t()), b.t(), alpha=scaling)
    return Case(fn=fn, label="dequant_cublas", grad_to_none=params)


def _cublas_bf16(*, n, k, r, device, dtype, x, **_):
    import torch.nn.functional as F

    if r != 0:
        raise Skip("cublas_bf16 is the dense GEMM without LoRA: r=0 only")
    w = make_weight(n, k, device, dtype)

    def fn():
        return F.linear(x, w)
    return Case(fn=fn, label="cublas_bf16")


_BUILDERS = {
    "lora_kernels": _lora_kernels,
    "peft_bnb": _peft_bnb,
    "dequant_cublas": _dequant_cublas,
    "cublas_bf16": _cublas_bf16,
    "lora_kernels_fused": lambda **kw: _lora_kernels(path="fused", **kw),
    "lora_kernels_dequant": lambda **kw: _lora_kernels(path="dequant", **kw),
}


def ranks_for(provider, ranks):
    """The ranks a provider is measured at: cublas_bf16 only at r=0 (always, as the ceiling)."""
    if provider == "cublas_bf16":
        return (0,)
    return tuple(ranks)
