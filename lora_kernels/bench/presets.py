"""What a benchmark run measures: shapes, M values, ranks, providers, modes, and the named presets.

Presets (`--preset`; the default is `quick` on a GPU and `smoke` on CPU):
  quick  the targets' shapes (4096x4096, 8192x8192), M in {1, 16, 512, 4096, 8192}, r in {0, 16, 64},
         both layer modes, and train_step (4 Llama-3-8B layers, seq 2048, r in {8, 16, 64}).
         Sized to finish within about 10 minutes on one H100 (an estimate, not yet timed on a GPU),
         compile and autotuning included;
         no new case starts after 480 s (--time-limit).
  full   the DESIGN.md sweep: Llama-3-8B projections + 8192x8192, M in {1, 16, 512, 4096, 8192},
         r in {0, 4, 8, 16, 32, 64, 128}, both layer modes, train_step. Longer: split it by shape.
  smoke  tiny shapes (256x256, 512x256), M in {1, 64}, r in {0, 16}, train_step on a tiny Llama: for CPU
         and CI (the PyTorch reference runs, not the kernels). Seconds; no new case starts after 45 s.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

MODES = ("layer_fwd", "layer_fwd_bwd", "train_step")
LAYER_MODES = ("layer_fwd", "layer_fwd_bwd")

# (N, K) = (out_features, in_features): the weight is [N, K], x is [M, K].
SHAPE_PRESETS = {
    "llama3-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "llama3-70b": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
    "design": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192)],
    "targets": [(4096, 4096), (8192, 8192)],
    "tiny": [(256, 256), (512, 256)],
}

LAYER_PROVIDERS = {
    "lora_kernels": "the fused op (lk.qlora_linear; r=0 is the same op without LoRA)",
    "peft_bnb": "stock PEFT LoRA on a bitsandbytes Linear4bit (r=0: the bare Linear4bit)",
    "dequant_cublas": "bitsandbytes dequantize_4bit + torch.matmul, torch.addmm for the LoRA term",
    "cublas_bf16": "dense bf16 torch.nn.functional.linear without LoRA (r=0 only): the ceiling",
    "lora_kernels_fused": "the fused op forced onto the decode-in-GEMM path (LORA_KERNELS_PATH=fused; CUDA only)",
    "lora_kernels_dequant": "the fused op forced onto the dequantize+cuBLAS+epilogue path (CUDA only)",
}
TRAIN_PROVIDERS = {
    "peft_bnb": "stock PEFT + bitsandbytes NF4 (QLoRA as people run it)",
    "lora_kernels": "the same model patched with lk.patch_peft_model",
    "peft_bf16": "PEFT LoRA on the unquantized bf16 model",
    "lora_kernels_bf16": "the bf16 LoRA model patched with lk.patch_peft_model",
}
DEFAULT_LAYER_PROVIDERS = ("lora_kernels", "peft_bnb", "dequant_cublas", "cublas_bf16")
DEFAULT_TRAIN_PROVIDERS = ("peft_bnb", "lora_kernels", "peft_bf16")
DEFAULT_PROVIDERS = tuple(dict.fromkeys(DEFAULT_LAYER_PROVIDERS + DEFAULT_TRAIN_PROVIDERS))

# Llama-architecture configs for train_step. The vocabulary is kept small so the step measures the decoder
# layers (where QLoRA and the kernels differ), not an embedding and head that a few layers cannot amortize.
TRAIN_MODELS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, vocab_size=256),
}


@dataclass
class BenchSpec:
    device: str = "cpu"
    modes: tuple = MODES
    shapes: list = field(default_factory=lambda: list(SHAPE_PRESETS["tiny"]))
    ms: tuple = (1, 64)
    ranks: tuple = (0, 16)
    providers: tuple = DEFAULT_PROVIDERS
    dtype: str = "bf16"
    alpha: float = 16.0
    # train_step
    train_model: str = "tiny"
    train_ranks: tuple = (8, 16)
    layers: int = 2
    seq_len: int = 128
    batch_size: int = 1
    lora_dropout: float = 0.0
    train_warmup: int = 1
    train_steps: int = 3
    # timing
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_reps: int = 3
    time_limit_s: float | None = 45.0
    preset: str = "smoke"

    @classmethod
    def from_preset(cls, name: str, device: str) -> "BenchSpec":
        if name == "smoke":
            return cls(device=device, preset="smoke")
        if name not in ("quick", "full"):
            raise ValueError(f"unknown preset {name!r}; choose quick, full or smoke")
        common = dict(device=device, preset=name, time_limit_s=None,
                      ms=(1, 16, 512, 4096, 8192), train_model="llama3-8b", train_ranks=(8, 16, 64),
                      layers=4, seq_len=2048, batch_size=1, train_warmup=3, train_steps=10)
        if name == "quick":
            return cls(shapes=list(SHAPE_PRESETS["targets"]), ranks=(0, 16, 64), **dict(common, time_limit_s=480.0))
        return cls(shapes=list(SHAPE_PRESETS["design"]), ranks=(0, 4, 8, 16, 32, 64, 128), **common)

    @property
    def on_cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def layer_providers(self):
        return [p for p in self.providers if p in LAYER_PROVIDERS]

    def train_providers(self):
        return [p for p in TRAIN_PROVIDERS if p in self.providers]

    def replace(self, **changes) -> "BenchSpec":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "BenchSpec":
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
        if not self.modes:
            raise ValueError("no mode to run")
        known = set(LAYER_PROVIDERS) | set(TRAIN_PROVIDERS)
        bad = [p for p in self.providers if p not in known]
        if bad:
            raise ValueError(f"unknown provider {bad[0]!r}; layer providers: {', '.join(LAYER_PROVIDERS)}; "
                             f"train_step providers: {', '.join(TRAIN_PROVIDERS)}")
        layer_modes = [m for m in self.modes if m in LAYER_MODES]
        if layer_modes and not self.layer_providers() and "train_step" not in self.modes:
            raise ValueError(f"none of the providers {', '.join(self.providers)} runs {layer_modes[0]}; "
                             f"choose from {', '.join(LAYER_PROVIDERS)}")
        if self.modes == ("train_step",) and not self.train_providers():
            raise ValueError(f"none of the providers {', '.join(self.providers)} runs train_step; "
                             f"choose from {', '.join(TRAIN_PROVIDERS)}")
        for name, values, low in (("--m", self.ms, 1), ("--ranks", self.ranks, 0), ("--train-ranks", self.train_ranks, 1)):
            for v in values:
                if v < low:
                    raise ValueError(f"{name} values must be at least {low}, got {v}")
        if any(m in LAYER_MODES for m in self.modes):
            if not self.shapes:
                raise ValueError("no shape to run")
            if not self.ms or not self.ranks:
                raise ValueError("--m and --ranks need at least one value each")
        if "train_step" in self.modes:
            if self.train_model not in TRAIN_MODELS:
                raise ValueError(f"unknown --train-model {self.train_model!r}; choose from {', '.join(TRAIN_MODELS)}")
            for name, v, low in (("--layers", self.layers, 1), ("--seq-len", self.seq_len, 2),
                                 ("--batch-size", self.batch_size, 1), ("--train-steps", self.train_steps, 1)):
                if v < low:
                    raise ValueError(f"{name} must be at least {low}, got {v}")
            if not self.train_ranks:
                raise ValueError("--train-ranks needs at least one value")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.dtype not in ("bf16", "fp16"):
            raise ValueError(f"--dtype must be bf16 or fp16, got {self.dtype!r}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"--time-limit must be positive, got {self.time_limit_s}")
        return self


_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\d+)\s*$")


def parse_shapes(items) -> list:
    """Preset names and NxK strings (N = out_features, K = in_features) -> [(N, K)], duplicates dropped."""
    shapes = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if part.lower() in SHAPE_PRESETS:
                found = SHAPE_PRESETS[part.lower()]
            else:
                m = _SHAPE_RE.match(part)
                if not m:
                    raise ValueError(f"shape {part!r} is neither a preset ({', '.join(SHAPE_PRESETS)}) nor NxK "
                                     "such as 4096x4096 (N = out_features, K = in_features)")
                n, k = int(m.group(1)), int(m.group(2))
                if n < 1 or k < 1:
                    raise ValueError(f"shape {part!r} has a zero dimension")
                found = [(n, k)]
            shapes.extend(s for s in found if s not in shapes)
    return shapes


def parse_ints(items, what: str) -> tuple:
    """'1 16 512' or '1,16,512' -> (1, 16, 512), order kept, duplicates dropped."""
    out = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                value = int(part)
            except ValueError:
                raise ValueError(f"{what} takes integers, got {part!r}") from None
            if value not in out:
                out.append(value)
    return tuple(out)


def parse_names(items) -> tuple:
    out = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return tuple(out)
