"""Helpers for the patching tests: a tiny Llama saved locally and loaded the way QLoRA users load models
(transformers + BitsAndBytesConfig NF4, double quant, bf16 compute), PEFT wrapping, an fp32 oracle, and
error measures.

intermediate_size is 200 on purpose: K % 64 != 0 for down_proj (blocks span rows), and K % 16 != 0, which
keeps bitsandbytes 0.50.2's own CPU dequantization correct. Its native CPU kernel decodes wrongly when K is a
multiple of 16 but not of the blocksize (e.g. K = 160 or 96 with blocksize 64), so stock PEFT itself would be
wrong there and could not serve as the reference (see test_bnb_cpu_dequantize_shape_bug).
"""
from __future__ import annotations

import torch

from lora_kernels import demo

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, BATCH = 32, 2
B_SCALE = 0.1


def tiny_config(**overrides):
    kwargs = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=200)
    kwargs.update(overrides)
    return demo.llama_config(**kwargs)


def save_model(path, **overrides):
    return demo.save_tiny_llama(path, tiny_config(**overrides), seed=0)


def load_peft(model_dir, *, quantized=True, quant_storage=torch.uint8, compute_dtype=torch.bfloat16, seed=0,
              adapter_dtype=None, **lora):
    """A PEFT LoRA model in train mode with deterministic, non-zero adapter weights: B random too, so every
    gradient is non-trivial, scaled by B_SCALE so that scaling * B A is a fraction of W as after fine-tuning
    (PEFT's init_lora_weights=False draws B like A, which makes the update several times larger than W).
    `quantized=False` loads the dense model in `compute_dtype`."""
    from peft import LoraConfig, get_peft_model

    if quantized:
        model = demo.load_4bit(model_dir, compute_dtype=compute_dtype, quant_storage=quant_storage)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=compute_dtype)
    config = dict(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    config.update(lora)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**config))
    scale_b(peft_model)
    if adapter_dtype is not None:
        cast_adapters(peft_model, adapter_dtype)
    peft_model.train()  # eval + no input grad would let bitsandbytes repack CPU weights
    return peft_model


def scale_b(model, adapter=None):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name and (adapter is None or name.endswith(f".{adapter}.weight")):
                p.mul_(B_SCALE)


def cast_adapters(model, dtype):
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)


def fp32_oracle(model_dir, like, **load_kwargs):
    """The same 4-bit model and adapters, computed in fp32 throughout (bitsandbytes' compute dtype, norms,
    embeddings, adapters): the reference both stock PEFT's and the patched model's bf16 errors are measured
    against. Built with load_peft(**load_kwargs); adapter weights and scalings are copied from `like`."""
    return to_fp32(load_peft(model_dir, **load_kwargs), like)


def to_fp32(model, like):
    """Copies `like`'s adapter weights and scalings into `model` and makes it compute in fp32."""
    import bitsandbytes as bnb

    params = dict(like.named_parameters())
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = params[name].detach().to(torch.float32).clone()
        elif p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    theirs = lora_layers(like)
    for name, layer in lora_layers(model).items():
        layer.scaling.update(theirs[name].scaling)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
            module.compute_type_is_set = True
    return model


def token_batch(seed=0, batch=BATCH, seq=SEQ):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, demo.BYTE_VOCAB, (batch, seq), generator=gen)
    return ids


def step(model, ids, *, backward=True):
    """(logits fp32, loss, {lora param name: grad}) for one forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    if backward:
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), out.loss.detach().float(), grads


def rel_err(got, want):
    """Relative error in the Frobenius norm, in fp64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_as_close_as_stock(got, stock, oracle, *, factor, floor, what):
    """The patched result's error against the fp32 oracle may be at most `factor` times stock PEFT's own bf16
    error against it, plus `floor` (relative, in the Frobenius norm)."""
    err, stock_err = rel_err(got, oracle), rel_err(stock, oracle)
    assert err <= factor * stock_err + floor, (
        f"{what}: relative error {err:.3e} vs the fp32 oracle, stock PEFT has {stock_err:.3e} (bound {factor}x + {floor})")
    return err, stock_err


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
