"""QLoRA fine-tuning with lora-kernels: the usual transformers + bitsandbytes + PEFT script, plus one line.

    python examples/train_qlora.py                          # builds a small Llama, trains on a built-in corpus
    python examples/train_qlora.py --model ./my-llama --data notes.jsonl --steps 200 --output ./adapter
    torchrun --nproc-per-node 2 examples/train_qlora.py      # DDP: gloo on CPU, NCCL on GPUs

Runs on CPU (lora-kernels' reference backend) and on CUDA (the Triton kernels). Nothing is downloaded: --model is
a local directory (config + safetensors, and a tokenizer if it has one; without one, text is tokenized as raw
bytes, which needs a vocabulary of at least 256). --data is a local .txt file, or .jsonl with a "text" field.
--no-patch runs stock PEFT, for comparing loss curves and throughput.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STORAGE = {"uint8": torch.uint8, "bf16": torch.bfloat16}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model directory (default: build a small Llama-architecture model)")
    p.add_argument("--data", help="local .txt or .jsonl file (default: a small built-in corpus)")
    p.add_argument("--output", default="qlora-adapter", help="where the adapter is saved (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step on each process")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated module names")
    p.add_argument("--compute-dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--quant-storage", choices=sorted(STORAGE), default="uint8",
                   help="bnb_4bit_quant_storage; bf16 is the layout FSDP needs")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-patch", action="store_true", help="stock PEFT, without lora_kernels")
    p.add_argument("--backend", choices=["auto", "triton", "reference"],
                   help="sets LORA_KERNELS_BACKEND (default: auto, Triton on CUDA, reference on CPU)")
    p.add_argument("--hidden-size", type=int, default=128, help="size of the model built without --model")
    p.add_argument("--layers", type=int, default=2, help="layers of the model built without --model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--grads-out", help=argparse.SUPPRESS)  # tests: save the first step's LoRA gradients here
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ distributed

def distributed_env():
    """(rank, world_size, device) from torchrun's environment: one process per GPU, or per CPU slot."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return rank, world, device


def init_distributed(device):
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


# ------------------------------------------------------------------------------------------ data

def read_text(path):
    if path is None:
        from lora_kernels.demo import BUILTIN_CORPUS

        return BUILTIN_CORPUS
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise SystemExit(f"{path}:{line_no}: expected a JSON object with a string field 'text'")
            texts.append(text)
        return "\n".join(texts)
    return path.read_text(encoding="utf-8")


def make_tokenizer(model_dir, vocab_size):
    """The model's own tokenizer if the directory has one, else raw bytes."""
    if model_dir is not None and any((Path(model_dir) / f).exists()
                                     for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return lambda text: tok(text, add_special_tokens=False)["input_ids"], "the model's tokenizer"
    if vocab_size < 256:
        raise SystemExit(f"the model has no tokenizer and a vocabulary of {vocab_size} < 256 byte tokens")
    from lora_kernels.demo import encode_bytes

    return encode_bytes, "raw bytes"


def batches(ids, seq_len, global_batch, steps, seed):
    """Random windows of the token stream; every process draws the same global batch."""
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise SystemExit(f"the text has {ids.numel()} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len + 1, (global_batch,), generator=gen)
        yield torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


# ------------------------------------------------------------------------------------------ model

def build_model_dir(args, workdir):
    from lora_kernels import demo

    heads = max(1, args.hidden_size // 32)
    config = demo.llama_config(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=heads,
                               num_kv_heads=max(1, heads // 2), intermediate_size=args.hidden_size * 3 - 8)
    return demo.save_tiny_llama(Path(workdir) / "model", config, seed=args.seed)


def load_model(model_dir, args, device):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = DTYPES[args.compute_dtype]
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute_dtype,
                                    bnb_4bit_quant_storage=STORAGE[args.quant_storage])
    device_map = {"": device.index if device.type == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config, device_map=device_map,
                                                 dtype=compute_dtype)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})  # non-reentrant: what DDP needs
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, use_rslora=args.rslora,
                      target_modules=[t for t in args.targets.split(",") if t], task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)  # the same adapter initialisation on every process
    return get_peft_model(model, lora)


# ------------------------------------------------------------------------------------------ training

def main(argv=None):
    args = parse_args(argv)
    if args.backend:
        os.environ["LORA_KERNELS_BACKEND"] = args.backend
    rank, world, device = distributed_env()
    main_process = rank == 0
    log = print if main_process else (lambda *a, **k: None)

    with contextlib.ExitStack() as stack:
        model_dir = args.model
        if model_dir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="train_qlora_"))
            # every process builds the same weights (same seed), before the process group exists:
            # transformers' save_pretrained writes on the main process only once torch.distributed is up
            model_dir = build_model_dir(args, workdir)
            log(f"built a {args.layers}-layer Llama-architecture model (hidden {args.hidden_size}) in {model_dir}")
        if world > 1:
            init_distributed(device)
        model = load_model(model_dir, args, device)
        if main_process:
            model.print_trainable_parameters()

        if not args.no_patch:
            import lora_kernels

            report = lora_kernels.patch_peft_model(model)  # <- the one line lora-kernels adds
            log(report)

        encode, how = make_tokenizer(args.model, model.config.vocab_size)
        ids = encode(read_text(args.data))
        log(f"data: {len(ids)} tokens ({how}); {world} process(es) x batch {args.batch_size} x {args.seq_len} tokens")

        train_model = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        compute_dtype = DTYPES[args.compute_dtype]
        autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)

        from tqdm.auto import tqdm

        model.train()
        bar = tqdm(total=args.steps, disable=not main_process, desc="train", dynamic_ncols=True)
        tokens_per_step = args.batch_size * args.seq_len * world
        losses, start, timed_tokens, timed_start = [], time.perf_counter(), 0, None
        for step, global_batch in enumerate(batches(ids, args.seq_len, args.batch_size * world, args.steps,
                                                    args.seed)):
            batch = global_batch[rank * args.batch_size:(rank + 1) * args.batch_size].to(device)
            with autocast:
                loss = train_model(input_ids=batch, labels=batch).loss
            loss.backward()
            if step == 0 and args.grads_out and main_process:
                torch.save({n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
                            if p.grad is not None}, args.grads_out)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = loss.detach()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(loss_value)
                loss_value /= world
            loss_value = loss_value.item()  # synchronises the device: the timing below is honest
            losses.append(loss_value)
            now = time.perf_counter()
            if step == 0:  # the first step compiles kernels and warms caches: not in the throughput
                timed_start = now
            else:
                timed_tokens += tokens_per_step
            tok_s = timed_tokens / (now - timed_start) if timed_tokens else float("nan")
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)
            if main_process and (step + 1) % args.log_every == 0:
                bar.write(f"step {step + 1:5d}  loss {loss_value:.4f}  tokens/s {tok_s:,.0f}")
        bar.close()
        if not losses:
            raise SystemExit("--steps must be at least 1")
        elapsed = time.perf_counter() - start
        tok_s = timed_tokens / (time.perf_counter() - timed_start) if timed_tokens else float("nan")
        log(f"done: {len(losses)} steps in {elapsed:.1f}s, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
            f"{tok_s:,.0f} tokens/s after the first step ({'stock PEFT' if args.no_patch else 'lora_kernels'})")
        if not all(math.isfinite(v) for v in losses):
            raise SystemExit("the loss is not finite")
        if main_process:
            model.save_pretrained(args.output)
            log(f"adapter saved to {args.output}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
