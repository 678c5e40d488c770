"""Small offline models and text for tests, examples, the sweep and the train_step benchmark.

Nothing here reaches a hub: models are built from a config with random weights and saved locally,
and text is tokenized as raw bytes (vocabulary 256), so no tokenizer files are needed.
"""
from __future__ import annotations

import os

import torch

BYTE_VOCAB = 256

# Our own short corpus: enough varied text for a loss curve to move in a few dozen steps.
BUILTIN_CORPUS = """\
Low-rank adapters train a small pair of matrices beside each frozen weight. The frozen weight is
stored in four bits, so a model that needed a rack of accelerators fits on one card, and the adapter
carries everything the fine-tune learns. The rank decides how much it can learn: too small and the
loss stops falling early, too large and the adapter memorises the training set.
A kernel that fuses the dequantization with the matrix product reads each packed byte once per tile
and never writes the dense weight back to memory. The low-rank term is added in the same epilogue,
before the single store of the output, so the activations are not read again.
The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly.
Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump.
In the morning the baker opens the shop, weighs flour and water, and shapes the first loaves by hand.
At noon the market fills with voices: fish on ice, bright peppers, apples stacked in careful rows.
Evening brings rain to the harbour; ropes creak, gulls settle, and lamps come on along the quay.
Mathematics rewards patience: a proof is a path from what is known to what is claimed, each step checked.
A good benchmark states its hardware, its versions and its date, and reports the median with a spread.
"""


def encode_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode_bytes(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def llama_config(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=200,
                 vocab_size=BYTE_VOCAB, max_position_embeddings=512, **kwargs):
    """A Llama-architecture config. Odd-ish sizes on purpose: down_proj has K % 64 != 0 and K % 16 != 0
    (bitsandbytes 0.50 decodes wrongly on CPU when K % 16 == 0 but K % blocksize != 0, e.g. K = 160)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
                       vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                       tie_word_embeddings=False, **kwargs)


def build_llama(config=None, seed: int = 0, dtype=torch.float32):
    """A LlamaForCausalLM with deterministic random weights."""
    from transformers import LlamaForCausalLM

    config = config or llama_config()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.to(dtype)


def save_tiny_llama(path: str | os.PathLike, config=None, seed: int = 0) -> str:
    """Builds a small Llama model and saves it (safetensors + config.json) under `path`."""
    model = build_llama(config, seed=seed)
    model.save_pretrained(str(path))
    return str(path)


def load_4bit(model_dir: str | os.PathLike, compute_dtype=torch.bfloat16, double_quant=True,
              quant_type="nf4", quant_storage=torch.uint8, device_map=None):
    """Loads a local model with transformers + BitsAndBytesConfig, as a QLoRA user does."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double_quant,
                                    bnb_4bit_compute_dtype=compute_dtype,
                                    bnb_4bit_quant_storage=quant_storage)
    if device_map is None:
        device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb_config,
                                                device_map=device_map, dtype=compute_dtype)


def token_batches(text: str, seq_len: int, batch_size: int, steps: int, seed: int = 0, device="cpu"):
    """`steps` batches of random windows of the byte-tokenized text: (input_ids, labels) pairs."""
    ids = torch.tensor(encode_bytes(text), dtype=torch.long)
    if ids.numel() <= seq_len + 1:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=gen)
        batch = torch.stack([ids[s:s + seq_len] for s in starts.tolist()]).to(device)
        yield batch, batch.clone()
