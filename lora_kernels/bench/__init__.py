"""`lora-kernels bench`: how fast a QLoRA layer and a training step are at each LoRA rank r, against what
people use today (stock PEFT + bitsandbytes, bitsandbytes dequantize + cuBLAS, the dense bf16 GEMM).

    from lora_kernels.bench import run_bench, BenchSpec
    rows = run_bench(BenchSpec.from_preset("quick", device="cuda"))

Modules: presets (shapes, sweeps), timing (L2-flushed CUDA events / CPU perf_counter), providers (what is
measured), train_step (a Llama step with AdamW), results (the CSV schema), report (speedup tables),
plot (PNG from a CSV), runner (the sweep), cli (argument parsing). See docs/bench.md.
Nothing heavy is imported here.
"""
from importlib import import_module

_LAZY = {
    "BenchSpec": "lora_kernels.bench.presets",
    "run_bench": "lora_kernels.bench.runner",
    "COLUMNS": "lora_kernels.bench.results",
    "read_csv": "lora_kernels.bench.results",
    "append_csv": "lora_kernels.bench.results",
    "speedup_table": "lora_kernels.bench.report",
    "plot_csv": "lora_kernels.bench.plot",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'lora_kernels.bench' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
