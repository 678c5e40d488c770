"""Which implementation runs an op: the Triton kernels or the pure-PyTorch reference.

LORA_KERNELS_BACKEND=auto (default): Triton on CUDA tensors, the reference on CPU.
LORA_KERNELS_BACKEND=triton: Triton always; CPU tensors need TRITON_INTERPRET=1 (the interpreter).
LORA_KERNELS_BACKEND=reference: the reference always.
"""
import importlib.util

import torch

from .envvars import getenv

CHOICES = ("auto", "triton", "reference")


def backend_setting() -> str:
    value = getenv("LORA_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"LORA_KERNELS_BACKEND={value!r} is not one of {', '.join(CHOICES)}")
    return value


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (decided when triton.jit runs)."""
    return getenv("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device) -> bool:
    """Whether the Triton kernels should run for tensors on `device`; raises where they cannot."""
    setting = backend_setting()
    if setting == "reference":
        return False
    if device.type == "cuda":
        return True
    if setting == "auto":
        return False
    if device.type == "cpu" and interpreting():
        return True
    raise RuntimeError(
        f"LORA_KERNELS_BACKEND=triton cannot run on {device.type} tensors: Triton needs CUDA tensors, "
        "or TRITON_INTERPRET=1 (set before lora_kernels is imported) to run the kernels on CPU"
    )


def backends() -> dict:
    """What this installation found: for bug reports and `lora-kernels bench`."""
    found = {
        "setting": backend_setting(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": None,
        "interpreter": interpreting(),
    }
    if importlib.util.find_spec("triton") is not None:
        import triton

        found["triton"] = triton.__version__
    from . import csrc

    found["csrc"] = csrc.status()  # the optional CUDA library: found, or why not
    return found
