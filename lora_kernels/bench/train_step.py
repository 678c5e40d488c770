"""train_step: one QLoRA training step of a Llama-architecture model, timed end to end.

The model is built from a config (never downloaded): Llama-3-8B layer shapes (hidden 4096, intermediate
14336, 32 heads, 8 KV heads) with as many decoder layers as asked (`--layers`), random weights, a small
vocabulary (so the step measures the decoder layers). Variants, all from the same seed:

    peft_bnb            every decoder nn.Linear replaced by a bitsandbytes Linear4bit holding the NF4
                        quantization of its weight (blocksize 64, double quantization, bf16 compute:
                        what transformers' BitsAndBytesConfig produces), then PEFT LoRA on all seven
                        projections: stock QLoRA
    lora_kernels        the same, patched with lora_kernels.patch_peft_model
    peft_bf16           PEFT LoRA on the unquantized bf16 model (the memory QLoRA saves, the speed it costs)
    lora_kernels_bf16   peft_bf16 patched (the fused op on dense bases)

PEFT's defaults otherwise: adapters in fp32 (autocast_adapter_dtype), lora_alpha 16, no bias, dropout
`--lora-dropout` (default 0). One step = zero_grad, forward with labels (causal LM loss), backward,
AdamW step; no gradient checkpointing. Timed after `train_warmup` steps; peak memory over the timed steps
is everything the run holds (weights, adapters, gradients, AdamW state, activations). Every variant starts
from the same weights and data, so the patched variants' losses, step by step, must track stock PEFT's
(loss_parity).
"""
from __future__ import annotations

import warnings

from .presets import TRAIN_MODELS
from .providers import Skip, linear4bit_from_packed, quantize_nf4, torch_dtype

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(spec):
    from ..demo import llama_config

    cfg = dict(TRAIN_MODELS[spec.train_model])
    return llama_config(hidden_size=cfg["hidden_size"], num_layers=spec.layers, num_heads=cfg["num_heads"],
                        num_kv_heads=cfg["num_kv_heads"], intermediate_size=cfg["intermediate_size"],
                        vocab_size=cfg["vocab_size"], max_position_embeddings=max(512, spec.seq_len),
                        use_cache=False)


def quantize_linears(model, compute_dtype) -> int:
    """Replaces every nn.Linear inside the decoder layers by a Linear4bit with its NF4-quantized weight."""
    from torch import nn

    count = 0
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if type(module) is not nn.Linear:
                continue
            packed, state = quantize_nf4(module.weight.data.to(compute_dtype))
            q = linear4bit_from_packed(packed, state, module.in_features, module.out_features, compute_dtype)
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.data.to(compute_dtype), requires_grad=False)
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, name.rsplit(".", 1)[-1], q)
            count += 1
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer sets; PEFT reads it
    return count


def build(spec, provider, r, log=print):
    """(step function, provider label, tokens per step, objects to keep alive) for one variant at rank r."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    device = spec.device
    dtype = torch_dtype(spec.dtype)
    config = model_config(spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    quantized = provider in ("peft_bnb", "lora_kernels")
    if quantized:
        quantize_linears(model, dtype)
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=r, lora_alpha=spec.alpha, target_modules=TARGETS, lora_dropout=spec.lora_dropout,
                      bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, lora)
    label = provider
    if provider.startswith("lora_kernels"):
        import lora_kernels as lk

        from .providers import lora_kernels_label

        report = lk.patch_peft_model(peft_model)
        if not report.patched:
            raise Skip(f"patch_peft_model patched no layer: {dict(list(report.skipped.items())[:2])}")
        if report.skipped or report.fallbacks:
            log(f"train_step {provider} r={r}: {len(report.skipped)} layers skipped, "
                f"{len(report.fallbacks)} falling back: {report}")
        from .providers import cpu_patch_default

        note = "lora_kernels[patched]" if cpu_patch_default(device) else lora_kernels_label(device)
        label = note.replace("lora_kernels", provider, 1)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise Skip("the PEFT model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (spec.batch_size, spec.seq_len), generator=gen).to(device)

    losses = []  # every step's loss, kept on the device: the loss-parity check reads them after timing
    # On CPU the patched variants run as a user's would: PEFT's forward by default (lora_kernels[patched]),
    # the op's PyTorch path with LORA_KERNELS_PATCH_CPU=op or LORA_KERNELS_BACKEND=reference.

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = peft_model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.detach())

    return step, label, spec.batch_size * spec.seq_len, (peft_model, optimizer, ids, losses)


# patched variant -> the stock variant it replaces
PARITY_PAIRS = {"lora_kernels": "peft_bnb", "lora_kernels_bf16": "peft_bf16"}


def loss_parity(train_losses) -> list:
    """(r, patched, stock, patched losses, stock losses, max relative difference) for each pair measured.

    train_losses: {(provider, r): [loss of each step, warm-up included]}."""
    out = []
    for (provider, r), mine in sorted(train_losses.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        stock = PARITY_PAIRS.get(provider)
        theirs = train_losses.get((stock, r))
        if stock is None or not theirs or len(theirs) != len(mine):
            continue
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(mine, theirs))
        out.append((r, provider, stock, mine, theirs, worst))
    return out


def loss_parity_lines(train_losses, step_ratios=None, interleaved=False) -> list:
    """One line per pair; with step_ratios ({(patched, r): patched/stock median step time}) the ratio too."""
    step_ratios = step_ratios or {}
    lines = []
    for r, mine_name, stock, mine, theirs, worst in loss_parity(train_losses):
        line = (f"train_step r={r}: loss of {mine_name} vs {stock}, step 1 {mine[0]:.4f} vs {theirs[0]:.4f}, "
                f"step {len(mine)} {mine[-1]:.4f} vs {theirs[-1]:.4f}; largest relative difference {worst:.2e}")
        ratio = step_ratios.get((mine_name, r))
        if ratio is not None:
            line += (f" ; step time {mine_name}/{stock} {ratio:.3f}x (median"
                     + (", interleaved steps)" if interleaved else ")"))
        lines.append(line)
    return lines
