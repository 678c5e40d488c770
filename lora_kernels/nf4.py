"""The bitsandbytes 4-bit format (NF4 and FP4): reading quant states and dequantizing.

Facts this module relies on (bitsandbytes 0.50; tests/test_nf4.py checks them against the installed version):
- packed data is uint8 [(N*K+1)//2, 1] (or the same bytes in another quant_storage dtype), the row-major
  flattening of [N, K]; element i is in byte i//2, the HIGH nibble for even i, the LOW nibble for odd i;
- absmax blocks run over the flat index (block = i // blocksize), so a block may span two rows;
- nested (double-quant) absmax is uint8: scale[b] = code2[absmax[b]] * absmax2[b // blocksize2] + offset,
  in fp32, then W = code[nibble] * scale in fp32, cast to the output dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
MAX_ELEMENTS = 2**31 - 1  # kernels index the flat weight in int32


@dataclass(frozen=True)
class Quant4bit:
    """A validated view of one 4-bit weight: what the kernels and the reference need, nothing else."""

    packed: torch.Tensor  # uint8, flat, (N*K+1)//2 bytes
    code: torch.Tensor  # fp32 [16]
    absmax: torch.Tensor  # fp32 [blocks], or uint8 [blocks] when nested
    blocksize: int
    shape: tuple  # (N, K) = (out_features, in_features)
    dtype: torch.dtype  # dtype bitsandbytes dequantizes to
    quant_type: str
    code2: Optional[torch.Tensor] = None  # nested only
    absmax2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    blocksize2: int = 0

    @property
    def nested(self) -> bool:
        return self.code2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def meta_tensors(self) -> list:
        """The tensors an op needs besides the packed bytes, in a fixed order."""
        base = [self.code, self.absmax]
        return base + [self.code2, self.absmax2, self.offset] if self.nested else base


def is_cpu_repacked(quant_state) -> bool:
    """bitsandbytes repacks CPU weights in place for AVX512-BF16 kernels: a layout the kernels cannot read."""
    own = getattr(quant_state, "__dict__", None)
    if type(own) is dict:  # it sets the flag on the instance; asking for a missing one runs QuantState.__getattr__
        if "packing_format_for_cpu" in own:
            return bool(own["packing_format_for_cpu"])
        if not hasattr(type(quant_state), "packing_format_for_cpu"):  # a class attribute or property still counts
            return False
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def _packed_bytes(weight: torch.Tensor) -> torch.Tensor:
    data = weight if type(weight) is torch.Tensor else weight.data if isinstance(weight, torch.nn.Parameter) else weight
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"weight must be a tensor (bitsandbytes Params4bit or its packed data), got {type(weight).__name__}")
    if not data.is_contiguous():
        data = data.contiguous()
    if data.dtype != torch.uint8:
        if data.dtype.is_floating_point or data.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            data = data.view(torch.uint8)  # quant_storage other than uint8 holds the same bytes
        else:
            raise TypeError(f"packed 4-bit weight has unsupported storage dtype {data.dtype}")
    return data.reshape(-1)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous fp32; t itself when it is (each skipped op is host time saved on every call)."""
    return t if t.dtype is torch.float32 and t.is_contiguous() else t.float().contiguous()


def read_quant_state(weight: torch.Tensor, quant_state) -> Quant4bit:
    """Validates a bitsandbytes (weight, quant_state) pair and returns a Quant4bit; raises ValueError/TypeError."""
    if quant_state is None:
        raise ValueError("quant_state is None: pass the bitsandbytes QuantState of the 4-bit weight (weight.quant_state)")
    quant_type = getattr(quant_state, "quant_type", None)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown 4-bit quant_type {quant_type!r}: supported are {', '.join(QUANT_TYPES)}")
    if is_cpu_repacked(quant_state):
        raise ValueError(
            "this weight is in bitsandbytes' CPU-repacked layout (quant_state.packing_format_for_cpu=True, made by "
            "Linear4bit's first no-grad eval forward on an AVX512-BF16 CPU); lora_kernels reads only the standard layout")
    shape = tuple(int(s) for s in quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D (out_features, in_features), got {shape}")
    n, k = shape
    numel = n * k
    if numel > MAX_ELEMENTS:
        raise ValueError(f"weight {n}x{k} has {numel} elements, more than the kernels' int32 index allows ({MAX_ELEMENTS})")
    packed = _packed_bytes(weight)
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed weight has {packed.numel()} bytes but quant_state.shape {n}x{k} needs {(numel + 1) // 2}")
    blocksize = int(quant_state.blocksize)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not one bitsandbytes produces ({', '.join(map(str, BLOCKSIZES))})")
    code = quant_state.code
    if code is None or code.numel() != 16:
        raise ValueError(f"quant_state.code must hold 16 entries, got {None if code is None else tuple(code.shape)}")
    absmax = quant_state.absmax
    absmax = absmax if absmax.dim() == 1 else absmax.reshape(-1)  # each view is a dispatched op, per call
    blocks = -(-numel // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, {n}x{k} in blocks of {blocksize} needs {blocks}")
    nested = bool(getattr(quant_state, "nested", False))
    extra = {}
    if nested:
        s2 = quant_state.state2
        if absmax.dtype != torch.uint8:
            raise TypeError(f"nested quant_state must have uint8 absmax, got {absmax.dtype}")
        if s2 is None or quant_state.offset is None:
            raise ValueError("nested quant_state lacks state2 or offset")
        bs2 = int(s2.blocksize)
        if s2.absmax.numel() != -(-blocks // bs2):
            raise ValueError(f"state2.absmax has {s2.absmax.numel()} entries, {blocks} blocks of {bs2} need {-(-blocks // bs2)}")
        absmax2, offset = _fp32(s2.absmax), _fp32(quant_state.offset)
        extra = dict(code2=_fp32(s2.code), absmax2=absmax2 if absmax2.dim() == 1 else absmax2.reshape(-1),
                     offset=offset if offset.dim() == 0 else offset.reshape(()), blocksize2=bs2)
    else:
        absmax = _fp32(absmax)
    q = Quant4bit(packed=packed, code=_fp32(code), absmax=absmax.contiguous(),
                  blocksize=blocksize, shape=shape, dtype=quant_state.dtype, quant_type=quant_type, **extra)
    device = packed.device
    if any(t.device != device for t in q.meta_tensors() if t.dim() > 0):
        devices = {str(t.device) for t in [q.packed, *q.meta_tensors()] if t.dim() > 0}
        raise ValueError(f"4-bit weight and its quant_state are on different devices: {sorted(devices)}")
    return q


def block_scales(q: Quant4bit) -> torch.Tensor:
    """fp32 absmax per block, double quantization undone in the same order of operations as bitsandbytes."""
    if not q.nested:
        return q.absmax
    idx = torch.arange(q.absmax.numel(), device=q.device) // q.blocksize2
    scales = q.code2[q.absmax.long()] * q.absmax2[idx]
    return scales + q.offset


def dequantize_4bit(weight: torch.Tensor, quant_state, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense [out_features, in_features] weight, bit-identical to bitsandbytes.functional.dequantize_4bit.

    Runs the Triton kernel where the backend says so (CUDA, or the interpreter), else the reference.
    `dtype` defaults to quant_state.dtype, as in bitsandbytes.
    """
    from .backend import use_triton

    q = read_quant_state(weight, quant_state)
    out_dtype = dtype or q.dtype
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dequantize_4bit output dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if use_triton(q.device):
        from .ops.dequant import dequantize_4bit_triton

        return dequantize_4bit_triton(q, out_dtype)
    from .reference import dequantize_4bit_ref

    return dequantize_4bit_ref(q, out_dtype)
