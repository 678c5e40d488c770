"""Times the csrc decode kernel on a GPU beside the Triton fused path and dense cuBLAS bf16.

    python csrc/bench_decode.py [--shapes 8192x8192,4096x14336,14336x4096,1024x4096] [--m 1,16] [--r 16]
                                [--warps-sweep 8192x8192] [--csv FILE]

For a GPU session: needs lora_kernels/_csrc*.so (built on a CPU machine and carried over) and CUDA.
Weights are random 4-bit data (no bitsandbytes needed). Each time is the median of CUDA-event timings
with the L2 flushed before every run; "floor" is the packed weight + scales + activations at the
device's datasheet bandwidth (--bw, TB/s). csrc_* columns are the kernel alone (xa given), by decode
(shared table, register table, exact) and with one 16-row tile per warp; op_csrc, op_triton and op_auto are
the whole qlora_linear call (rank kernel included) with the csrc forward (its default decode), with
LORA_KERNELS_PATH=fused and with the default path. --warps-sweep times the shared and exact kernels at
every fixed warps-per-CTA count for those shapes. Prints one row per case; measured, never predicted.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lora_kernels import csrc  # noqa: E402
from lora_kernels.ops.fused_linear import qlora_linear  # noqa: E402
from lora_kernels.nf4 import Quant4bit  # noqa: E402


def random_quant(n, k, blocksize=64):
    """Random nested 4-bit weight (as tests/test_csrc_gpu.py makes them), on the GPU."""
    g = torch.Generator().manual_seed(0)
    blocks = -(-(n * k) // blocksize)
    code = torch.sort(torch.rand(16, generator=g) * 2 - 1).values
    return Quant4bit(packed=torch.randint(0, 256, ((n * k + 1) // 2,), generator=g, dtype=torch.uint8).cuda(),
                     code=code.cuda(), absmax=torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8).cuda(),
                     blocksize=blocksize, shape=(n, k), dtype=torch.bfloat16, quant_type="nf4",
                     code2=torch.sort(torch.rand(256, generator=g) * 2 - 1).values.cuda(),
                     absmax2=(torch.rand(-(-blocks // 256), generator=g) * 0.05 + 0.01).cuda(),
                     offset=torch.tensor(0.04).cuda(), blocksize2=256)


def quant_state_of(q):
    """The attributes of bitsandbytes' QuantState that lora_kernels reads."""
    from types import SimpleNamespace

    state2 = SimpleNamespace(code=q.code2, absmax=q.absmax2, blocksize=q.blocksize2)
    return SimpleNamespace(quant_type="nf4", shape=torch.Size(q.shape), blocksize=q.blocksize, code=q.code,
                           absmax=q.absmax, nested=True, state2=state2, offset=q.offset, dtype=torch.bfloat16)


def timed(fn, reps=50):
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x8192,4096x14336,14336x4096,4096x4096,1024x4096")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--bw", type=float, default=None, help="datasheet TB/s (default: 4.8 on H200, else 3.35)")
    ap.add_argument("--warps-sweep", default="", help="shapes NxK to time at every warps-per-CTA count")
    ap.add_argument("--csv", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    st = csrc.status()
    if not st["found"]:
        sys.exit(f"csrc library not available: {st['reason']}")
    name = torch.cuda.get_device_name()
    bw = args.bw or (4.8 if "H200" in name else 3.35)
    lines = [f"# {name}, torch {torch.__version__}; times in us (median, L2 flushed); floor at {bw} TB/s",
             "n,k,m,csrc_shared,csrc_registers,csrc_exact,csrc_rt1,op_csrc,op_triton,op_auto,cublas_bf16_dense,"
             "floor,shared_vs_floor,exact_vs_floor"]
    print("\n".join(lines), flush=True)

    def kernel_time(env, x, q, xa, b, out):
        old = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            return timed(lambda: csrc.linear_decode_fwd(x, q, xa, b, None, 0.5, out=out))
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    sweep = {tuple(int(v) for v in s.split("x")) for s in args.warps_sweep.split(",") if s}
    sweep_lines = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        q = random_quant(n, k)
        state = quant_state_of(q)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xa = torch.randn(m, args.r, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, args.r, device="cuda", dtype=torch.bfloat16)
            a = torch.randn(args.r, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            row = {}
            for label, env in (("csrc_shared", {"LORA_KERNELS_CSRC_DECODE": "shared"}),
                               ("csrc_registers", {"LORA_KERNELS_CSRC_DECODE": "registers"}),
                               ("csrc_exact", {"LORA_KERNELS_CSRC_DECODE": "exact"}),
                               ("csrc_rt1", {"LORA_KERNELS_CSRC_DECODE": "shared", "LORA_KERNELS_CSRC_ROW_TILES": "1"})):
                row[label] = kernel_time(env, x, q, xa, b, out)
            for label, path in (("op_csrc", "csrc"), ("op_triton", "fused"), ("op_auto", None)):
                if path:
                    os.environ["LORA_KERNELS_PATH"] = path
                row[label] = timed(lambda: qlora_linear(x, q.packed, state, a, b, 0.5))
                os.environ.pop("LORA_KERNELS_PATH", None)
            row["cublas"] = timed(lambda: torch.mm(x, w.t()))
            nbytes = q.packed.numel() + q.absmax.numel() * q.absmax.element_size() + 2 * (m * k + m * n + n * args.r)
            floor = nbytes / (bw * 1e12) * 1e6
            line = (f"{n},{k},{m},{row['csrc_shared']:.1f},{row['csrc_registers']:.1f},{row['csrc_exact']:.1f},"
                    f"{row['csrc_rt1']:.1f},{row['op_csrc']:.1f},{row['op_triton']:.1f},{row['op_auto']:.1f},"
                    f"{row['cublas']:.1f},{floor:.1f},{row['csrc_shared'] / floor:.2f},{row['csrc_exact'] / floor:.2f}")
            print(line, flush=True)
            lines.append(line)
            if (n, k) in sweep:
                for decode in ("shared", "exact"):
                    times = {wp: kernel_time({"LORA_KERNELS_CSRC_DECODE": decode, "LORA_KERNELS_CSRC_WARPS": str(wp)},
                                             x, q, xa, b, out) for wp in (1, 2, 4, 8, 16)}
                    sweep_lines.append(f"# warps sweep {n}x{k} M={m} {decode}: " +
                                       ", ".join(f"{wp} warps {t:.1f}" for wp, t in times.items()))
                    print(sweep_lines[-1], flush=True)
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("\n".join(lines + sweep_lines) + "\n")


if __name__ == "__main__":
    main()
