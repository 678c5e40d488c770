"""Times the csrc decode kernel on a GPU beside cuBLAS bf16 and the op's other paths; measured, never predicted.

    python csrc/bench_decode.py [--shapes 8192x8192,4096x14336,...] [--m 1,16] [--r 16]
                                [--warps-sweep 8192x8192] [--csv FILE]

Needs lora_kernels/_csrc*.so (built on a CPU machine and carried over) and CUDA; the weights are random nested
NF4-layout data (no bitsandbytes needed). The L2 is flushed by a read before every run. Columns, all in us:
- kern_*: kernel device time from torch.profiler, per decode (exact, shared, registers), the exact decode
  without LoRA and bias, the loads alone (no decode or MMA; M <= 8, else nan), and cuBLAS bf16 on a dense W;
  kern_async_*: the same decodes with the cp.async pipeline (LORA_KERNELS_CSRC_PIPELINE=async) instead of the
  register ring; nan when a first run of it in a subprocess failed or disagreed with the ring (printed);
- wall_*: CUDA-event time of the kernel call (launch latency included); read_wall: torch.sum over as many
  bytes as the kernel reads;
- op_auto / op_dequant / op_fused: CUDA-event time of the whole qlora_linear call (host time included) on the
  default path (csrc at M <= 16 when built), LORA_KERNELS_PATH=dequant and =fused (the Triton decode path);
  op_graph: the default path's call captured in a CUDA graph and replayed (what generation with CUDA graphs
  pays: no host time); nan when the capture failed (printed);
- floor: the bytes (packed W, scales, x, y, B) at the datasheet bandwidth (--bw, TB/s).
'# launch' lines give each decode's CTAs, warps per CTA and resident CTAs per SM (CUDA's occupancy calculator);
--warps-sweep adds the shared and exact kernels (both pipelines) at every warps-per-CTA count and, at M <= 8,
every register-ring prefetch depth, for the shapes named.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lora_kernels import csrc  # noqa: E402
from lora_kernels.bench.providers import temporary_env  # noqa: E402
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


_FLUSH = {}


def flush_l2():
    """Evicts the L2 by reading 256 MB: a read leaves clean lines, so the timed kernel pays no write-backs (a
    zero_() flush left ~50 MB of dirty lines that the next kernel's reads had to write back first)."""
    buf = _FLUSH.get("buf")
    if buf is None:
        buf = _FLUSH["buf"] = torch.ones(64 * 1024 * 1024, dtype=torch.float32, device="cuda")
    buf.sum()


def timed(fn, reps=50):
    """Median CUDA-event time of fn (us), L2 flushed before each run: the kernels plus launch latency."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graph_us(fn):
    """CUDA-event time of fn captured in a CUDA graph and replayed, L2 flushed before each replay; nan (and the
    reason printed) when the capture fails, so that one failure does not cost the other columns."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timed(graph.replay)
    except Exception as exc:  # noqa: BLE001 - reported in the output, the column is nan
        print(f"# CUDA-graph capture failed, op_graph is nan: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return float("nan")


def kernel_us(fn, reps=20):
    """Device time of fn's kernels per call (us, torch.profiler), L2 flushed before each run: no launch gaps."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush_l2()
            fn()
        torch.cuda.synchronize()
    return sum(ev.device_time_total for ev in prof.key_averages()
               if ev.device_time_total > 0 and "at::native::reduce_kernel" not in ev.key) / reps


_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from csrc.bench_decode import random_quant
from lora_kernels import csrc
q = random_quant(1024, 4096)
x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
for decode in ("exact", "shared", "registers"):
    ring = csrc.linear_decode_fwd(x, q, None, None, None, 1.0, decode=decode, pipeline="ring")
    got = csrc.linear_decode_fwd(x, q, None, None, None, 1.0, decode=decode, pipeline="async")
    torch.cuda.synchronize()
    assert torch.allclose(got.float(), ring.float(), rtol=0.02, atol=0.02), decode
print("ok")
"""


def async_runs() -> bool:
    """Whether the cp.async pipeline runs and agrees with the ring on a small case, tried in a subprocess: a fault
    there would end this process's CUDA context, and with it the ring's timings."""
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    res = subprocess.run([sys.executable, "-c", _PROBE.format(root=root)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or "ok" not in res.stdout:
        print(f"# async pipeline probe failed (its columns are nan): {(res.stderr or res.stdout).strip()[-400:]}",
              flush=True)
        return False
    return True


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
    async_ok = async_runs()
    bw = args.bw or (4.8 if "H200" in name else 3.35)
    lines = [f"# {name}, torch {torch.__version__}; us; kern_* = kernel device time (torch.profiler), wall_* and op_* ="
             f" CUDA-event time (launch latency and, for op_*, host time included), L2 flushed by a read before"
             f" each run; floor = bytes at {bw} TB/s; read_wall = event time of torch.sum over as many bytes",
             "n,k,m,kern_exact,kern_shared,kern_registers,kern_exact_nolora,kern_loads_only,kern_cublas,wall_exact,"
             "wall_cublas,read_wall,op_auto,op_dequant,op_fused,floor,kern_exact_vs_floor,wall_exact_vs_read,"
             "kern_async_exact,kern_async_shared,kern_async_registers,kern_async_exact_vs_floor,op_graph"]
    print("\n".join(lines), flush=True)

    def with_env(env, fn):
        with temporary_env(env):
            return fn()

    sweep = {tuple(int(v) for v in shape.split("x")) for shape in args.warps_sweep.split(",") if shape}
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
            nbytes = q.packed.numel() + q.absmax.numel() * q.absmax.element_size() + 2 * (m * k + m * n + n * args.r)
            row = {}

            def kern(decode, lora=True, pipeline="ring", **env):
                call = (lambda: csrc.linear_decode_fwd(x, q, xa, b, None, 0.5, out=out, decode=decode,
                                                       pipeline=pipeline)) if lora else \
                    (lambda: csrc.linear_decode_fwd(x, q, None, None, None, 0.5, out=out, decode=decode,
                                                    pipeline=pipeline))
                return with_env(env, lambda: kernel_us(call))

            for decode in ("exact", "shared", "registers"):
                row[f"kern_{decode}"] = kern(decode)
                row[f"kern_async_{decode}"] = kern(decode, pipeline="async") if async_ok else float("nan")
            row["kern_exact_nolora"] = kern("exact", lora=False)
            # the same loads, scales, reduction and epilogue without decode or MMA (M <= 8 only; nan above)
            row["kern_loads_only"] = kernel_us(lambda: csrc.loads_only_fwd(x, q, xa, b, out)) if m <= 8 else float("nan")
            row["kern_cublas"] = kernel_us(lambda: torch.mm(x, w.t()))
            row["wall_exact"] = timed(lambda: csrc.linear_decode_fwd(x, q, xa, b, None, 0.5, out=out, decode="exact"))
            row["wall_cublas"] = timed(lambda: torch.mm(x, w.t()))
            flat = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
            row["read_wall"] = timed(lambda: flat.sum())
            del flat
            for label, path in (("op_auto", None), ("op_dequant", "dequant"), ("op_fused", "fused")):
                env = {"LORA_KERNELS_PATH": path} if path else {}
                row[label] = with_env(env, lambda: timed(lambda: qlora_linear(x, q.packed, state, a, b, 0.5)))
            with torch.no_grad():
                row["op_graph"] = graph_us(lambda: qlora_linear(x, q.packed, state, a, b, 0.5))
            floor = nbytes / (bw * 1e12) * 1e6
            cols = ["kern_exact", "kern_shared", "kern_registers", "kern_exact_nolora", "kern_loads_only", "kern_cublas",
                    "wall_exact", "wall_cublas", "read_wall", "op_auto", "op_dequant", "op_fused"]
            line = (f"{n},{k},{m}," + ",".join(f"{row[c]:.1f}" for c in cols) +
                    f",{floor:.1f},{row['kern_exact'] / floor:.2f},{row['wall_exact'] / row['read_wall']:.2f}," +
                    ",".join(f"{row[f'kern_async_{d}']:.1f}" for d in ("exact", "shared", "registers")) +
                    f",{row['kern_async_exact'] / floor:.2f},{row['op_graph']:.1f}")
            print(line, flush=True)
            lines.append(line)
            for pipeline in ("ring", "async") if async_ok else ("ring",):
                for decode in ("exact", "shared", "registers"):
                    plan = csrc.launch_plan(x, q, xa, b, decode=decode, pipeline=pipeline)
                    sweep_lines.append(f"# launch {n}x{k} M={m} {decode} {plan['pipeline']}: {plan['ctas']} CTAs of "
                                       f"{plan['warps']} warps, {plan['smem']} B dynamic shared memory, "
                                       f"{plan['resident_per_sm']} resident per SM x {plan['sms']} SMs")
                    print(sweep_lines[-1], flush=True)
            if (n, k) in sweep:
                for decode in ("exact", "shared"):
                    for pipeline in ("ring", "async") if async_ok else ("ring",):
                        # the async kernel's 32-row CTAs (M > 8) take at most 8 warps
                        top = 8 if pipeline == "async" and m > 8 else 16
                        times = {wp: kern(decode, pipeline=pipeline, LORA_KERNELS_CSRC_WARPS=str(wp))
                                 for wp in (1, 2, 4, 8, 16) if wp <= top}
                        sweep_lines.append(f"# warps sweep {n}x{k} M={m} {decode} {pipeline} (kernel us): " +
                                           ", ".join(f"{wp} warps {t:.1f}" for wp, t in times.items()))
                        print(sweep_lines[-1], flush=True)
                    if m <= 8:
                        times = {d: kern(decode, LORA_KERNELS_CSRC_DEPTH=str(d)) for d in (1, 2, 4)}
                        sweep_lines.append(f"# depth sweep {n}x{k} M={m} {decode} (kernel us): " +
                                           ", ".join(f"{d} steps ahead {t:.1f}" for d, t in times.items()))
                        print(sweep_lines[-1], flush=True)
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("\n".join(lines + sweep_lines) + "\n")


if __name__ == "__main__":
    main()
