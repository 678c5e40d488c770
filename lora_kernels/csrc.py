"""The optional CUDA library (csrc/, built as lora_kernels/_csrc*.so with LORA_KERNELS_BUILD_CSRC=1).

It holds the decode-shape forward (M <= 16 rows of x) over a bitsandbytes 4-bit weight:

    y = x decode(W)^T + scaling * (xa B^T) + bias          xa = drop(x) A^T, computed before (Triton)

and is called through a C ABI with ctypes, so it does not depend on how torch was built. Nothing is
loaded at import: `status()` loads it on first use and says why when it could not. LORA_KERNELS_CSRC_LIB
names another library file (tests use a fake one).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
from typing import Optional

import torch

from .envvars import getenv

ABI_VERSION = 3  # csrc/lk_csrc.h LK_CSRC_ABI_VERSION
MAX_M = 16
_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
# lk_decode_args.decode. "exact" is bitsandbytes' own rounding (fp32 code * fp32 scale, rounded once); the
# two table decodes round the codes to the dtype first, and at blocksize 64 the scale too.
DECODES = {"shared": 0, "registers": 1, "exact": 2}
# Without LORA_KERNELS_CSRC_DECODE: exact. On the H200 it gave bitsandbytes' weights bit for bit, and its kernel
# took 29.8 / 35.6 us at 8192x8192 M = 1 / 16 against the shared table's 23.9 / 33.1 (e66ba9f, csrc/README.md).
DEFAULT_DECODE = "exact"
# The fast kernel's loads (lk_decode_args.pipeline). "ring" stays the default until "async" has run on a GPU.
PIPELINES = {"ring": 0, "async": 1}
DEFAULT_PIPELINE = "ring"
BUILD_HINT = ("build it with `LORA_KERNELS_BUILD_CSRC=1 pip install -e .` (nvcc from PATH or the "
              "nvidia-cuda-nvcc==13.0.88 wheels; see csrc/README.md)")


class DecodeArgs(ctypes.Structure):
    """Mirror of lk_decode_args (csrc/lk_csrc.h); the loader checks sizeof against the library's."""

    _fields_ = [
        ("x", ctypes.c_void_p), ("x_row", ctypes.c_int64),
        ("packed", ctypes.c_void_p), ("code", ctypes.c_void_p), ("absmax", ctypes.c_void_p),
        ("code2", ctypes.c_void_p), ("absmax2", ctypes.c_void_p), ("offset", ctypes.c_void_p),
        ("xa", ctypes.c_void_p), ("xa_row", ctypes.c_int64), ("xa_col", ctypes.c_int64),
        ("b", ctypes.c_void_p), ("b_row", ctypes.c_int64), ("b_col", ctypes.c_int64),
        ("bias", ctypes.c_void_p), ("bias_stride", ctypes.c_int64),
        ("out", ctypes.c_void_p), ("out_row", ctypes.c_int64),
        ("m", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("r", ctypes.c_int32),
        ("blocksize", ctypes.c_int32), ("blocksize2", ctypes.c_int32), ("nested", ctypes.c_int32),
        ("dtype", ctypes.c_int32), ("scaling", ctypes.c_float), ("force_generic", ctypes.c_int32),
        ("device", ctypes.c_int32), ("decode", ctypes.c_int32), ("row_tiles", ctypes.c_int32),
        ("warps", ctypes.c_int32), ("depth", ctypes.c_int32), ("pipeline", ctypes.c_int32),
    ]


_lock = threading.Lock()
_state: Optional[dict] = None  # {"lib": CDLL or None, "path": str or None, "reason": str or None}


def library_path() -> Optional[str]:
    """The library file to load: $LORA_KERNELS_CSRC_LIB, else lora_kernels/_csrc*.so, else None."""
    override = os.environ.get("LORA_KERNELS_CSRC_LIB")
    if override:
        return override
    found = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_csrc*.so")))
    return found[0] if found else None


def _load() -> dict:
    path = library_path()
    if path is None:
        return dict(lib=None, path=None, reason=f"not built: no lora_kernels/_csrc*.so; {BUILD_HINT}")
    if not os.path.exists(path):
        return dict(lib=None, path=path, reason=f"not found: {path} does not exist")
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return dict(lib=None, path=path, reason=f"failed to load {path}: {e}")
    try:
        lib.lk_abi_version.restype = ctypes.c_int
        lib.lk_args_size.restype = ctypes.c_int
        lib.lk_status_string.restype = ctypes.c_char_p
        lib.lk_status_string.argtypes = [ctypes.c_int]
        lib.lk_last_cuda_error.restype = ctypes.c_char_p
        lib.lk_linear_decode_fwd.restype = ctypes.c_int
        lib.lk_linear_decode_fwd.argtypes = [ctypes.POINTER(DecodeArgs), ctypes.c_void_p]
        lib.lk_decode_path.restype = ctypes.c_int
        lib.lk_decode_path.argtypes = [ctypes.POINTER(DecodeArgs)]
        lib.lk_fast_launch.restype = ctypes.c_int
        lib.lk_fast_launch.argtypes = [ctypes.POINTER(DecodeArgs), ctypes.POINTER(ctypes.c_int)]
    except AttributeError as e:
        return dict(lib=None, path=path, reason=f"{path} lacks a symbol of the C ABI: {e}")
    version, size = lib.lk_abi_version(), lib.lk_args_size()
    if version != ABI_VERSION:
        return dict(lib=None, path=path,
                    reason=f"{path} has C ABI version {version}, this package needs {ABI_VERSION}: rebuild it")
    if size != ctypes.sizeof(DecodeArgs):
        return dict(lib=None, path=path, reason=f"{path} has an lk_decode_args of {size} bytes, the loader's "
                                                f"mirror has {ctypes.sizeof(DecodeArgs)}: rebuild it")
    return dict(lib=lib, path=path, reason=None)


def _get() -> dict:
    global _state
    state = _state  # loaded: no lock on the per-call path
    if state is not None:
        return state
    with _lock:
        if _state is None:
            _state = _load()
        return _state


def reset() -> None:
    """Forget the loaded library (tests; a later call loads again, from library_path())."""
    global _state
    with _lock:
        _state = None


def status() -> dict:
    """{'found': bool, 'path': str or None, 'reason': why not, or None, 'dispatch': when the op uses it}: what
    lk.backends() reports."""
    s = _get()
    return dict(found=s["lib"] is not None, path=s["path"], reason=s["reason"],
                dispatch="auto (M <= 16)" if AUTO_DISPATCH else "only with LORA_KERNELS_PATH=csrc")


def available() -> bool:
    return _get()["lib"] is not None


def _library():
    s = _get()
    if s["lib"] is None:
        raise RuntimeError(f"the lora_kernels CUDA library is unavailable: {s['reason']}")
    return s["lib"]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def unsupported_reason(x: torch.Tensor, is_4bit: bool) -> Optional[str]:
    """Why the fused op's forward cannot run here (None when it can), library aside."""
    if not is_4bit:
        return "the weight is not 4-bit (the kernel decodes bitsandbytes NF4/FP4 only)"
    if x.device.type != "cuda":
        return f"x is on {x.device.type}, the kernel needs CUDA tensors"
    major, minor = _capability(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if major < 8:  # the library holds sm_80 and sm_90 code (bf16 mma.sync), and PTX for newer GPUs only
        return f"the GPU is sm_{major}{minor}; the kernel needs sm_80 or newer"
    if x.dtype not in _DTYPES:
        return f"x is {x.dtype}, the kernel takes bfloat16 or float16"
    if not 1 <= x.shape[0] <= MAX_M:
        return f"x has {x.shape[0]} rows, the kernel takes 1..{MAX_M}"
    return None


def use_for_forward(x: torch.Tensor, is_4bit: bool, forced: bool) -> bool:
    """Whether lora_kernels::linear_fwd runs this library: by default for 4-bit weights, CUDA, M <= 16,
    bf16/fp16, when the library loaded. forced (LORA_KERNELS_PATH=csrc): always, or a clear error."""
    why = unsupported_reason(x, is_4bit)
    if not forced:
        return why is None and available()
    if why is not None:
        raise ValueError(f"LORA_KERNELS_PATH=csrc, but {why}")
    _library()  # raises with the reason when missing
    return True


# Whether LORA_KERNELS_PATH=auto hands decode shapes (M <= 16, CUDA, 4-bit, bf16/fp16) to the library when it
# loaded. On since the exact decode (the default) passed its GPU tests on the H200, bit-exact weights included,
# and the op with it took less time than on the dequantize path at every decode shape of csrc/bench_decode.py
# there (e66ba9f). The table decodes round the codes first (1.1-2.0x PyTorch's error, emulated): only on request.
AUTO_DISPATCH = True


def wanted_for_forward(x: torch.Tensor, is_4bit: bool, setting: str) -> bool:
    """The fused op's forward dispatch; `setting` is configs.path_setting(). LORA_KERNELS_PATH=csrc forces the
    library; under =auto it takes what it can (whichever Triton path M would take) only once AUTO_DISPATCH is on;
    =fused or =dequant keep it out."""
    if setting == "csrc":
        return use_for_forward(x, is_4bit, forced=True)
    return AUTO_DISPATCH and setting == "auto" and use_for_forward(x, is_4bit, forced=False)


# Seams for the tests' fake library, which runs on CPU tensors.
def _check_devices(tensors, device: torch.device) -> None:
    """tensors: (name, tensor) pairs, x first, all on `device`, a CUDA device."""
    if device.type != "cuda":
        raise ValueError(f"{tensors[0][0]} is on {device}: the csrc kernel needs CUDA tensors")
    for name, t in tensors:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, x on {device}: every tensor must be on one CUDA device")


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's launcher calls: no Stream object


def _current_stream(device: torch.device) -> int:
    if _RAW_STREAM is not None and device.index is not None:
        return _RAW_STREAM(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _knob(name: str, allowed: tuple, spoken: str) -> int:
    """A measurement knob LORA_KERNELS_CSRC_<name>: an int from `allowed` (0 or unset: auto)."""
    value = getenv(f"LORA_KERNELS_CSRC_{name}")
    if not value:
        return 0
    value = value.strip()
    if value not in ("", "0", *map(str, allowed)):
        raise ValueError(f"LORA_KERNELS_CSRC_{name} must be {spoken} (or unset), got {value!r}")
    return int(value or 0)


def _row_tiles() -> int:
    return _knob("ROW_TILES", (1, 2), "1 or 2")


def _depth() -> int:
    return _knob("DEPTH", (1, 2, 4), "1, 2 or 4")


def _warps() -> int:
    return _knob("WARPS", (1, 2, 4, 8, 16), "1, 2, 4, 8 or 16")


def _choice(kind: str, value: Optional[str], choices: dict, default: str) -> int:
    """The id of `value`, else of LORA_KERNELS_CSRC_<KIND>, else of `default`, among `choices`."""
    env = f"LORA_KERNELS_CSRC_{kind.upper()}"
    value = value or getenv(env).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{kind} ({env}) must be one of {sorted(choices)}, got {value!r}")
    return choices[value]


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def linear_decode_fwd(x: torch.Tensor, q, xa: Optional[torch.Tensor], b: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], scaling: float, out: Optional[torch.Tensor] = None,
                      force_generic: bool = False, decode: Optional[str] = None,
                      pipeline: Optional[str] = None) -> torch.Tensor:
    """out[M, N] = x decode(W)^T + scaling * xa b^T + bias, on x's current CUDA stream (graph-capturable).

    x [M, K] bf16/fp16 with M <= 16; q a lora_kernels.nf4.Quant4bit; xa [M, r] and b [N, r] in x's dtype
    (or both None); bias [N] or None; out [M, N] in x's dtype with unit inner stride (allocated if None).
    force_generic runs the element-wise kernel (tests). decode: the fast kernel's decode, "exact" (fp32 code *
    fp32 scale rounded once per element: bitsandbytes' weights bit for bit, the default), "shared" (256 byte ->
    code-pair entries in shared memory) or "registers" (16 codes, PRMT), both rounding the codes to the dtype
    first; default from LORA_KERNELS_CSRC_DECODE. pipeline: how the fast kernel's loop gets its loads, "ring"
    (registers, the default: measured on the H200) or "async" (cp.async stages in shared memory: no GPU run
    yet); default from LORA_KERNELS_CSRC_PIPELINE.
    For measuring: LORA_KERNELS_CSRC_ROW_TILES=1|2 fixes the 16-row tiles per warp (the ring: at M > 8; async:
    at any M, with at most 8 warps; default: chosen by N), LORA_KERNELS_CSRC_WARPS=1..16 the warps per CTA (default: as many as keep one wave),
    LORA_KERNELS_CSRC_DEPTH=1|2|4 the 128-wide steps of W loaded ahead at M <= 8 (default 4).
    """
    args, out, lib = _decode_args(x, q, xa, b, bias, scaling, out, force_generic, decode, pipeline)
    _launch(lib, args, x, q)
    return out


def loads_only_fwd(x: torch.Tensor, q, xa: Optional[torch.Tensor], b: Optional[torch.Tensor],
                   out: torch.Tensor) -> torch.Tensor:
    """Measurement only (csrc/bench_decode.py): the fast kernel's loads, scales, reduction and epilogue without its
    decode or MMAs, for M <= 8. What it writes to `out` is meaningless; the time says what the loads alone cost."""
    args, out, lib = _decode_args(x, q, xa, b, None, 1.0, out, False, "exact", "ring")
    args.decode = 3
    _launch(lib, args, x, q)
    return out


def _launch(lib, args, x, q) -> None:
    """lk_linear_decode_fwd on x's current stream; a failure raises with the library's reason and the case."""
    rc = lib.lk_linear_decode_fwd(ctypes.byref(args), ctypes.c_void_p(_current_stream(x.device)))
    if rc != 0:
        detail = lib.lk_status_string(rc).decode()
        if rc == 2:
            detail += f": {lib.lk_last_cuda_error().decode()}"
        raise RuntimeError(f"lk_linear_decode_fwd returned {rc} ({detail}) for x {tuple(x.shape)} {x.dtype}, "
                           f"weight {args.n}x{args.k} blocksize {q.blocksize}{' nested' if q.nested else ''}, "
                           f"r={args.r}, decode {args.decode}, pipeline {args.pipeline}")


def launch_plan(x: torch.Tensor, q, xa: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None,
                decode: Optional[str] = None, pipeline: Optional[str] = None) -> dict:
    """How linear_decode_fwd would launch for these arguments (measurement): {'ctas', 'warps',
    'resident_per_sm' (CUDA's occupancy calculator), 'sms', 'pipeline' (the one taken: "ring" or "async"),
    'smem' (dynamic shared memory bytes)}; all 0 (pipeline None) when the generic kernel would run."""
    args, _, lib = _decode_args(x, q, xa, b, None, 1.0, None, False, decode, pipeline)
    got = (ctypes.c_int * 6)()
    rc = lib.lk_fast_launch(ctypes.byref(args), got)
    if rc != 0:
        raise RuntimeError(f"lk_fast_launch returned {rc} ({lib.lk_status_string(rc).decode()})")
    names = {v: k for k, v in PIPELINES.items()}
    return dict(ctas=got[0], warps=got[1], resident_per_sm=got[2], sms=got[3],
                pipeline=names[got[4]] if got[0] else None, smem=got[5])


def _decode_args(x, q, xa, b, bias, scaling, out, force_generic, decode, pipeline=None):
    """(lk_decode_args, out, library) after checking every argument. Per-call host time: the op runs this for
    every decode-shape layer call, so each check reads what it needs once."""
    pipeline_id = _choice("pipeline", pipeline, PIPELINES, DEFAULT_PIPELINE)
    decode_id = _choice("decode", decode, DECODES, DEFAULT_DECODE)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got {tuple(x.shape)}")
    dtype = x.dtype
    dtype_id = _DTYPES.get(dtype)
    if dtype_id is None:
        raise TypeError(f"x must be bfloat16 or float16, got {dtype}")
    m, k = x.shape
    n, kw = q.shape
    if kw != k:
        raise ValueError(f"x has K={k} but the 4-bit weight is {n}x{kw}")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"x has M={m} rows; the csrc kernel takes 1..{MAX_M}")
    device = x.device
    if x.stride(1) != 1:
        x = x.contiguous()
    packed, code, absmax, nested = q.packed, q.code, q.absmax, q.code2 is not None
    if packed.dtype != torch.uint8 or packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"packed weight must be {(n * k + 1) // 2} uint8 bytes, got {packed.numel()} {packed.dtype}")
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"code must be 16 fp32 entries, got {tuple(code.shape)} {code.dtype}")
    blocks = -(-(n * k) // q.blocksize)
    want = torch.uint8 if nested else torch.float32
    if absmax.dtype != want or absmax.numel() != blocks:
        raise ValueError(f"absmax must be {blocks} {want} entries, got {absmax.numel()} {absmax.dtype}")
    tensors = [("x", x), ("packed", packed), ("code", code), ("absmax", absmax)]
    code2 = absmax2 = offset = None
    if nested:
        code2, absmax2, offset = q.code2, q.absmax2, q.offset
        for name, t in (("code2", code2), ("absmax2", absmax2), ("offset", offset)):
            if t.dtype != torch.float32:
                raise ValueError(f"{name} must be fp32, got {t.dtype}")
            tensors.append((name, t))
    r = 0
    if (xa is None) != (b is None):
        raise ValueError("xa and b come together (both None without LoRA)")
    if xa is not None:
        r = xa.shape[1]
        if xa.shape != (m, r) or b.shape != (n, r):
            raise ValueError(f"xa {tuple(xa.shape)} and b {tuple(b.shape)} must be [{m}, r] and [{n}, r]")
        if xa.dtype != dtype or b.dtype != dtype:
            raise TypeError(f"xa ({xa.dtype}) and b ({b.dtype}) must be in x's dtype {dtype}")
        tensors += [("xa", xa), ("b", b)]
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
        if bias.dtype != dtype:
            bias = bias.to(dtype)
        tensors.append(("bias", bias))
    if out is None:
        out = torch.empty((m, n), dtype=dtype, device=device)
    elif out.shape != (m, n) or out.dtype != dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {dtype} with unit inner stride, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    tensors.append(("out", out))
    _check_devices(tensors, device)
    lib = _library()
    xa_row, xa_col = xa.stride() if xa is not None else (0, 0)
    b_row, b_col = b.stride() if b is not None else (0, 0)
    args = DecodeArgs(
        x=x.data_ptr(), x_row=x.stride(0) if m > 1 else k, packed=packed.data_ptr(), code=code.data_ptr(),
        absmax=absmax.data_ptr(), code2=_ptr(code2), absmax2=_ptr(absmax2), offset=_ptr(offset),
        xa=_ptr(xa), xa_row=xa_row, xa_col=xa_col, b=_ptr(b), b_row=b_row, b_col=b_col,
        bias=_ptr(bias), bias_stride=bias.stride(0) if bias is not None else 0,
        out=out.data_ptr(), out_row=out.stride(0),
        m=m, n=n, k=k, r=r, blocksize=q.blocksize, blocksize2=q.blocksize2 if nested else 0,
        nested=int(nested), dtype=dtype_id, scaling=float(scaling), force_generic=int(force_generic),
        device=device.index if device.index is not None else 0, decode=decode_id,
        row_tiles=_row_tiles(), warps=_warps(), depth=_depth(), pipeline=pipeline_id,
    )
    return args, out, lib
