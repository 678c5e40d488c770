"""Launch configurations in one place: autotune candidates per kernel, interpreter tiles, path dispatch.

Candidates are pruned by the M bucket (no 128-row tiles for decode-sized M) and by a shared-memory
estimate; tests/test_gpu_compile.py compiles every candidate for sm_90 and sm_80 on CPU and checks that
each builds, fits in shared memory, does not spill and uses tensor cores.
"""
import os

import triton

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
GEMM_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 128, 64, 4, 4),
]
# The backward dropout epilogue keeps a second fp32 accumulator and Philox state per element: tiles with
# more than this many output elements per thread spill registers there (sm_90 compile, tests/test_gpu_compile.py).
DROPOUT_MAX_ELEMS_PER_THREAD = 32
# The GEMM epilogue walks the rank in chunks of at most this: 64-wide chunks spill 64x128 tiles at r = 64.
GEMM_RANK_BLOCK_MAX = 32
GROUP_M = 8
# The interpreter runs tiles in numpy: small tiles keep CPU tests quick and exercise multi-tile loops.
INTERPRETER_GEMM = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
INTERPRETER_LORA = dict(BLOCK_M=16, BLOCK_K=32)
# Rank kernels (LoRA down-projection, dA): memory-bound streams over x.
LORA_CONFIG = dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3)
# Epilogue-only launch (base GEMM done by cuBLAS): a streaming read-modify-write of the output.
EPILOGUE_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2)
SHARED_MEMORY_LIMIT = 227 * 1024  # H100 per-block opt-in maximum

# Where "dequantize into a buffer + cuBLAS + LoRA epilogue" takes over from the one-pass kernel.
# Not yet measured on a GPU: a placeholder until the benchmark sweep sets it (issue #4).
DEQUANT_PATH_MIN_M = 2048


def m_bucket(m: int) -> int:
    """Autotune key for M: a new batch size re-uses the tuning of its power-of-two bucket."""
    return min(8192, 1 << max(0, int(m) - 1).bit_length())


def choose_path(m: int) -> str:
    """'fused' (decode in the GEMM main loop) or 'dequant' (decode to a buffer, then cuBLAS)."""
    forced = os.environ.get("LORA_KERNELS_PATH", "auto").strip().lower()
    if forced in ("fused", "dequant"):
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"LORA_KERNELS_PATH={forced!r} is not one of auto, fused, dequant")
    return "dequant" if m >= DEQUANT_PATH_MIN_M else "fused"


def _smem_estimate(bm, bn, bk, stages, elem_bytes=2):
    return stages * (bm * bk + bk * bn) * elem_bytes


def gemm_configs():
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in GEMM_CONFIGS]


def config_allowed(bm, bn, bk, num_warps, num_stages, *, m, dtype_bytes=2, dropout=False, paired=True, base=2):
    """Whether a GEMM tile config is a candidate for this launch (the same rules the compile test checks)."""
    if _smem_estimate(bm, bn, bk, num_stages, 4 if dtype_bytes == 4 else 2) > SHARED_MEMORY_LIMIT:
        return False
    if dropout and bm * bn > DROPOUT_MAX_ELEMS_PER_THREAD * 32 * num_warps:
        return False
    if base == 2 and not paired and bk > 64:  # the per-element decode of an odd K spills with deep K tiles
        return False
    if m <= 16:
        return bm == 16
    return not (m > 256 and bm == 16)


def prune_gemm_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    keep = [c for c in configs
            if config_allowed(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                              c.num_stages, m=args["M"], dtype_bytes=args.get("DTYPE_BYTES", 2),
                              dropout=bool(args.get("DROPOUT", False)), paired=bool(args.get("PAIRED", True)),
                              base=args.get("BASE", 2))]
    if not keep:
        raise RuntimeError(f"no GEMM config fits this launch (M={args['M']}); configs.py needs a candidate for it")
    return keep
