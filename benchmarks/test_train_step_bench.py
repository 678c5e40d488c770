"""One training step (forward, causal-LM loss, backward, AdamW step) of a Llama-architecture model built from a
config with random weights (lora_kernels/bench/train_step.py): stock PEFT + bitsandbytes NF4, the same model
patched with lora_kernels, and a bf16 LoRA baseline.

smoke (CPU): the tiny config, 1 layer, seq 64, r=8. full (GPU): Llama-3-8B layer shapes, 2 layers, seq 2048,
r in {8, 16, 64}.
"""
import pytest

from _lk_bench import DEVICE, SIZE, record_row, run_benchmark
from lora_kernels.bench import train_step
from lora_kernels.bench.presets import BenchSpec
from lora_kernels.bench.providers import Skip

if SIZE == "full":
    SPEC = BenchSpec.from_preset("quick", DEVICE).replace(layers=2)
    RANKS, ROUNDS, WARMUP = [8, 16, 64], 8, 2
else:
    SPEC = BenchSpec.from_preset("smoke", DEVICE).replace(layers=1, seq_len=64)
    RANKS, ROUNDS, WARMUP = [8], 2, 1


@pytest.mark.parametrize("provider", ["peft_bnb", "lora_kernels", "peft_bf16"])
@pytest.mark.parametrize("r", RANKS)
def test_train_step(benchmark, bench_env, provider, r):
    import torch

    try:
        step, label, tokens, keep = train_step.build(SPEC, provider, r)
    except Skip as exc:
        pytest.skip(str(exc))
    model = keep[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before, "no trainable LoRA parameters"
    peak = None
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = run_benchmark(benchmark, step, rounds=ROUNDS, warmup_rounds=WARMUP, flush=False)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert changed, "the optimizer step changed no LoRA parameter"
    benchmark.extra_info.update(provider=label, tokens_per_step=tokens, peak_mem_mb=peak)
    record_row("train_step", label, tokens, train_step.model_config(SPEC).hidden_size, SPEC.layers, r, times, peak,
               bench_env)
