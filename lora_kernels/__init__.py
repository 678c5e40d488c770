"""lora_kernels: fused Triton kernels for QLoRA, as drop-in replacements for PEFT's LoRA layers.

Importing the package is cheap: the kernels, PEFT and transformers load on first use.
"""
from importlib import import_module

from .errors import FallbackWarning

__version__ = "0.1.0"

_LAZY = {
    "dequantize_4bit": "lora_kernels.nf4",
    "qlora_linear": "lora_kernels.ops.fused_linear",
    "lora_linear": "lora_kernels.ops.fused_linear",
    "patch_peft_model": "lora_kernels.patch",
    "unpatch_peft_model": "lora_kernels.patch",
    "patched": "lora_kernels.patch",
    "PatchReport": "lora_kernels.patch",
    "backends": "lora_kernels.backend",
}
_SUBMODULES = {"rank", "reference", "nf4", "ops", "patch", "cli", "backend", "bench"}

__all__ = ["FallbackWarning", "__version__", *_LAZY, *sorted(_SUBMODULES)]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = import_module(f"lora_kernels.{name}")
    else:
        raise AttributeError(f"module 'lora_kernels' has no attribute {name!r}")
    globals()[name] = value
    return value
