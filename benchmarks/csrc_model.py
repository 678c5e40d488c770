"""The csrc decode kernel on the static model: kernel device time predicted from its sm_90 SASS, never measured.

    python -m benchmarks.csrc_model [--so lora_kernels/_csrc*.so] [--device H200] [--m 1,16] [--r 16]
                                    [--shapes 8192x8192,...] [--out DIR] [--date YYYY-MM-DD]

No GPU is needed: the built library's sm_90 SASS (cuobjdump, bundled with triton) gives each kernel's main-loop
instructions per 128-wide step, its registers, and, from the loop's scheduling control bits, whether its loads
of W run ahead of the decode (csrc/sass_count.py's reach check). The launch (CTAs, warps, shared memory) is
plan_fast's, mirrored here. Then, per SM and per wave of resident CTAs (W warps, S steps per warp):

- issue: S * (W / 4 schedulers) * instructions per step / clock;
- HBM: the wave's packed bytes and scales at the reached bandwidth (static_model.DEVICES), one SM's share;
- L2: x at M tokens per step and warp, from L2 at an assumed L2_BW, no reuse through L1 assumed;
- serial (the register ring, whose wait covers its own prefetch, reach 0): S * (one memory round trip + the
  step's issue), as every warp waits a round trip per step and then issues: no overlap of the two; two round
  trips with two row tiles per warp (M > 8 at large N), whose scales load inside the step, after W;
- pipelined (the cp.async stages): max(issue, HBM, L2, bytes in flight over a round trip) plus one round trip to
  fill; plus per wave a prologue round trip for the code table (the ring only: the async kernel issues its
  first stages before it loads the tables, so the two round trips overlap), the epilogue (ring: the LoRA
  term's dependent loads, 1 + ceil(r / 4) round trips, then the store; async: operands already in shared
  memory, the store), and once RAMP_S for the kernel's start and drain.
The read-only bound is the same model's time for a kernel that does nothing but stream the floor's bytes at the
reached bandwidth: RAMP_S + one round trip + bytes / reached. No kernel does better on this model, so a target
below it (for instance 1.2x the floor at 8192x8192) cannot be met on the model's assumptions.
Assumed, not cited: one memory round trip 600 ns (static_model.MEM_LATENCY_S), L2_BW, RAMP_S, the epilogue's round
trips. The run checks the model against the H200 measurements of the register ring (csrc-decode-e66ba9f.csv,
kernel device time, same loop) and prints the ratio; every time it prints or writes is a prediction.

Writes benchmarks/results/static-sm90-csrc-<date>.csv (bench schema, bench "csrc_decode_kernel", provider
"csrc_<pipeline>_<decode>_predicted", gpu "<device> (static model, predicted)") and the .md beside it.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import glob
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "csrc"))

import sass_count as sc  # noqa: E402
from benchmarks.static_model import DEVICES, MEM_LATENCY_S, PREDICTED, Device  # noqa: E402

L2_BW = 7e12  # assumption: L2 -> SM bytes/s on an H100/H200 SXM (not cited)
RAMP_S = 1e-6  # assumption: a kernel's CTA launch and drain, in device time (not cited)
KROWS, KSTEP, TABLE_BYTES = 16, 128, 32 * 1024  # csrc/linear_decode.cu kRows, kStep, kTableWords * 4
ASYNC_STAGES, LORA_MAX_R = 4, 64  # AsyncLayout::stages, kLoraMaxR
DECODE_IDS = {"shared": 0, "registers": 1, "exact": 2}
MEASURED = ROOT / "benchmarks" / "results" / "h200-2026-11-30" / "csrc-decode-e66ba9f.csv"


@dataclass(frozen=True)
class Variant:
    """One fast kernel's sm_90 main loop."""
    pipeline: str  # ring | async
    decode: str
    nt: int
    rt: int
    nested: bool
    scale_after: bool
    per_step: float  # warp-instructions per 128-wide step (all row tiles)
    reach: int | None  # HMMAs the W loads run ahead (ring); None for async
    regs: int
    static_smem: int

    @property
    def serial(self) -> bool:
        return self.pipeline == "ring" and (self.reach or 0) < 8 * self.nt * self.rt


def _cuobjdump():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def count_library(so: str) -> dict:
    """{(pipeline, decode, nt, rt, nested, scale_after): Variant} for the sm_90 kernels (depth-0 ring ones)."""
    tool = _cuobjdump()
    sass = subprocess.run([tool, "--dump-sass", so], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    usage = {name: (reg, shared) for arch, name, reg, _, shared, _ in sc.resource_usage(res) if arch == "sm_90"}
    out = {}
    for arch, name, ins in sc.parse(sass):
        f = sc.demangled_flags(name)
        if arch != "sm_90" or f is None or f["loads_only"] or f["depth"]:
            continue
        loop = sc.main_loop(ins)
        if loop is None:
            continue
        body, ops = loop
        steps = ops["HMMA"] / (8 * f["nt"] * f["rt"])
        decode = "exact" if f["exact"] else "shared" if f["smem"] else "registers"
        regs, smem = usage.get(name, (0, 0))
        out[(f["pipeline"], decode, f["nt"], f["rt"], f["nested"], f["scale_after"])] = Variant(
            f["pipeline"], decode, f["nt"], f["rt"], f["nested"], f["scale_after"], len(body) / steps,
            None if f["pipeline"] == "async" else sc.w_load_reach(body), regs, smem)
    if not out:
        raise RuntimeError(f"no sm_90 fast decode kernel in {so}")
    return out


@dataclass(frozen=True)
class Launch:
    rt: int
    nt: int
    ctas: int
    warps: int
    smem: int  # dynamic shared memory (async)


def async_smem(decode, nested, rt, warps, m, r):
    """AsyncLayout::bytes (csrc/linear_decode.cu) with the LoRA operands of lora_smem_bytes."""
    stage = rt * (1024 + 128 * (2 if nested else 1))
    lora = ((KROWS * rt + m) * r * 2 + 15) // 16 * 16 if 0 < r <= LORA_MAX_R and r % 2 == 0 else 0
    used = (TABLE_BYTES if decode != "registers" else 0) + (1040 if nested else 0) + \
        warps * ASYNC_STAGES * stage + KROWS * rt * 4 + lora
    return max(used, warps * KROWS * rt * 16 * 4)


def plan(pipeline, decode, n, k, m, r, nested, dev: Device, smem_optin=227 * 1024, variants=None) -> Launch:
    """plan_fast / plan_async (csrc/linear_decode.cu) for these arguments, auto row tiles and warps. The async
    choice needs each kernel's registers (variants, from count_library); without them registers do not limit."""
    sms = dev.sms
    steps = -(-k // KSTEP)
    nt = 2 if m > 8 else 1
    if pipeline == "async":
        best, best_score = None, -1
        for rt in (1, 2):
            v = (variants or {}).get(("async", decode, nt, rt, nested, False))
            ctas = -(-n // (rt * KROWS))
            w = 1
            while w <= (8 if rt == 2 else 16):
                if w == 1 or w <= steps:
                    smem = async_smem(decode, nested, rt, w, m, r)
                    if smem <= smem_optin:
                        ln = Launch(rt, nt, ctas, w, smem)
                        resident = occupancy(v, ln, dev) if v else dev.smem_per_sm // (smem + 1024)
                        per_sm = -(-ctas // sms)
                        wps = min(resident, per_sm) * w
                        score = ((resident >= per_sm) << 20) + ((wps >= 8) << 19) + \
                            ((rt == (2 if m > 8 else 1)) << 18) + min(wps, 16) * 64 + (16 - w)
                        if resident >= 1 and score > best_score:
                            best, best_score = ln, score
                w *= 2
        return best
    if m <= 8:
        rt = 1
    else:
        rt = 2 if (n + 2 * KROWS - 1) // (2 * KROWS) >= (3 * sms) // 4 else 1
    ctas = -(-n // (rt * KROWS))
    warps = 1
    while warps < 16 and warps * 2 * ctas <= 16 * sms and warps * 2 <= steps:
        warps *= 2
    return Launch(rt, nt, ctas, warps, 0)


def occupancy(v: Variant, ln: Launch, dev: Device) -> int:
    """CTAs per SM from registers (256-register units per warp), shared memory (1 KiB reserved per CTA;
    cuobjdump's sm_90 figure for static shared memory includes it), threads and the CTA limit (at least 1)."""
    per_warp = math.ceil(max(v.regs, 1) * 32 / 256) * 256
    by_regs = (dev.regs_per_sm // per_warp) // ln.warps
    smem = v.static_smem + (ln.smem + 1024 if ln.smem else 0)
    by_smem = dev.smem_per_sm // max(smem, 1024)
    by_threads = dev.max_threads_per_sm // (32 * ln.warps)
    return max(1, min(by_regs, by_smem, by_threads, dev.max_ctas_per_sm))


def kernel_time(v: Variant, ln: Launch, n, k, m, r, dev: Device, blocksize=64):
    """(seconds, bound, detail) of one call, kernel device time."""
    clk, rt_s = dev.clock_hz, MEM_LATENCY_S
    occ = occupancy(v, ln, dev)
    per_sm = math.ceil(ln.ctas / dev.sms)
    rows = KROWS * ln.rt
    scale_bytes = 1 if v.nested else 4
    cta_hbm = rows * (k / 2 + k / blocksize * scale_bytes)
    cta_l2 = k * m * 2  # x, once per CTA (per warp-step, each token's slice once)
    steps = k // KSTEP
    total, bounds = RAMP_S, []
    left = per_sm
    while left > 0:
        c = min(occ, left)
        left -= c
        w = c * ln.warps
        s = math.ceil(steps / ln.warps)
        issue = s * (w / dev.issue_per_clk) * v.per_step / clk
        hbm = c * cta_hbm / (dev.hbm_reached / dev.sms)
        l2 = c * cta_l2 / (L2_BW / dev.sms)
        if v.serial:
            # two row tiles leave no step in flight (Depth<2, 2>): the scales load inside the step, after its
            # W, so their round trip follows W's
            trips = 2 if ln.rt == 2 else 1
            loop = max(s * (trips * rt_s + (w / dev.issue_per_clk) * v.per_step / clk), hbm, l2)
            bound = "serial (round trip + issue per step)" if loop > max(hbm, l2) else ("hbm" if hbm >= l2 else "l2")
        else:
            inflight = w * (ASYNC_STAGES - 1) * (1024 * ln.rt + 32 * ln.rt * scale_bytes)
            lat = c * cta_hbm * rt_s / inflight
            terms = {"issue": issue, "hbm": hbm, "l2": l2, "latency": lat}
            bound = max(terms, key=terms.get)
            loop = terms[bound] + rt_s  # fill
        lora = (1 + math.ceil(r / 4)) * rt_s if (r and (v.pipeline == "ring" or r > LORA_MAX_R or r % 2)) else 0.0
        prologue = 0.0 if v.pipeline == "async" else rt_s  # async: under the fill's round trip
        total += loop + prologue + lora + rt_s  # LoRA operands, reduction + store
        bounds.append(bound)
    detail = (f"{ln.ctas} CTAs x {ln.warps} warps, {occ} resident/SM, {math.ceil(per_sm / occ)} wave(s); "
              f"{v.per_step:.0f} instr/step, {v.regs} regs, smem {v.static_smem + ln.smem} B; "
              f"{'W loads waited on at once (reach ' + str(v.reach) + ' HMMA)' if v.serial else 'pipelined'}")
    return total, bounds[0], detail


def floor_s(n, k, m, r, dev: Device, blocksize=64, nested=True):
    """bench_decode.py's floor: packed W, scales, x, y and B once at the datasheet bandwidth."""
    nbytes = n * k / 2 + n * k / blocksize * (1 if nested else 4) + 2 * (m * k + m * n + n * r)
    return nbytes / dev.hbm_peak


def read_bound_s(n, k, m, r, dev: Device, blocksize=64, nested=True):
    """The read-only bound (module docstring): the floor's bytes at the reached bandwidth, one round trip, the ramp."""
    return RAMP_S + MEM_LATENCY_S + floor_s(n, k, m, r, dev, blocksize, nested) * dev.hbm_peak / dev.hbm_reached


def measured_ring():
    """({(n, k, m): {decode: us}}, {(m, decode): {warps: us}} at 8192x8192) from the H200 run of the register ring
    (kernel device time)."""
    out, sweep = {}, {}
    if not MEASURED.exists():
        return out, sweep
    with open(MEASURED) as f:
        text = f.read().splitlines()
    for row in csv.DictReader(line for line in text if not line.startswith("#")):
        out[(int(row["n"]), int(row["k"]), int(row["m"]))] = {
            d: float(row[f"kern_{d}"]) for d in ("exact", "shared", "registers")}
    for line in text:
        m = re.match(r"# warps sweep 8192x8192 M=(\d+) (\w+) \(kernel us\): (.*)", line)
        if m:
            sweep[(int(m.group(1)), m.group(2))] = {int(w): float(t) for w, t in
                                                    re.findall(r"(\d+) warps ([\d.]+)", m.group(3))}
    return out, sweep


def warps_check(variants, sweep, r, dev: Device):
    """Lines comparing the model with the ring's measured warps sweep (8192x8192)."""
    lines = []
    for (m, decode), times in sorted(sweep.items()):
        base = plan("ring", decode, 8192, 8192, m, r, True, dev)
        v = variants.get(("ring", decode, base.nt, base.rt, True, False))
        if v is None:
            continue
        got = []
        for w, us in times.items():
            t, _, _ = kernel_time(v, Launch(base.rt, base.nt, base.ctas, w, 0), 8192, 8192, m, r, dev)
            got.append(f"{w} warps {t * 1e6:.1f}/{us:.1f}")
        lines.append(f"PREDICTED/measured ring {decode} 8192x8192 M={m} by warps per CTA (us): " + ", ".join(got))
    return lines


def predict(variants, shapes, ms, r, dev: Device):
    """[(n, k, m, pipeline, decode, seconds, bound, detail)] for nested NF4 blocksize 64 (bench_decode's weights)."""
    out = []
    for n, k in shapes:
        for m in ms:
            for pipeline in ("ring", "async"):
                for decode in ("exact", "shared", "registers"):
                    ln = plan(pipeline, decode, n, k, m, r, True, dev, variants=variants)
                    v = variants.get((pipeline, decode, ln.nt, ln.rt, True, False))
                    if v is None:
                        continue
                    t, bound, detail = kernel_time(v, ln, n, k, m, r, dev)
                    out.append((n, k, m, pipeline, decode, t, bound, detail))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.csrc_model", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--so", default=None, help="the built library (default lora_kernels/_csrc*.so)")
    ap.add_argument("--device", default="H200", help=f"one of {', '.join(DEVICES)}")
    ap.add_argument("--shapes", default="8192x8192,4096x14336,14336x4096,4096x4096,1024x4096")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="'-' writes nothing")
    ap.add_argument("--date", default=_dt.date.today().isoformat())
    args = ap.parse_args(argv)
    so = args.so or next(iter(sorted(glob.glob(str(ROOT / "lora_kernels" / "_csrc*.so")))), None)
    if not so or not os.path.exists(so):
        sys.exit("no csrc library: build it with `LORA_KERNELS_BUILD_CSRC=1 pip install -e .` (csrc/README.md)")
    dev = DEVICES[args.device]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.m.split(",")]
    variants = count_library(so)
    preds = predict(variants, shapes, ms, args.r, dev)
    meas, sweep = measured_ring() if dev.name == "H200" else ({}, {})
    lines = [f"PREDICTED by the static model (not measured), {dev.name}, kernel device time, nested NF4 blocksize 64,"
             f" r = {args.r}; floor = bench_decode's bytes at {dev.hbm_peak / 1e12:.1f} TB/s"]
    table = ["| N x K | M | pipeline | decode | predicted us | x floor | bound | measured ring us (H200) | launch |",
             "| --- | ---: | --- | --- | ---: | ---: | --- | ---: | --- |"]
    rows = []
    last = None
    for n, k, m, pipeline, decode, t, bound, detail in preds:
        fl = floor_s(n, k, m, args.r, dev)
        if (n, k, m) != last:  # each shape's read-only bound first: what no kernel beats on this model
            last, rb = (n, k, m), read_bound_s(n, k, m, args.r, dev)
            lines.append(f"PREDICTED {n}x{k} M={m} read-only bound: {rb * 1e6:.1f} us = {rb / fl:.2f}x floor")
            table.append(f"| {n}x{k} | {m} | read-only bound | - | {rb * 1e6:.1f} | {rb / fl:.2f} | hbm (reached) | | "
                         f"streams the floor's bytes only |")
            rows.append((n, k, m, "read_only_bound", None, rb))
        got = meas.get((n, k, m), {}).get(decode) if pipeline == "ring" else None
        vs = f"; measured {got:.1f} us, model/measured {t * 1e6 / got:.2f}" if got else ""
        lines.append(f"PREDICTED {n}x{k} M={m} {pipeline} {decode}: {t * 1e6:.1f} us = {t / fl:.2f}x floor "
                     f"({fl * 1e6:.1f} us), {bound}-bound; {detail}{vs}")
        table.append(f"| {n}x{k} | {m} | {pipeline} | {decode} | {t * 1e6:.1f} | {t / fl:.2f} | {bound} | "
                     f"{got if got else ''} | {detail.split(';')[0]} |")
        rows.append((n, k, m, pipeline, decode, t))
    check = warps_check(variants, sweep, args.r, dev)
    lines += check
    print("\n".join(lines))
    if args.out == "-":
        return 0
    from lora_kernels.bench.results import append_csv, environment, make_row

    env = environment("cpu")
    env["gpu"] = f"{dev.name} (static model, predicted)"
    out_rows = []
    for n, k, m, pipeline, decode, t in rows:
        provider = f"{pipeline}{PREDICTED}" if decode is None else f"csrc_{pipeline}_{decode}{PREDICTED}"
        row = make_row("csrc_decode_kernel", provider, m, n, k, args.r, "bf16",
                       (t * 1e3, 0.0, 0.0), None, env)
        row["ms_p20"] = row["ms_p80"] = None
        out_rows.append(row)
    base = Path(args.out) / f"static-sm90-csrc-{args.date}"
    if os.path.exists(str(base) + ".csv"):
        os.remove(str(base) + ".csv")  # a rerun replaces the file
    append_csv(str(base) + ".csv", out_rows)
    note = (f"#### {dev.name}: the csrc decode kernel, predicted by the static model, not measured\n\n"
            f"`python -m benchmarks.csrc_model` on {so.split('/')[-1]} at {env.get('commit', '?')}: main-loop counts "
            f"from its sm_90 SASS; assumptions (round trip {MEM_LATENCY_S * 1e9:.0f} ns, L2 {L2_BW / 1e12:.0f} TB/s, "
            f"ramp {RAMP_S * 1e6:.0f} us) in the module's docstring. The register ring's rows are checked against "
            f"its H200 measurement (kernel device time, {MEASURED.name}). Each shape's first row is the read-only "
            f"bound: a kernel that only streams the floor's bytes, at the reached {dev.hbm_reached / 1e12:.1f} TB/s, "
            f"after the ramp and one round trip; on this model nothing is faster.\n\n")
    with open(str(base) + ".md", "w") as f:
        f.write(note + "\n".join(table) + "\n\n" + "\n".join(f"- {c}" for c in check) + "\n")
    print(f"wrote {base}.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
