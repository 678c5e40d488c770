"""GPU diagnosis: per-kernel CUDA times and host time of one qlora_linear call, and the autotuner's picks.

    python benchmarks/gpu_probe.py [--shapes 8192x8192,4096x4096] [--m 1,16,4096] [--r 16] [--path fused]

Prints torch.profiler's CUDA kernel table per case (measured) and the config each autotuned kernel chose.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lora_kernels.ops import fused_linear_kernels as fk  # noqa: E402
from lora_kernels.ops.fused_linear import qlora_linear  # noqa: E402
from csrc.bench_decode import quant_state_of, random_quant  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x8192,4096x4096")
    ap.add_argument("--m", default="1,16,4096")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--path", default="fused")
    ap.add_argument("--sweep", default="", help="NxKxM cases: time every 16-bit GEMM config of the 4-bit forward")
    ap.add_argument("--dump", default="", help="folder for the cubins of the swept kernels")
    ap.add_argument("--configs", default="", help="sweep only these, e.g. 16x64x128w4s2,128x128x64w8s1")
    ap.add_argument("--code", default="regs,gather", help="the forward's code lookups to sweep (configs.CODE_REGS)")
    ap.add_argument("--host", default="", help="NxKxM: cProfile of the host side of 200 calls")
    ap.add_argument("--dequant", default="", help="NxK list: bitsandbytes' and our dequantize timed")
    ap.add_argument("--fwdbwd", default="", help="NxKxM: CUDA kernel table and host time of forward+backward")
    ap.add_argument("--pieces", default="", help="NxKxM: host time of each layer of one call (small GPU work)")
    args = ap.parse_args()
    for part, fn in (("pieces", pieces), ("fwdbwd", fwd_bwd), ("host", host_profile), ("dequant", dequant_times), ("sweep", sweep)):
        if getattr(args, part):
            try:
                fn(args)
            except Exception:  # noqa: BLE001 - a probe reports and goes on to the next part
                import traceback
                traceback.print_exc()
    if args.sweep or args.host or args.dequant or args.pieces or args.fwdbwd:
        return
    os.environ["LORA_KERNELS_PATH"] = args.path
    from torch.profiler import ProfilerActivity, profile
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        q = random_quant(n, k)
        state = quant_state_of(q)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a = torch.randn(args.r, k, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, args.r, device="cuda", dtype=torch.bfloat16)
            for _ in range(3):
                qlora_linear(x, q.packed, state, a, b, 0.5)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                qlora_linear(x, q.packed, state, a, b, 0.5)
            host = (time.perf_counter() - t0) / 20 * 1e6
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 20 * 1e6
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    qlora_linear(x, q.packed, state, a, b, 0.5)
                torch.cuda.synchronize()
            print(f"=== {n}x{k} M={m} r={args.r} path={args.path}: host {host:.1f} us/call, wall {wall:.1f} us/call")
            for ev in prof.key_averages():
                if ev.device_time_total > 0:
                    print(f"  {ev.key[:70]:70s} calls {ev.count:3d}  avg {ev.device_time_total / ev.count:9.1f} us")
    for name in ("_qlora_fwd_tuned", "_qlora_dx_tuned", "_fused_linear_tuned"):
        tuned = getattr(fk, name, None)
        for key, cfg in getattr(tuned, "cache", {}).items():
            print(f"{name} key={key} -> {cfg}")


def _layer(nxkxm, r):
    """(n, k, m, random nested 4-bit W, its quant state, x, A, B) on the GPU, bf16, for an NxKxM string."""
    n, k, m = (int(v) for v in nxkxm.split("x"))
    q = random_quant(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
    return n, k, m, q, quant_state_of(q), x, a, b


def _host_us(fn, calls=100):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / calls * 1e6


def fwd_bwd(args):
    """Kernel table (torch.profiler, 10 steps) and host/wall time of one forward + backward, path auto."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.pop("LORA_KERNELS_PATH", None)
    n, k, m = (int(v) for v in args.fwdbwd.split("x"))
    q = random_quant(n, k)
    state = quant_state_of(q)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(args.r, k, device="cuda", dtype=torch.float32, requires_grad=True)
    b = (torch.randn(n, args.r, device="cuda", dtype=torch.float32) / 10).requires_grad_(True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step():
        qlora_linear(x, q.packed, state, a, b, 0.5).backward(dy)

    host, wall = _host_us(step, calls=20)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(f"=== fwd+bwd {n}x{k} M={m} r={args.r} auto: host {host:.1f} us, wall {wall:.1f} us per step", flush=True)
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if ev.device_time_total > 0:
            print(f"  {ev.key[:70]:70s} calls {ev.count:3d}  avg {ev.device_time_total / ev.count:9.1f} us")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
    os.environ["LORA_KERNELS_PATH"] = args.path


def pieces(args):
    """Host microseconds per call of each layer under qlora_linear, innermost first (GPU work kept small so
    that the host is what is timed); 'wall' includes waiting for the GPU at the end."""
    from lora_kernels.ops import fused_linear as fl

    n, k, m, q, state, x, a, b = _layer(args.pieces, args.r)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    xa = fk.launch_lora_down(x, a, 0.0, 0)

    @torch.library.custom_op("lk_probe::ident", mutates_args=())
    def ident(t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    captured = {}
    real_fwd = fl._forward_triton

    def spy(*a_, **k_):
        captured["args"] = a_
        return real_fwd(*a_, **k_)

    fl._forward_triton = spy
    qlora_linear(x, q.packed, state, a, b, 0.5)
    fl._forward_triton = real_fwd
    fargs = captured["args"]
    seed = torch.zeros((), dtype=torch.int64)
    cases = [
        ("torch clone", lambda: x.clone()),
        ("custom op clone", lambda: ident(x)),
        ("launch_lora_down", lambda: fk.launch_lora_down(x, a, 0.0, 0)),
        ("launch_qlora_fwd (autotuned)", lambda: fk.launch_qlora_fwd(x, q, out, xa=xa, b=b, scaling=0.5)),
        ("launch_fused_linear epilogue", lambda: fk.launch_fused_linear(x, None, (0, 0), fk.BASE_NONE, out,
                                                                         acc_in=True, left=xa, right=b,
                                                                         right_strides=(b.stride(1), b.stride(0)),
                                                                         scaling=0.5)),
        ("_forward_triton fused", lambda: real_fwd(*fargs)),
        ("torch.ops linear_fwd", lambda: torch.ops.lora_kernels.linear_fwd(*fargs[:9], seed)),
        ("qlora_linear no_grad", lambda: qlora_linear(x, q.packed, state, a, b, 0.5)),
    ]
    _print_pieces(n, k, m, cases, "fused")
    a.requires_grad_(True)
    host, wall = _host_us(lambda: qlora_linear(x, q.packed, state, a, b, 0.5))
    print(f"  pieces {n}x{k} M={m}: {'qlora_linear, lora_A grad':32s} host {host:8.1f} us  wall {wall:8.1f} us")
    _print_pieces(n, k, m, [("qlora_linear dequant path", lambda: qlora_linear(x, q.packed, state, a, b, 0.5))],
                  "dequant")
    csrc_pieces(n, k, m, q, state, x, a, b)  # the csrc path's whole call is its last pieces
    os.environ["LORA_KERNELS_PATH"] = args.path


def csrc_pieces(n, k, m, q, state, x, a, b):
    """Host time of each piece of a no-grad decode call on the csrc path, innermost first, with fp32 adapters
    (PEFT's default): where the op's time beyond the kernel goes on this host."""
    from lora_kernels import csrc
    from lora_kernels.nf4 import read_quant_state

    if not csrc.available():
        print(f"  pieces: csrc path: {csrc.status()['reason']}", flush=True)
        return
    a32, b32 = a.float(), b.float()
    xa, out = torch.mm(x, a.t()), torch.empty(m, n, device="cuda", dtype=x.dtype)
    cases = [
        ("csrc: current stream", lambda: csrc._current_stream(x.device)),
        ("csrc: read_quant_state", lambda: read_quant_state(q.packed, state)),
        ("csrc: torch.empty(out)", lambda: torch.empty(m, n, device="cuda", dtype=x.dtype)),
        ("csrc: fp32 A, B to bf16 (2 casts)", lambda: (a32.to(x.dtype), b32.to(x.dtype))),
        ("csrc: xa = x A^T (cuBLAS)", lambda: torch.mm(x, a.t())),
        ("csrc: argument checks only", lambda: csrc._decode_args(x, q, xa, b, None, 0.5, out, False, None)),
        ("csrc: linear_decode_fwd", lambda: csrc.linear_decode_fwd(x, q, xa, b, None, 0.5, out=out)),
        ("csrc: qlora_linear, bf16 A, B", lambda: qlora_linear(x, q.packed, state, a, b, 0.5)),
        ("csrc: qlora_linear, fp32 A, B", lambda: qlora_linear(x, q.packed, state, a32, b32, 0.5)),
    ]
    _print_pieces(n, k, m, cases, "csrc")


def _print_pieces(n, k, m, cases, path):
    """Host and wall time per call of each (label, fn), without grad, on LORA_KERNELS_PATH=path."""
    os.environ["LORA_KERNELS_PATH"] = path
    for label, fn in cases:
        with torch.no_grad():
            host, wall = _host_us(fn)
        print(f"  pieces {n}x{k} M={m}: {label:32s} host {host:8.1f} us  wall {wall:8.1f} us", flush=True)


def host_profile(args):
    """Where the host time of one qlora_linear call goes (cProfile, 200 calls, GPU work small)."""
    import cProfile
    import pstats

    n, k, m, q, state, x, a, b = _layer(args.host, args.r)
    for path in ("fused", "dequant"):
        os.environ["LORA_KERNELS_PATH"] = path
        for _ in range(5):
            qlora_linear(x, q.packed, state, a, b, 0.5)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(200):
            qlora_linear(x, q.packed, state, a, b, 0.5)
        prof.disable()
        host = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        print(f"=== host profile {n}x{k} M={m} path={path}: {host:.1f} us/call (profiled)", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        t0 = time.perf_counter()
        for _ in range(200):
            qlora_linear(x, q.packed, state, a, b, 0.5)
        print(f"    unprofiled host {(time.perf_counter() - t0) / 200 * 1e6:.1f} us/call", flush=True)
        torch.cuda.synchronize()
    os.environ["LORA_KERNELS_PATH"] = args.path


def dequant_times(args):
    """bitsandbytes' CUDA dequantize_4bit beside ours (L2 flushed), per NxK."""
    import bitsandbytes.functional as bnbf
    from csrc.bench_decode import timed
    from lora_kernels.ops.dequant import dequantize_4bit_triton

    for shape in args.dequant.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        packed, st = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        from lora_kernels.nf4 import read_quant_state
        q = read_quant_state(packed, st)
        ours = dequantize_4bit_triton(q, torch.bfloat16)
        ref = bnbf.dequantize_4bit(packed, st)
        print(f"=== dequant {n}x{k}: bnb {timed(lambda: bnbf.dequantize_4bit(packed, st)):.1f} us, "
              f"ours {timed(lambda: dequantize_4bit_triton(q, torch.bfloat16)):.1f} us, "
              f"equal {torch.equal(ours, ref)}", flush=True)


def sweep(args):
    """Each GEMM config of the 4-bit forward timed alone (CUDA events, L2 flushed), with the compiled kernel's
    registers, spills and shared memory; bitsandbytes-free dequantize + cuBLAS and cuBLAS bf16 beside."""
    from csrc.bench_decode import timed
    from lora_kernels.ops import configs
    from lora_kernels.ops.dequant import dequantize_4bit_triton

    compiled = {}
    real = fk._launch_gemm

    def capture(kernel, tuned, grid, a, flags, config):
        compiled["last"] = kernel[grid](*a, **flags, **config)

    fk._launch_gemm = capture
    code_regs = configs.CODE_REGS
    for case in args.sweep.split(","):
        n, k, m = (int(v) for v in case.split("x"))
        q = random_quant(n, k)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        print(f"=== sweep {n}x{k} M={m}: cublas bf16 {timed(lambda: torch.mm(x, w.t())):.1f} us, "
              f"dequant+cublas {timed(lambda: torch.mm(x, dequantize_4bit_triton(q, torch.bfloat16).t())):.1f} us", flush=True)
        chosen = configs.GEMM_CONFIGS
        if args.configs:
            import re
            chosen = [tuple(int(v) for v in re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", c).groups())
                      for c in args.configs.split(",")]
        for (bm, bn, bk, wn, st), code in ((c, code) for c in chosen for code in args.code.split(",")):
            configs.CODE_REGS = code == "regs"
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=wn, num_stages=st)
            try:
                fk.launch_qlora_fwd(x, q, out, config=cfg)
                kern = compiled["last"]
                us = timed(lambda: fk.launch_qlora_fwd(x, q, out, config=cfg), reps=10)
            except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
                print(f"  {bm}x{bn}x{bk} w{wn} s{st} {code}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            name = f"fwd_{n}x{k}_m{m}_{bm}x{bn}x{bk}w{wn}s{st}_{code}"
            print(f"  {bm}x{bn}x{bk} w{wn} s{st} {code:6s}: {us:9.1f} us  regs {kern.n_regs} spills {kern.n_spills} "
                  f"shared {kern.metadata.shared}", flush=True)
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                with open(os.path.join(args.dump, name + ".cubin"), "wb") as f:
                    f.write(kern.asm["cubin"])
                with open(os.path.join(args.dump, name + ".ttgir"), "w") as f:
                    f.write(kern.asm.get("ttgir", ""))
    fk._launch_gemm = real
    configs.CODE_REGS = code_regs


if __name__ == "__main__":
    main()
