"""Launch configurations in one place: autotune candidates per kernel, interpreter tiles, path dispatch.

Each launch draws its GEMM autotune candidates from one list, chosen by what it computes (gemm_candidates):
16-bit activations take tensor-core tiles (GEMM_CONFIGS); an odd in_features with 4-bit weights takes
ODD_K_GEMM_CONFIGS (its per-element decode needs smaller W tiles); fp32 activations take FP32_GEMM_CONFIGS
(the exact ieee fp32 dot runs on FFMA with operand tiles in registers, so 16-bit-sized tiles spill). The
rank kernels and the epilogue-only launch have an fp32 variant for the same reason. The candidates are
then pruned by the M bucket (no 128-row tiles for decode-sized M, only 16-row tiles for M <= 16), by a
shared-memory estimate, by the dropout epilogue's register budget and, on pre-Hopper GPUs, by the tiles
that spill only there. tests/test_gpu_compile.py compiles every candidate each launch can get, for sm_90
and sm_80 on CPU, and checks that each builds, fits in shared memory, does not spill and uses tensor cores
(16-bit; fp32 must not); every (M bucket, dtype, weight kind, dropout, arch) keeps at least one candidate.
"""
from typing import NamedTuple, Optional

import triton

from ..envvars import getenv

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). bf16 / fp16 activations: tensor-core tiles (HGMMA on
# sm_90 from 64 rows); 16-row tiles serve M <= 16, where streaming W is the whole cost: 16x32 tiles launch
# twice the CTAs of 16x64 (256 for 8192 outputs on 132 SMs), more loads in flight; the autotuner measures
# which wins per shape (16x32x256 spilled on sm_90, so BLOCK_K stays at 128).
GEMM_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 128, 64, 4, 4),
    (16, 32, 128, 4, 4),
]
# bf16 / fp16 with 4-bit weights of odd in_features (kind 4bit_odd, forward and backward): decode_4bit
# gathers a byte and an fp32 scale per W element, and the pipeliner stages those gathers in shared memory
# (about twice _smem_estimate). GEMM_CONFIGS' 64x128 W tiles spilled or exceeded sm_80's 163 KiB there
# (16x128x64, 64x128x64, 128x128x64), so W tiles of at most 64x64, with 16-row tiles of its own for M <= 16.
ODD_K_GEMM_CONFIGS = [
    (128, 64, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (16, 64, 64, 4, 4),
    (16, 32, 64, 4, 4),
]
# fp32 activations (dense or 4-bit, any K): common.mma takes exact ieee products, an FFMA GEMM that holds the
# fp32 operand fragments in registers next to the accumulator, so the 16-bit tiles spill (every 4-bit one,
# most dense ones). These small tiles compile clean in every mode on sm_90 and sm_80; the 64x64 and 128-row
# variants tried each spilled somewhere (4 B to 6 KB, mostly in the 4-bit decode paths). fp32 is the exact
# path, not the fast one.
FP32_GEMM_CONFIGS = [
    (64, 32, 16, 4, 3),
    (32, 64, 16, 4, 3),
    (16, 64, 16, 4, 3),
    (16, 32, 32, 4, 3),
    (32, 32, 32, 4, 3),  # the 4-bit forward reduces over K's even and odd halves apart: BLOCK_K >= 32
]
# Tiles that spill registers on one arch or Triton version only, found by tests/test_gpu_compile.py (which
# runs under triton 3.9 and 3.6 in CI), pruned there alone. `unaligned`: only when in_features is not a
# multiple of the blocksize, where the 4-bit kernels keep a scale per byte live beside the decoded halves.
TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])


class SpillPrune(NamedTuple):
    kind: str
    tile: tuple
    below_arch: Optional[int]  # applies on archs below this (None: every arch)
    below_triton: Optional[tuple]  # applies on Triton versions below this (None: every version)
    dtype_bytes: Optional[int]  # applies to this activation size only (None: any)
    dropout_only: bool
    unaligned: bool
    seen: str


SPILL_PRUNES = [
    SpillPrune("qlora_dx", (64, 128, 64, 4, 4), 90, None, None, False, False, "4 B, sm_80 (mma.sync, 255 registers)"),
    SpillPrune("qlora_dx", (128, 128, 64, 8, 3), 90, None, None, False, False, "4 B, sm_80, triton 3.9"),
    SpillPrune("qlora_fwd", (64, 128, 64, 4, 4), 90, None, None, False, False, "12-32 B, sm_80, triton 3.9 and 3.6"),
    SpillPrune("qlora_dx", (16, 64, 128, 4, 4), None, (3, 7), 2, True, False,
               "4-8 B with the dropout epilogue, sm_90, triton 3.6"),
    SpillPrune("qlora_dx", (64, 64, 64, 4, 4), 90, None, 2, False, True, "12-48 B, sm_80, triton 3.9 and 3.6"),
    SpillPrune("qlora_dx", (32, 32, 32, 4, 3), None, (3, 7), 4, False, True, "4-8 B, fp32, sm_90, triton 3.6"),
    SpillPrune("4bit_odd", (64, 64, 64, 4, 4), 90, (3, 7), 2, False, False, "8-16 B, sm_80, triton 3.6"),
    SpillPrune("4bit_odd", (32, 64, 16, 4, 3), None, (3, 7), 4, False, False,
               "4-8 B, fp32 dx, sm_90 and sm_80, triton 3.6"),
]


def spill_prune(kind, cfg, *, arch, dtype_bytes, dropout, aligned=None, triton_version=TRITON_VERSION):
    """What SPILL_PRUNES saw for this tile and launch (why it is pruned), or None. aligned=None (unknown)
    counts as not aligned."""
    for rule in SPILL_PRUNES:
        if (rule.kind == kind and rule.tile == cfg
                and (rule.below_arch is None or (arch is not None and arch < rule.below_arch))
                and (rule.below_triton is None or triton_version < rule.below_triton)
                and (rule.dtype_bytes is None or rule.dtype_bytes == dtype_bytes)
                and (dropout or not rule.dropout_only) and (not aligned or not rule.unaligned)):
            return rule.seen
    return None


# lora_grad_a spills 4-8 B on sm_80 under triton 3.6 with 64-wide rank chunks, and with 32-wide ones under
# dropout: 16-wide chunks there.
OLD_TRITON_PRE_HOPPER_RANK_BLOCK_MAX = 16
# The backward dropout epilogue keeps a second fp32 accumulator and Philox state per element: tiles with
# more than this many output elements per thread spill registers there (sm_90 compile, tests/test_gpu_compile.py).
DROPOUT_MAX_ELEMS_PER_THREAD = 32
# The GEMM epilogue walks the rank in chunks of at most this: 64-wide chunks spill 64x128 tiles at r = 64.
GEMM_RANK_BLOCK_MAX = 32
GROUP_M = 8
# The interpreter runs tiles in numpy: small tiles keep CPU tests quick and exercise multi-tile loops.
INTERPRETER_GEMM = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
INTERPRETER_LORA = dict(BLOCK_M=16, BLOCK_K=32)
# Rank kernels (LoRA down-projection, dA): memory-bound streams over x, the rank in chunks of at most
# LORA_RANK_BLOCK_MAX. fp32 (FFMA dot): LORA_CONFIG spills with 64-wide rank chunks on sm_80 and, in lora_grad_a
# with dropout's Philox state, on sm_90 too; 32-row tiles and 32-wide chunks are clean.
LORA_CONFIG = dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3)
LORA_RANK_BLOCK_MAX = 64
FP32_LORA_CONFIG = dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3)
FP32_LORA_RANK_BLOCK_MAX = 32
# Epilogue-only launch (base GEMM done by cuBLAS): a streaming read-modify-write of the output. fp32: the
# backward dropout epilogue spills 64x128 tiles on sm_80 (two fp32 accumulators and FFMA operands per
# thread), so 64x64 over the same 8 warps.
EPILOGUE_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2)
FP32_EPILOGUE_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2)
SHARED_MEMORY_LIMIT = 227 * 1024  # H100 per-block opt-in maximum

# Where "dequantize into a buffer + cuBLAS + LoRA epilogue" takes over from the one-pass kernel. The static
# Measured on an H200 (triton 3.6, torch 2.11; benchmarks/results/h200-probe-2026-11-29.md): the fused 4-bit
# forward kernel took 707 us at 8192x8192 M=1 and 23.2 ms at M=4096, against 223 us and 956 us for dequantize +
# cuBLAS (its pipeliner stages the per-element code-table gather through cp.async and shared memory). So the
# auto path decodes to a buffer at every M until the fused decode is rebuilt; LORA_KERNELS_PATH=fused forces
# the fused kernels. (The static model had predicted a crossover at M = 256-512; its SASS reading missed this.)
DEQUANT_PATH_MIN_M = 1
# The fused 4-bit forward (16-bit x) looks codes up from 16 registers (dequant.lookup16, a select tree)
# instead of gathering them per element from global memory: the gather is what the pipeliner turned into
# cp.async copies through shared memory on the H200. Counted on sm_90 SASS (triton 3.9, 128x128x64 w8 s3):
# cp.async copies 94 -> 36, selects +320. Measured on the H200 (benchmarks/results/h200-2026-11-30.md): the
# pipelined configs ran 3.5-8.2x faster than with the gather, still slower than dequantize + cuBLAS. Not in dx
# or with fp32 x: there the extra registers made 16-row and fp32 tiles spill 4-12 B.
CODE_REGS = True


def m_bucket(m: int) -> int:
    """Autotune key for M: a new batch size re-uses the tuning of its power-of-two bucket."""
    return min(8192, 1 << max(0, int(m) - 1).bit_length())


def path_setting() -> str:
    """LORA_KERNELS_PATH, checked: 'auto' (also when unset or empty), 'fused', 'dequant' or 'csrc' (the CUDA
    library's forward, M <= 16, with the Triton backward)."""
    setting = getenv("LORA_KERNELS_PATH", "auto").strip().lower() or "auto"
    if setting not in ("auto", "fused", "dequant", "csrc"):
        raise ValueError(f"LORA_KERNELS_PATH={setting!r} is not one of auto, fused, dequant, csrc")
    return setting


def choose_path(m: int, setting: Optional[str] = None) -> str:
    """'fused' (decode in the GEMM main loop) or 'dequant' (decode to a buffer, then cuBLAS), or the forced path;
    `setting` is path_setting(), read here when not given."""
    setting = path_setting() if setting is None else setting
    if setting != "auto":
        return setting
    return "dequant" if m >= DEQUANT_PATH_MIN_M else "fused"


def _smem_estimate(bm, bn, bk, stages, elem_bytes=2):
    return stages * (bm * bk + bk * bn) * elem_bytes


# Launch kinds: the generic kernel with a dense W ("dense") or a 4-bit W of odd in_features ("4bit_odd"),
# and the 4-bit kernels for even in_features, forward ("qlora_fwd") and dx ("qlora_dx").
KINDS = ("dense", "4bit_odd", "qlora_fwd", "qlora_dx")


def gemm_candidates(dtype_bytes=2, kind="dense"):
    """The GEMM config list a launch draws from: fp32, odd-K 4-bit (16-bit activations) or 16-bit."""
    if dtype_bytes == 4:
        return FP32_GEMM_CONFIGS
    if kind == "4bit_odd":
        return ODD_K_GEMM_CONFIGS
    return GEMM_CONFIGS


def all_gemm_configs():
    """Every GEMM config of any list, once each (the autotuner holds them all; pruning picks per launch)."""
    return list(dict.fromkeys(GEMM_CONFIGS + ODD_K_GEMM_CONFIGS + FP32_GEMM_CONFIGS))


def config_name(bm, bn, bk, num_warps, num_stages):
    return f"{bm}x{bn}x{bk} w{num_warps} s{num_stages}"


def gemm_configs(note=None):
    """triton.Configs of every GEMM config; `note(name)` runs before each is launched (or compiled), so a build
    error that escapes the autotuner can be pinned to its config."""
    def hook(name):
        return (lambda nargs: note(name)) if note else None

    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M), num_warps=w, num_stages=s,
                          pre_hook=hook(config_name(bm, bn, bk, w, s)))
            for bm, bn, bk, w, s in all_gemm_configs()]


def lora_config(dtype_bytes=2, arch=None):
    """(tiles with num_warps / num_stages, R_BLOCK cap) of the rank kernels for this activation size."""
    if dtype_bytes == 4:
        return dict(FP32_LORA_CONFIG), FP32_LORA_RANK_BLOCK_MAX
    if arch is not None and arch < 90 and TRITON_VERSION < (3, 7):
        return dict(LORA_CONFIG), OLD_TRITON_PRE_HOPPER_RANK_BLOCK_MAX
    return dict(LORA_CONFIG), LORA_RANK_BLOCK_MAX


def epilogue_config(dtype_bytes=2):
    """Tiles, num_warps and num_stages of the epilogue-only (BASE=0) launch for this activation size."""
    return dict(FP32_EPILOGUE_CONFIG if dtype_bytes == 4 else EPILOGUE_CONFIG)


def config_allowed(bm, bn, bk, num_warps, num_stages, *, m, kind, dtype_bytes=2, dropout=False, arch=None,
                   scale_block=None, aligned=None):
    """Whether a GEMM tile config is a candidate for this launch (the same rules the compile test checks).

    arch: the GPU's compute capability as major * 10 + minor (90 for H100), None when unknown (no
    arch-specific pruning). scale_block: for dx, the blocksize when in_features is a multiple of it: tiles at
    most that wide read one scale per row of W and step instead of one per byte (prune_for prefers them).
    aligned: whether in_features is a multiple of the blocksize (None: unknown)."""
    cfg = (bm, bn, bk, num_warps, num_stages)
    if kind == "qlora_dx" and scale_block and bn > scale_block:
        return False
    if cfg not in gemm_candidates(dtype_bytes, kind):
        return False
    if _smem_estimate(bm, bn, bk, num_stages, 4 if dtype_bytes == 4 else 2) > SHARED_MEMORY_LIMIT:
        return False
    if dropout and bm * bn > DROPOUT_MAX_ELEMS_PER_THREAD * 32 * num_warps:
        return False
    if kind == "qlora_fwd" and bk < 32:  # the forward reduces over even and odd K apart: BLOCK_K / 2 >= 16
        return False
    if spill_prune(kind, cfg, arch=arch, dtype_bytes=dtype_bytes, dropout=dropout, aligned=aligned) is not None:
        return False
    if m <= 16:
        return bm == 16
    return not (m > 256 and bm == 16)


def device_arch(t):
    """Compute capability (major * 10 + minor) of a CUDA tensor's device; None for anything else."""
    device = getattr(t, "device", None)
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def prune_for(kind):
    """The autotuner's early_config_prune for a kernel: `kind` is a KINDS entry, or "generic" (the generic
    kernel, whose BASE says dense or 4bit_odd)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        launch_kind = ("4bit_odd" if args.get("BASE") == 2 else "dense") if kind == "generic" else kind
        arch = device_arch(args.get("out_ptr", args.get("dx_ptr")))
        blocksize = 1 << args["BS_SHIFT"] if kind.startswith("qlora") else 0
        aligned = bool(blocksize) and args["K"] % blocksize == 0

        def allowed(c, scale_block):
            return config_allowed(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                  c.num_stages, m=args["M"], kind=launch_kind, dtype_bytes=args.get("DTYPE_BYTES", 2),
                                  dropout=bool(args.get("DROPOUT", False)), arch=arch,
                                  scale_block=scale_block, aligned=aligned if blocksize else None)

        keep = [c for c in configs if allowed(c, blocksize if aligned and kind == "qlora_dx" else None)]
        if not keep and aligned:  # no dx tile fits in a block (blocksize 32): per-byte scales then
            keep = [c for c in configs if allowed(c, None)]
        if not keep:
            raise RuntimeError(f"no GEMM config fits this {launch_kind} launch (M={args['M']}); configs.py needs one")
        return keep
    return prune
