"""One QLoRA linear layer, forward and forward+backward, per provider (see lora_kernels/bench/providers.py).

smoke (CPU): 256x256, M=16, r in {0, 16}. full (GPU): 4096x4096 and 8192x8192, M in {1, 16, 8192},
r in {0, 16}: the points the issue's targets are stated at.
"""
import bitsandbytes.functional as bnbF
import pytest
import torch

from _lk_bench import DEVICE, SIZE, peak_memory_mb, record_row, run_benchmark
from lora_kernels.bench.providers import (Skip, build_case, make_inputs, make_lora, make_weight, quantize_nf4,
                                          ranks_for)

if SIZE == "full":
    SHAPES, MS, RANKS, ROUNDS, WARMUP = [(4096, 4096), (8192, 8192)], [1, 16, 8192], [0, 16], 50, 10
else:
    SHAPES, MS, RANKS, ROUNDS, WARMUP = [(256, 256)], [16], [0, 16], 3, 1
PROVIDERS = ["lora_kernels", "peft_bnb", "dequant_cublas", "cublas_bf16"]


def _cases():
    for mode in ("layer_fwd", "layer_fwd_bwd"):
        for n, k in SHAPES:
            for m in MS:
                for provider in PROVIDERS:
                    for r in ranks_for(provider, RANKS):
                        yield pytest.param(mode, provider, n, k, m, r, id=f"{mode}-{n}x{k}-M{m}-r{r}-{provider}")


def _reference(provider, n, k, r, x):
    """y in fp32 from the same seeds the providers use: the dense W for cublas_bf16, else its NF4 version."""
    w = make_weight(n, k, DEVICE, torch.bfloat16)
    if provider != "cublas_bf16":
        w = bnbF.dequantize_4bit(*quantize_nf4(w))
    y = x.float() @ w.float().t()
    if r:
        a, b = make_lora(n, k, r, DEVICE, torch.bfloat16)
        y += (16.0 / r) * (x.float() @ a.float().t()) @ b.float().t()
    return y


@pytest.mark.parametrize("mode,provider,n,k,m,r", list(_cases()))
def test_layer(benchmark, bench_env, mode, provider, n, k, m, r):
    x, dy = make_inputs(m, n, k, DEVICE, torch.bfloat16)
    if mode == "layer_fwd_bwd":
        x.requires_grad_(True)
    try:
        case = build_case(provider, mode, n, k, m, r, x=x, dy=dy, device=DEVICE)
    except Skip as exc:
        pytest.skip(str(exc))
    with torch.no_grad(), case.environment():
        y = case.raw()
    assert tuple(y.shape) == (m, n) and y.dtype == torch.bfloat16
    # every provider computes the same layer: compare with an fp32 computation of the same weights
    ref = _reference(provider, n, k, r, x.detach())
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"{case.label}: relative error {err:.2e} against fp32"
    with case.environment():
        peak = peak_memory_mb(case.fn, case.grad_to_none)
        times = run_benchmark(benchmark, case.fn, grad_to_none=case.grad_to_none, rounds=ROUNDS,
                              warmup_rounds=WARMUP)
    if mode == "layer_fwd_bwd":
        assert x.grad is None  # the harness resets gradients between rounds
    benchmark.extra_info.update(provider=case.label, peak_mem_mb=peak)
    record_row(mode, case.label, m, n, k, r, times, peak, bench_env)
