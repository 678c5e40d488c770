"""Compile the package's Triton kernels for sm_90 / sm_80 on a CPU machine (helper of test_gpu_compile.py).

`cases()` lists every (kernel, launch mode, dtype, autotune config, arch) the package can launch: pure data,
importing no kernel. `python tests/_gpu_compile.py CASE_ID...` (or `-` and a JSON list on stdin; nothing:
all cases) compiles the cases with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) in a
pool of worker processes (GPU_COMPILE_WORKERS, default 2) and prints one JSON line per case: metadata.shared,
ptxas -v's spill stores/loads, registers and stack/local bytes from the bundled cuobjdump
(--dump-resource-usage), and the tensor-core instruction counts of its SASS (--dump-sass).

It must run where TRITON_INTERPRET is unset, so that triton.jit hands back real JITFunctions; the test
starts it as a subprocess with a clean environment and a fresh TRITON_CACHE_DIR.

Arguments are specialized the way triton 3.9's launcher specializes a realistic launch: pointers aligned
to 16 bytes get tt.divisibility=16, an int equal to 1 becomes a constexpr 1, an int divisible by 16 gets
tt.divisibility=16, other ints are plain i32, floats fp32 (never specialized).
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora_kernels.ops import configs  # noqa: E402  (data only: no kernel is defined there)

# Per-block opt-in shared memory maxima: H100 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
ARCHS = {90: 227 * 1024, 80: 163 * 1024}
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
BASE_NONE, BASE_DENSE, BASE_4BIT = 0, 1, 2  # fused_linear_kernels.BASE_*, not imported (that defines kernels)

# A realistic launch: a Llama-sized square projection, blocksize 64, LoRA rank 64 (GEMM epilogue chunk
# R_BLOCK = configs.GEMM_RANK_BLOCK_MAX), dropout seeds that are neither 1 nor a multiple of 16.
N = K = 4096
K_ODD = 4095
K_UNALIGNED = 4064  # even, not a multiple of BLOCKSIZE
R = 64
SEED = 12347
BLOCKSIZE = 64
# M values whose buckets cover every pruning rule of configs.config_allowed (M <= 16, up to 256, above).
M_BUCKETS = (1, 16, 256, 512, 8192)


class Ptr:
    def __init__(self, dtype):
        self.dtype = dtype


def _rank_block(r, cap):
    """common.rank_block, which this module does not import (common.py defines jit functions)."""
    return min(cap, max(16, 1 << max(0, r - 1).bit_length()))


def _gemm_args(mode, base, dt, m):
    """Positional args of _fused_linear_kernel as launch_fused_linear passes them, and its flags."""
    fwd = mode.startswith("fwd")
    odd = "oddK" in mode
    k = K_ODD if odd else K
    dropout = mode.startswith("bwd") and "nodrop" not in mode
    red, n_out = (k, N) if fwd else (N, k)
    if base == BASE_4BIT:
        w, w_strides, code, scales = Ptr("u8"), ((1, k) if fwd else (k, 1)), Ptr("fp32"), Ptr("fp32")
    elif base == BASE_DENSE:  # weight [N, K] contiguous
        w, w_strides, code, scales = Ptr(dt), ((1, k) if fwd else (k, 1)), Ptr(dt), Ptr(dt)
    else:  # epilogue only: w, code, scales are the output as dummies
        w, w_strides, code, scales = Ptr(dt), (0, 0), Ptr(dt), Ptr(dt)
    right_strides = (1, R) if fwd else (k, 1)  # B^T of B [N, R] / A [R, K]
    has_bias = fwd
    args = [
        Ptr(dt), red, 1,
        w, *w_strides,
        code, scales,
        Ptr(dt), R, 1,
        Ptr(dt), *right_strides,
        Ptr(dt),
        Ptr(dt), n_out, 1,
        m, n_out, red, R, configs.m_bucket(m), DTYPES[dt],
        0.25, 0.1 if dropout else 0.0, SEED if dropout else 0,
    ]
    flags = dict(BASE=base, HAS_LORA=True, HAS_BIAS=has_bias, ACC_IN=base == BASE_NONE, DROPOUT=dropout,
                 UPCAST=False, R_BLOCK=_rank_block(R, configs.GEMM_RANK_BLOCK_MAX),
                 BS_SHIFT=BLOCKSIZE.bit_length() - 1 if base == BASE_4BIT else 0)
    return args, flags


def _weight_ptrs(aligned):
    """packed, code, absmax, code2, absmax2, offset of a double-quantized weight (bitsandbytes' QLoRA default) as
    launch_qlora_* pass it: decoded in the kernel when K is blocksize-aligned, else fp32 scales from the host."""
    if aligned:
        return [Ptr("u8"), Ptr("fp32"), Ptr("u8"), Ptr("fp32"), Ptr("fp32"), Ptr("fp32")]
    return [Ptr("u8"), Ptr("fp32")] + [Ptr("fp32")] * 4


def _qlora_fwd_args(mode, dt, m, tile):
    """_qlora_fwd_kernel as launch_qlora_fwd passes it: 16-bit x as int32 K pairs. 'unaligned': an even K that
    is not a multiple of the blocksize (a scale per byte)."""
    k = K_UNALIGNED if "unaligned" in mode else K
    pairs = DTYPES[dt] == 2
    x, sxm = (Ptr("i32"), k // 2) if pairs else (Ptr(dt), k)
    aligned = k % BLOCKSIZE == 0
    args = [x, sxm, 1, *_weight_ptrs(aligned), Ptr(dt), R, 1, Ptr(dt), R, 1, Ptr(dt), Ptr(dt), N, 1,
            m, N, k, R, configs.m_bucket(m), DTYPES[dt], 0.25]
    flags = dict(HAS_LORA=True, HAS_BIAS=True, NESTED=aligned, BS_SHIFT=BLOCKSIZE.bit_length() - 1, BS2=256,
                 ROW_SCALE=aligned, SUB_K=min(tile["BLOCK_K"], BLOCKSIZE if aligned else 32),
                 X_PAIRS=pairs, UPCAST=False, R_BLOCK=_rank_block(R, configs.GEMM_RANK_BLOCK_MAX),
                 CODE_REGS=configs.CODE_REGS and pairs)
    return args, flags


def _qlora_dx_args(mode, dt, m, tile):
    """_qlora_dx_kernel as launch_qlora_dx passes it (dropout on unless 'nodrop')."""
    k = K_UNALIGNED if "unaligned" in mode else K
    dropout = "nodrop" not in mode
    aligned = k % BLOCKSIZE == 0
    args = [Ptr(dt), N, 1, *_weight_ptrs(aligned), Ptr(dt), R, 1, Ptr(dt), k, 1, Ptr(dt), k, 1,
            m, N, k, R, configs.m_bucket(m), DTYPES[dt], 0.25, 0.1 if dropout else 0.0, SEED if dropout else 0]
    flags = dict(HAS_LORA=True, DROPOUT=dropout, NESTED=aligned, BS_SHIFT=BLOCKSIZE.bit_length() - 1, BS2=256,
                 ROW_SCALE=k % BLOCKSIZE == 0 and tile["BLOCK_N"] <= BLOCKSIZE, UPCAST=False,
                 R_BLOCK=_rank_block(R, configs.GEMM_RANK_BLOCK_MAX))
    return args, flags


# (kernel, mode, launch kind): the generic kernel's modes as before (fwd, fwd-M1 = decode at M = 1 with M and
# M_BUCKET specialized to constexpr 1, bwd with dropout, bwd-nodrop, *-oddK = odd in_features); the 4-bit
# kernels for even in_features, forward and dx, K aligned to the blocksize or not.
GEMM_MODES = [
    ("fused_linear/dense", "fwd", "dense"), ("fused_linear/dense", "fwd-M1", "dense"),
    ("fused_linear/dense", "bwd", "dense"), ("fused_linear/dense", "bwd-nodrop", "dense"),
    ("fused_linear/4bit", "fwd-oddK", "4bit_odd"), ("fused_linear/4bit", "bwd-oddK", "4bit_odd"),
    ("fused_linear/4bit", "bwd-nodrop-oddK", "4bit_odd"),
    ("qlora_fwd", "fwd", "qlora_fwd"), ("qlora_fwd", "fwd-M1", "qlora_fwd"), ("qlora_fwd", "fwd-unaligned", "qlora_fwd"),
    ("qlora_dx", "bwd", "qlora_dx"), ("qlora_dx", "bwd-nodrop", "qlora_dx"), ("qlora_dx", "bwd-unaligned", "qlora_dx"),
]
EPILOGUE_MODES = ["epi-fwd", "epi-bwd"]


def _config_str(d, warps, stages):
    return "x".join(str(d[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in d) + f" w{warps} s{stages}"


def cases():
    out = []

    def add(kernel, mode, dt, cfg, arch, args, constexprs, warps, stages, tc):
        out.append(dict(id=f"{kernel}-{mode}-{dt}-{cfg}-sm{arch}".replace(" ", "-"), kernel=kernel, mode=mode,
                        dtype=dt, config=cfg, arch=arch, args=_encode(args), constexprs=constexprs,
                        num_warps=warps, num_stages=stages, tensor_core=tc))

    for arch in ARCHS:
        for dt in DTYPES:
            def tc(block_m):
                """Tensor-core instructions the SASS must hold for an MMA of block_m rows: Hopper's HGMMA
                (warpgroup MMA, needs 64 rows) or at least HMMA on sm_90, HMMA on sm_80. fp32 operands take exact (ieee) products by design
                (common.mma): "none", no tensor-core instruction at all."""
                if dt == "fp32":
                    return "none"
                if arch >= 90:
                    return "HGMMA" if block_m >= 64 else "any"
                return "HMMA"

            for kernel, mode, kind in GEMM_MODES:
                for bm, bn, bk, w, s in configs.all_gemm_configs():
                    m = 1 if mode == "fwd-M1" else 16 if bm == 16 else 512
                    tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=configs.GROUP_M)
                    if kind == "qlora_fwd":
                        args, flags = _qlora_fwd_args(mode, dt, m, tile)
                        mma_rows = bn  # the GEMM runs transposed: W's rows fill the MMA's M side
                    elif kind == "qlora_dx":
                        args, flags = _qlora_dx_args(mode, dt, m, tile)
                        mma_rows = bm
                    else:
                        args, flags = _gemm_args(mode, BASE_DENSE if kind == "dense" else BASE_4BIT, dt, m)
                        mma_rows = bm
                    # The autotuner's pruning, over every M bucket: a config is compiled when some M uses it.
                    aligned = ("unaligned" not in mode) if kind.startswith("qlora") else None
                    if not any(configs.config_allowed(bm, bn, bk, w, s, m=mm, kind=kind, dtype_bytes=DTYPES[dt],
                                                      dropout=flags["DROPOUT"] if "DROPOUT" in flags else False,
                                                      arch=arch, aligned=aligned)
                               for mm in ((1,) if m == 1 else M_BUCKETS)):
                        continue
                    add(kernel, mode, dt, _config_str(tile, w, s), arch, args, {**flags, **tile}, w, s, tc(mma_rows))
            e = configs.epilogue_config(DTYPES[dt])
            w, s = e.pop("num_warps"), e.pop("num_stages")
            for mode in EPILOGUE_MODES:
                args, flags = _gemm_args(mode[4:], BASE_NONE, dt, 512)
                add("fused_linear/epilogue", mode, dt, _config_str(e, w, s), arch, args, {**flags, **e}, w, s,
                    tc(e["BLOCK_M"]))
            lc, cap = configs.lora_config(DTYPES[dt], arch)
            w, s = lc.pop("num_warps"), lc.pop("num_stages")
            for rb in sorted({_rank_block(r, cap) for r in (16, 64)}):  # R_BLOCK: 16 and the cap (64, or less)
                r = rb if rb < cap else 64
                for dropout in (False, True):
                    mode = f"R_BLOCK={rb}" + (" drop" if dropout else "")
                    p, seed = (0.1, SEED) if dropout else (0.0, 0)
                    flags = dict(DROPOUT=dropout, UPCAST=False, R_BLOCK=rb, **lc)
                    rank_tc = "none" if dt == "fp32" else "any" if arch >= 90 else "HMMA"
                    # whole K (M = 4096: xa in x's dtype), and split over K (M = 1: fp32 partial sums)
                    down = [Ptr(dt), K, 1, Ptr(dt), K, 1, Ptr(dt), 4096 * r, r, 1, 4096, K, r, K, p, seed]
                    add("lora_down", mode, dt, _config_str(lc, w, s), arch, down, flags, w, s, rank_tc)
                    down = [Ptr(dt), K, 1, Ptr(dt), K, 1, Ptr("fp32"), r, r, 1, 1, K, r, 64, p, seed]
                    add("lora_down", mode + " split-K", dt, _config_str(lc, w, s), arch, down, flags, w, s, rank_tc)
                    grad_a = [Ptr(dt), r, 1, Ptr(dt), K, 1, Ptr("fp32"), 4096, K, r, 1024, p, seed]
                    add("lora_grad_a", mode, dt, _config_str(lc, w, s), arch, grad_a, flags, w, s, rank_tc)
            for nested in (True, False):
                scales = [Ptr("u8"), Ptr("fp32"), Ptr("fp32"), Ptr("fp32")] if nested else [Ptr("fp32")] * 4
                deq = [Ptr("u8"), Ptr("fp32"), *scales, Ptr(dt), N * K, BLOCKSIZE.bit_length() - 1]
                add("dequantize_4bit", "nested" if nested else "fp32-absmax", dt, "1024 w4 s3", arch, deq,
                    dict(NESTED=nested, BS2=256 if nested else 1, BLOCK=1024), 4, 3, None)
    return out


def _encode(args):
    return [["ptr", a.dtype] if isinstance(a, Ptr) else a for a in args]


def specialize(fn, args, constexprs):
    """signature / constexprs / attrs for ASTSource, as triton's launcher derives them from these values."""
    names = fn.arg_names
    runtime = [n for n in names if n not in constexprs]
    if len(runtime) != len(args):
        raise ValueError(f"{fn.__name__}: {len(args)} args for {len(runtime)} runtime parameters {runtime}")
    signature, consts, attrs = {}, dict(constexprs), {}
    div16 = [["tt.divisibility", 16]]
    for name, a in zip(runtime, args):
        idx = (names.index(name),)
        if isinstance(a, list):  # pointer, 16-byte aligned
            signature[name] = "*" + a[1]
            attrs[idx] = div16
        elif isinstance(a, bool):
            signature[name] = "u1"
        elif isinstance(a, int):
            if a == 1:
                signature[name] = "constexpr"
                consts[name] = 1
                continue
            signature[name] = "i32" if -2**31 <= a < 2**31 else "i64"
            if a % 16 == 0:
                attrs[idx] = div16
        elif isinstance(a, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: {a!r}")
    for name in constexprs:
        signature[name] = "constexpr"
    signature = {n: signature[n] for n in names}  # in parameter order
    return signature, consts, attrs


def _kernel(name):
    from lora_kernels.ops import dequant, fused_linear_kernels as flk

    fn = {"lora_down": flk._lora_down_kernel, "lora_grad_a": flk._lora_grad_a_kernel,
          "dequantize_4bit": dequant._dequantize_4bit_kernel, "qlora_fwd": flk._qlora_fwd_kernel,
          "qlora_dx": flk._qlora_dx_kernel}.get(name, flk._fused_linear_kernel)
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and isinstance(getattr(fn, "fn", None), (JITFunction,)):
        fn = fn.fn  # an Autotuner (or heuristics) wraps the JITFunction

    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{name} is a {type(fn).__name__}, not a JITFunction: is TRITON_INTERPRET set?")
    return fn


TOOLS = Path(__import__("importlib.util").util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin"
SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump(flag, cubin_path):
    return subprocess.run([str(TOOLS / "cuobjdump"), flag, cubin_path], check=True, capture_output=True,
                          text=True).stdout


def build(case):
    """(compiled kernel, ptxas -v log, cuobjdump --dump-resource-usage text, --dump-sass text) of one case;
    raises what triton.compile raises. compile_case and benchmarks/static_model.py read this."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log = io.StringIO()
    fn = _kernel(case["kernel"])
    sig, consts, attrs = specialize(fn, case["args"], case["constexprs"])
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    with contextlib.redirect_stdout(log):  # triton prints ptxas -v's log there
        k = triton.compile(src, target=GPUTarget("cuda", case["arch"], 32),
                           options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        usage = _cuobjdump("--dump-resource-usage", f.name)
        sass = _cuobjdump("--dump-sass", f.name)
    finally:
        os.remove(f.name)
    return k, log.getvalue(), usage, sass


def compile_case(case):
    res = dict(id=case["id"], ok=False, error=None)
    t0 = time.perf_counter()
    try:
        k, log, usage_text, sass = build(case)
    except Exception as e:  # noqa: BLE001  the failure is the result
        msg = f"{type(e).__name__}: {e}"
        res["error"] = msg[:2000]
        return res
    res["shared"] = int(k.metadata.shared)
    usage = RES_RE.search(usage_text)
    if usage is None:
        res["error"] = "no REG/STACK/LOCAL line in cuobjdump --dump-resource-usage"
        return res
    res["regs"], res["stack"], res["cubin_shared"], res["local"] = map(int, usage.groups())
    ops = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass, re.M)
    spill = SPILL_RE.search(log)
    if spill is None:
        res["error"] = "no spill line in ptxas -v's log (TRITON_DUMP_PTXAS_LOG)"
        return res
    res["spill_stores"], res["spill_loads"] = int(spill.group(1)), int(spill.group(2))
    res["hgmma"] = sum(op == "HGMMA" for op in ops)
    res["hmma"] = sum(op == "HMMA" for op in ops)
    res["ffma"] = sum(op == "FFMA" for op in ops)
    res["ok"] = True
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _cost(case):
    """Rough compile seconds on one CPU core (the 4-bit decode GEMMs take longest)."""
    return {"fused_linear/4bit": 2.5, "qlora_fwd": 2.5, "qlora_dx": 2.5, "fused_linear/dense": 1.5}.get(case["kernel"], 1.0)


def main(ids):
    by_id = {c["id"]: c for c in cases()}
    if ids == ["-"]:
        ids = json.load(sys.stdin)
    todo = [by_id[i] for i in ids] if ids else list(by_id.values())
    todo.sort(key=_cost, reverse=True)  # longest first: the workers end at about the same time
    workers = int(os.environ.get("GPU_COMPILE_WORKERS", "2"))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for res in pool.map(compile_case, todo, chunksize=1):
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("TRITON_INTERPRET=1: the kernels would be interpreted functions, not JITFunctions")
    main(sys.argv[1:])
