"""Patched vs stock step time on CPU under HF Trainer with gradient checkpointing (issue: "patching never
slows a model down"). Measured, never predicted.

    python benchmarks/cpu_trainer_ratio.py [--steps 30] [--dropouts 0.05,0] [--r 16]

A tiny Llama (built from a config, saved to a temporary folder, loaded in NF4 with double quantization and
bf16 compute, as QLoRA users load models), LoRA on all linear layers, two copies: stock PEFT and patched
with lora_kernels.patch_peft_model. Each copy gets its own transformers Trainer; the script then calls
`trainer.training_step` on the same batches, one step of each copy per round (order alternating), and prints
the median step time of each and their ratio. The optimizer step is not part of it (the same AdamW either way).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora_kernels as lk  # noqa: E402
from lora_kernels import demo  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trainer_for(model_dir, r, dropout, patch, out_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = demo.load_4bit(model_dir, compute_dtype=torch.bfloat16)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=dropout))
    if patch:
        lk.patch_peft_model(pm)
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=2, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=pm, args=args)
    trainer.current_gradient_accumulation_steps = 1  # set by train(), read by training_step
    inner = pm.base_model.model
    # Trainer.train() turns checkpointing on; training_step alone does not (transformers 5 renamed the API)
    if hasattr(inner, "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner.enable_input_require_grads()
    pm.train()
    return trainer, pm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dropouts", default="0.05,0")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread each keeps the comparison fair
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = demo.save_tiny_llama(Path(tmp) / "tiny", demo.llama_config(), seed=0)
        batches = [torch.randint(0, 256, (2, args.seq_len), generator=torch.Generator().manual_seed(i))
                   for i in range(args.warmup + args.steps)]
        for dropout in (float(d) for d in args.dropouts.split(",")):
            runs = {name: trainer_for(model_dir, args.r, dropout, name == "patched", Path(tmp) / name)
                    for name in ("stock", "patched")}
            times = {name: [] for name in runs}
            for i, ids in enumerate(batches):
                for name in (("stock", "patched") if i % 2 == 0 else ("patched", "stock")):
                    trainer, pm = runs[name]
                    inputs = {"input_ids": ids, "labels": ids}
                    t0 = time.perf_counter()
                    trainer.training_step(pm, inputs)
                    if i >= args.warmup:
                        times[name].append((time.perf_counter() - t0) * 1e3)
            med = {name: statistics.median(t) for name, t in times.items()}
            print(f"dropout {dropout}: r={args.r}, {args.steps} interleaved training_step calls each, gradient "
                  f"checkpointing on: stock {med['stock']:.1f} ms, patched {med['patched']:.1f} ms, "
                  f"patched/stock {med['patched'] / med['stock']:.3f}", flush=True)


if __name__ == "__main__":
    main()
