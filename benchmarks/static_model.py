"""Static sm_90 cost model: the kernels' main loops counted from SASS, and times predicted from them.

    python -m benchmarks.static_model [--device H100,H200] [--bench layer_fwd,layer_fwd_bwd] [--m 1,16,...]
                                     [--out DIR] [--cache DIR] [--python PY] [--workers N] [--counts-only]
    python -m benchmarks.static_model --count CASE_ID ...      (one line of counts per case)

No GPU is needed. Each kernel/config the package can launch is compiled for sm_90 on this CPU the way
tests/_gpu_compile.py does (its cases(), specialize() and build(): triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))), in a subprocess without TRITON_INTERPRET. Then:

- count: cuobjdump --dump-sass (the one bundled with triton) gives the SASS. The main loop is the first
  loop (a backward branch) whose body holds a tensor-core op (HGMMA/HMMA), else the longest loop. Its
  instructions per warp per iteration are counted by class (tensor ops and their shapes, global loads,
  async copies, shared loads/stores, integer / uniform / fp ALU, conversions, PRMT, barriers) with the
  HGMMA wait depth (WARPGROUP.DEPBAR.LE gsb0, 0xN). The PTX of the same loop attributes each global load
  and async copy to the kernel parameter its address derives from (activations, packed weight, code
  table, scales): SASS gives the cost, PTX says what is loaded.
- predict: per launch, every autotune candidate configs.config_allowed admits is timed on the model and
  the best kept (the autotuner's choice, on paper). A kernel's time is
      max(issue, tensor, shared memory, HBM) over the loop, plus the non-loop code (prologue, LoRA
      epilogue), plus a fixed launch cost,
  with occupancy (CTAs per SM from registers, shared memory, threads) and waves over the SMs. A loop
  that waits on its own HGMMA group (wait depth 0) cannot overlap its decode with its tensor work inside
  one CTA: alone on an SM its iteration costs issue + tensor; co-resident CTAs hide that only if the SM
  holds two or more. Paths: "fused" (decode in the GEMM loop), "dequant" (dequantize kernel at HBM speed
  + cuBLAS at its measured rate + the epilogue kernel), and cuBLAS bf16 dense (r = 0: the ceiling).
- write: benchmarks/results/static-sm90-<date>.csv in the bench schema with provider "<name>_predicted",
  gpu "<device> (static model, predicted)", p20/p80 and peak memory empty, so that a prediction can never
  pass for a measurement (lora_kernels.bench.report/plot refuse such rows); and
  benchmarks/results/static-sm90-<date>.md, a table headed "Predicted by the static model, not measured".

Calibration (once, on paper): the dense Triton GEMM (BASE=1, the package's bf16 path) must land near its
roofline. With every figure of DEVICES as cited, its 128x128x64 loop issues in ~0.34x its tensor time. The
only fitted figure is the reachable tensor rate, cuBLAS's measured bf16 rate (~780 of 989 TFLOP/s,
DESIGN.md). Counting HGMMA's shared-memory operand reads and the load/store unit's traffic (cp.async,
LDS, STS) as one 128 B/clk stream made that dense loop smem-bound at ~0.85x cuBLAS; the model treats them
as two paths of 128 B/clk each, and the dense GEMM then comes out tensor-bound, at 1.07-1.11x the roofline
time at M = 8192 (the rest: per-tile prologue/epilogue and the last wave). That is the calibration; the
run prints it. Not modelled, so issue- and latency-bound times are lower bounds: dependent-issue stalls,
bank conflicts, L2 bandwidth and hit rates (HBM bytes are the compulsory ones), host overhead. Assumed,
not cited: one memory round trip 600 ns, 2 us per kernel launched back to back, ~85 bytes and 7 PyTorch
launches per call for block_scales() on nested scales.

API for tests and scripts (`from benchmarks import static_model as sm`):
    sm.count_loop(case_or_id, cache=None, python=None) -> LoopCount   one case of tests/_gpu_compile.cases(),
        compiled in a clean subprocess and counted (python: another venv's interpreter, e.g. triton 3.6)
    sm.count_cases(ids, cache=None, python=None, workers=1) -> {id: LoopCount}
    sm.case_for("4bit" | "dense", "fwd" | "bwd", "128x128x64 w8 s3", m=512) -> case id (m=1: the M = 1 mode)
    sm.dense_twin(case_id) -> the dense case with the same tile;  sm.format_count(LoopCount) -> one line
    sm.decode_cost(count_4bit, count_dense) -> instructions per W element per thread (the budget's figure)
    sm.budgets(count_4bit, count_dense, "fwd" | "bwd") -> [Budget]   issue 10's budgets, as the CI test holds them
Every time this module prints is a prediction and says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import _gpu_compile as gc  # noqa: E402  (data only until a case is built)


# ---------------------------------------------------------------------------------------------- devices

@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    clock_hz: float
    issue_per_clk: int  # warp-instructions per clock per SM
    fma_per_clk: int  # dense bf16 tensor FMA per clock per SM
    smem_bytes_per_clk: int  # shared-memory bandwidth per SM
    hbm_peak: float  # bytes/s, datasheet
    hbm_reached: float  # bytes/s, what a streaming kernel gets (used for predictions)
    cublas_flops: float  # dense bf16 GEMM FLOP/s cuBLAS reaches at 8192^3 (the calibrated tensor rate)
    smem_per_sm: int  # bytes a CTA set can use per SM (the per-block maximum is gc.ARCHS[90])
    regs_per_sm: int
    max_threads_per_sm: int
    max_ctas_per_sm: int
    launch_s: float  # fixed cost per kernel in a back-to-back stream


# One table, each figure cited:
#  sms, clock, issue, fma, smem bw: DESIGN.md "Reading speed from SASS" (132 SMs, ~1.83 GHz, 4 schedulers x
#    1 warp-instruction/clk, 2048 bf16 FMA/clk/SM = 989 TFLOP/s dense, ~128 B/clk/SM shared memory); NVIDIA
#    H100 datasheet (989 TFLOP/s dense bf16 SXM). H200: "the H100's SMs, clocks and tensor rate" (DESIGN.md).
#  hbm: H100 SXM 3.35 TB/s datasheet, ~3.0 reached (DESIGN.md); H200 4.8 TB/s datasheet, ~4.3 TB/s measured
#    device-to-device copy (DESIGN.md, from another project).
#  cublas: bf16 8192^3 matmul measured 769-798 TFLOP/s on the H200 (DESIGN.md); the H100 SXM has the same
#    tensor rate and clocks, so the same figure (an assumption for the H100, not a measurement).
#  smem per SM 228 KiB, 65536 registers, 2048 threads, 32 CTAs per SM: CUDA C Programming Guide, compute
#    capability 9.0 table.
#  launch: ~2 us per kernel launched back to back (an assumption, not measured here; it matters only for
#    the microsecond kernels of M = 1).
DEVICES = {
    "H100": Device("H100 SXM", 132, 1.83e9, 4, 2048, 128, 3.35e12, 3.0e12, 780e12, 228 * 1024, 65536, 2048, 32,
                   2e-6),
    "H200": Device("H200", 132, 1.83e9, 4, 2048, 128, 4.8e12, 4.3e12, 780e12, 228 * 1024, 65536, 2048, 32, 2e-6),
}


# ---------------------------------------------------------------------------------------------- SASS

INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);", re.M)

# opcode base (text before the first '.') -> class; anything starting with U (uniform datapath) that is
# not listed is "uniform".
CLASSES = {
    "tensor": ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA"),
    "ldg": ("LDG",),
    "async": ("LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF"),
    "lds": ("LDS", "LDSM"),
    "sts": ("STS", "STSM"),
    "stg": ("STG", "RED", "ATOM", "ATOMG"),
    "fp": ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FCHK", "MUFU", "HADD2", "HMUL2", "HFMA2",
           "HMNMX2", "HSETP2", "FSWZADD", "DADD", "DMUL", "DFMA", "FMUL2", "FADD2", "FFMA2"),
    "cvt": ("F2FP", "F2F", "I2F", "F2I", "I2FP", "F2IP", "FRND", "I2I"),
    "prmt": ("PRMT",),
    "barrier": ("BAR", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "MEMBAR", "FENCE", "WARPSYNC", "SYNCS", "ARRIVES",
                "ERRBAR", "CCTL"),
    "control": ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "JMP", "YIELD", "NOP", "BPT", "BREAK", "KILL"),
    "int": ("IADD3", "IMAD", "LOP3", "SHF", "LEA", "ISETP", "SEL", "IABS", "VIADD", "IMNMX", "VIMNMX", "MOV",
            "POPC", "FLO", "BREV", "SGXT", "IADD", "IMUL", "BMSK", "S2R", "CS2R", "S2UR", "P2R", "R2P", "PLOP3",
            "LOP", "SHL", "SHR", "IDP", "IDP4A", "BMOV", "R2UR", "LEPC", "IMNMX", "VOTE", "VOTEU"),
}
_CLASS_OF = {op: cls for cls, ops in CLASSES.items() for op in ops}
CLASS_ORDER = ("tensor", "ldg", "async", "lds", "sts", "stg", "int", "uniform", "fp", "cvt", "prmt", "barrier",
               "control", "other")


@dataclass
class Instr:
    addr: int
    pred: str
    op: str  # full opcode with modifiers, e.g. HGMMA.64x128x16.F32.BF16
    args: str

    @property
    def base(self):
        return self.op.split(".", 1)[0]

    @property
    def cls(self):
        b = self.base
        if b in _CLASS_OF:
            return _CLASS_OF[b]
        if b.startswith("U"):
            return "uniform"
        return "other"


def parse_sass(sass: str) -> list[Instr]:
    return [Instr(int(a, 16), (p or "").strip(), op, args.strip()) for a, p, op, args in INSTR_RE.findall(sass)]


def _width(op: str) -> int:
    """Bytes per thread of a load/store/copy opcode (.U8/.S8 1, .U16/.S16 2, .64 8, .128 16, else 4)."""
    parts = op.split(".")
    for p in parts[1:]:
        if p in ("128",):
            return 16
        if p == "64":
            return 8
        if p in ("U8", "S8"):
            return 1
        if p in ("U16", "S16"):
            return 2
    return 4


def _smem_bytes(ins: Instr) -> int:
    """Shared-memory bytes one warp-instruction moves (0 for others). HGMMA counts its shared operands
    for the whole warpgroup on the first of the warpgroup's 4 warps only: see _loop_smem_bytes."""
    b = ins.base
    if b in ("LDSM", "STSM"):
        n = re.search(r"\.(?:M88|MT88)\.(\d)", ins.op)
        return 128 * (int(n.group(1)) if n else 1)
    if b in ("LDS", "STS"):
        return 32 * _width(ins.op)
    if b == "LDGSTS":
        return 32 * _width(ins.op)
    return 0


_ELEM = {"BF16": 2, "F16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1, "U8": 1}


def mma_shape(ins: Instr):
    """(m, n, k, elem bytes, A from registers) of an HGMMA/HMMA, per instruction of one warpgroup (HGMMA) or
    one warp (HMMA)."""
    parts = ins.op.split(".")
    elem = next((_ELEM[p] for p in reversed(parts) if p in _ELEM), 2)
    if ins.base in ("HGMMA", "QGMMA", "IGMMA"):
        m, n, k = map(int, parts[1].split("x"))
        srcs = [a.strip() for a in ins.args.split(",")]
        a_regs = len(srcs) > 1 and srcs[1].startswith("R")
        return m, n, k, elem, a_regs
    shape = parts[1]  # HMMA.16816 -> 16x8x16, HMMA.1688 -> 16x8x8
    m, n, k = int(shape[:2]), int(shape[2]), int(shape[3:])
    return m, n, k, elem, True


@dataclass
class Loop:
    start: int
    end: int  # address of the backward branch
    instrs: list

    @property
    def has_mma(self):
        return any(i.cls == "tensor" for i in self.instrs)


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Loops as [target, backward branch] address ranges, in address order."""
    loops = []
    for ins in instrs:
        if ins.base != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", ins.args)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < ins.addr:
            body = [i for i in instrs if target <= i.addr <= ins.addr]
            loops.append(Loop(target, ins.addr, body))
    return sorted(loops, key=lambda lp: (lp.start, -lp.end))


def main_loop(loops: list[Loop]):
    """The first loop holding a tensor-core op (the innermost such loop inside it), else the longest loop."""
    mma = [lp for lp in loops if lp.has_mma]
    if mma:
        first = mma[0]
        inner = [lp for lp in mma if first.start <= lp.start and lp.end <= first.end and lp is not first]
        return min(inner, key=lambda lp: len(lp.instrs)) if inner else first
    return max(loops, key=lambda lp: len(lp.instrs)) if loops else None


# ---------------------------------------------------------------------------------------------- PTX

PTX_LOAD_RE = re.compile(r"(ld\.global[\w.]*|cp\.async\.c[ag]\.shared\.global[\w.]*|cp\.async\.bulk[\w.:]*)\s+"
                         r"(.*?);")
PTX_DEF_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)\s+(%[\w]+)\s*,\s*(.*?);")


def _ptx_loop_lines(ptx: str):
    """(all lines, (start, end) line ranges of the loops, by the backward `bra` to a label)."""
    lines = ptx.splitlines()
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\$L__\w+):", line)
        if m:
            labels[m.group(1)] = i
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops.append((labels[m.group(1)], i))
    return lines, loops


def ptx_loads(ptx: str, param_names: list[str]):
    """{param name or '?': [(width bytes, count)]} for the global loads / async copies of the PTX main loop,
    each traced back through the address arithmetic to the kernel parameter it derives from."""
    lines, loops = _ptx_loop_lines(ptx)
    mma_loops = [lp for lp in loops if any("mma" in lines[i] for i in range(lp[0], lp[1] + 1))]
    if not (mma_loops or loops):
        return {}
    lo, hi = (mma_loops or sorted(loops, key=lambda lp: lp[0] - lp[1]))[0]
    defs = {}
    param_of = {}
    for line in lines:
        m = re.match(r"^\s*ld\.param\.\w+\s+(%\w+),\s*\[(\w+?)_param_(\d+)\]", line)
        if m:
            idx = int(m.group(3))
            param_of[m.group(1)] = param_names[idx] if idx < len(param_names) else f"param_{idx}"
            continue
        m = PTX_DEF_RE.match(line)
        if m and not m.group(1).startswith(("st.", "ld.global", "cp.", "bra", "wgmma", "mma")):
            defs.setdefault(m.group(2), set()).update(re.findall(r"%\w+", m.group(3)))

    def roots(reg, seen):
        if reg in param_of:
            return {param_of[reg]}
        if reg in seen:
            return set()
        seen.add(reg)
        out = set()
        for src in defs.get(reg, ()):
            out |= roots(src, seen)
        return out

    found = {}
    for i in range(lo, hi + 1):
        m = PTX_LOAD_RE.search(lines[i])
        if not m:
            continue
        op, args = m.groups()
        addr = re.findall(r"\[\s*(%\w+)", args)
        if op.startswith("cp.async.c"):
            reg = addr[1] if len(addr) > 1 else None
            size = re.search(r"\],\s*(0x[0-9a-f]+|\d+)", args.split("]", 1)[1] if "]" in args else "")
            width = int(size.group(1), 0) if size else 4
        else:
            reg = addr[0] if addr else None
            vec = re.search(r"\.v(\d)", op)
            bits = re.search(r"\.[bsuf](\d+)\b", op)
            width = (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) // 8 if bits else 4)
        names = sorted(roots(reg, set())) if reg else []
        key = "+".join(n for n in names if n.endswith("ptr") or "param" in n) or "?"
        found.setdefault(key, []).append(width)
    return found


# ---------------------------------------------------------------------------------------------- counting

@dataclass
class LoopCount:
    id: str
    ok: bool = True
    error: str | None = None
    kernel: str = ""
    mode: str = ""
    config: str = ""
    block: tuple = (0, 0, 0)  # BLOCK_M, BLOCK_N, BLOCK_K (0 where the kernel has none)
    num_warps: int = 4
    regs: int = 0
    shared: int = 0
    triton: str = ""
    per_iter: int = 0  # instructions per warp per main-loop iteration
    classes: dict = field(default_factory=dict)  # class -> count per warp per iteration
    mma_shapes: dict = field(default_factory=dict)  # opcode -> count per warp per iteration
    wait_depth: int | None = None  # smallest N of WARPGROUP.DEPBAR.LE gsb0, N in the loop (None: no wait)
    smem_bytes: int = 0  # per CTA per iteration through the load/store unit (LDS, LDSM, STS, LDGSTS)
    hgmma_smem_bytes: int = 0  # per CTA per iteration, HGMMA operands read from shared memory
    tensor_fma: int = 0  # per CTA per iteration
    loads: dict = field(default_factory=dict)  # parameter -> [bytes per thread of each load] per iteration
    other_instrs: int = 0  # per warp, outside the main loop, loops other than it counted once
    other_tensor_fma: int = 0  # per CTA, outside the main loop
    epi_instrs: int = 0  # per warp, one trip of the loops after the main loop that hold MMA (the LoRA epilogue)
    epi_tensor_fma: int = 0  # per CTA, the same trip
    loop_branches: int = 0  # forward branches inside the loop body (counts assume every path runs)
    has_loop: bool = True


def _block(case):
    c = case.get("constexprs", {})
    return (c.get("BLOCK_M", 0), c.get("BLOCK_N", 0), c.get("BLOCK_K", 0))


def count_sass(case, sass: str, ptx: str, regs: int, shared: int, triton_version: str = "") -> LoopCount:
    instrs = parse_sass(sass)
    loops = find_loops(instrs)
    loop = main_loop(loops)
    warps = case["num_warps"]
    res = LoopCount(id=case["id"], kernel=case["kernel"], mode=case["mode"], config=case["config"],
                    block=_block(case), num_warps=warps, regs=regs, shared=shared, triton=triton_version)
    body = loop.instrs if loop else []
    res.has_loop = loop is not None
    res.per_iter = len(body)
    cls = {}
    for ins in body:
        cls[ins.cls] = cls.get(ins.cls, 0) + 1
    res.classes = {c: cls[c] for c in CLASS_ORDER if c in cls}
    res.mma_shapes = {}
    for ins in body:
        if ins.cls == "tensor":
            res.mma_shapes[ins.op] = res.mma_shapes.get(ins.op, 0) + 1
    depths = [int(m.group(1), 16) for ins in body if ins.op.startswith("WARPGROUP.DEPBAR")
              for m in [re.search(r"0x([0-9a-f]+)", ins.args)] if m]
    res.wait_depth = min(depths) if depths else None
    res.loop_branches = sum(1 for ins in body if ins.base == "BRA" and ins.addr != (loop.end if loop else -1))
    res.smem_bytes, res.hgmma_smem_bytes, res.tensor_fma = _smem_and_fma(body, warps)
    outside = [i for i in instrs if not (loop and loop.start <= i.addr <= loop.end) and i.base not in ("NOP",)]
    res.other_instrs = len(outside)
    res.other_tensor_fma = _smem_and_fma(outside, warps)[2]
    if loop:
        epi = {i.addr: i for lp in loops if lp.has_mma and lp.start > loop.end for i in lp.instrs}
        res.epi_instrs = len(epi)
        res.epi_tensor_fma = _smem_and_fma(list(epi.values()), warps)[2]
    names = [n for n, kind in _runtime_params(case)]
    res.loads = ptx_loads(ptx, names) if loop else {}
    res.loads = {k: v for k, v in res.loads.items()}
    return res


def _smem_and_fma(body, warps):
    """(load/store-unit shared bytes, HGMMA shared operand bytes, tensor FMAs) per CTA for one pass over
    `body` (the SASS of one warp)."""
    smem = 0
    operands = 0
    fma = 0
    groups = max(1, warps // 4)
    for ins in body:
        if ins.cls == "tensor":
            m, n, k, elem, a_regs = mma_shape(ins)
            if ins.base.endswith("GMMA"):  # one warpgroup instruction, listed in each of its 4 warps' code
                fma += m * n * k * groups
                operands += (n * k * elem + (0 if a_regs else m * k * elem)) * groups
            else:
                fma += m * n * k * warps
        else:
            smem += _smem_bytes(ins) * warps
    return smem, operands, fma


def _runtime_params(case):
    """[(name, kind)] of the kernel's PTX parameters in order (specialize's non-constexpr arguments)."""
    fn = gc._kernel(case["kernel"])
    sig, consts, attrs = gc.specialize(fn, case["args"], case["constexprs"])
    return [(n, t) for n, t in sig.items() if t != "constexpr"]


def decode_cost(count_4bit: LoopCount, count_dense: LoopCount) -> float:
    """Instructions per W element per thread that decoding adds: the 4-bit loop's excess over the dense
    loop of the same tile, (I_4bit - I_dense) * 32 * num_warps / (BLOCK_N * BLOCK_K)."""
    _, bn, bk = count_4bit.block
    return (count_4bit.per_iter - count_dense.per_iter) * 32 * count_4bit.num_warps / (bn * bk)


# Kernel parameters by role, from their names (old and new kernels): the 16-entry code table, the per-block
# scale arrays (fp32 scales, or nested: uint8 absmax, code2, absmax2), the scalar offset, the packed weight.
ROLES = (("code table", re.compile(r"^code(_ptr)?$|table|lut")),
         ("scales", re.compile(r"scale|absmax|code2")),
         ("offset", re.compile(r"offset")),
         ("packed W", re.compile(r"packed|^w_ptr$")))


def role(param: str) -> str:
    for name, pat in ROLES:
        if any(pat.search(p) for p in param.split("+")):
            return name
    return "activations/other"


@dataclass
class Budget:
    name: str
    measured: float
    limit: float
    ok: bool
    text: str


DECODE_BUDGET_SMALL = 3.0  # instructions per W element, decode tiles (BLOCK_M = 16), issue 10
DECODE_BUDGET_LARGE = 4.5  # large tiles (BLOCK_M >= 64), issue 10


def budgets(c4: LoopCount, cd: LoopCount, direction: str, dev: Device = None) -> list[Budget]:
    """Issue 10's budgets for one 4-bit GEMM loop (direction "fwd" or "bwd" = dx) against its dense twin."""
    dev = dev or DEVICES["H100"]
    bm, bn, bk = c4.block
    elems = bn * bk  # W elements per CTA iteration (fwd: BLOCK_N rows x BLOCK_K; dx: BLOCK_K rows x BLOCK_N)
    rows, cols = (bn, bk) if direction == "fwd" else (bk, bn)
    threads = 32 * c4.num_warps
    out = []
    dc = decode_cost(c4, cd)
    limit = DECODE_BUDGET_SMALL if bm == 16 else DECODE_BUDGET_LARGE
    out.append(Budget("decode instructions per W element", dc, limit, dc <= limit,
                      f"({c4.per_iter} - {cd.per_iter} dense) instr/warp/iter x 32 x {c4.num_warps} warps / "
                      f"({bn} x {bk}) W elements = {dc:.2f} per element per thread; budget <= {limit}"))
    by_role = {}
    for param, widths in c4.loads.items():
        by_role.setdefault(role(param), []).append((param, len(widths) * threads))
    code = sum(n for _, n in by_role.get("code table", []))
    out.append(Budget("code-table global/async loads in the loop", code / elems, 0.0, code == 0,
                      f"{code} thread-loads from {'+'.join(p for p, _ in by_role.get('code table', [])) or '-'} "
                      f"per iteration for {elems} W elements = {code / elems:.2f} per element; budget 0 (the table "
                      "in registers or loaded into shared memory once per CTA, before the loop)"))
    blocks = math.ceil(cols / BS)
    pairs = rows * blocks
    allowed = max(pairs, threads * blocks)  # a [rows] vector per block, replicated when threads > rows
    for param, n in by_role.get("scales", []) or [("(none)", 0)]:
        out.append(Budget(f"scale loads ({param})", n / pairs, allowed / pairs, n <= allowed,
                          f"{n} thread-loads per iteration for {rows} rows x {math.ceil(cols / BS)} blocks = "
                          f"{pairs} (row, block) pairs: {n / pairs:.2f} per pair; budget one per pair, or one per "
                          f"thread and block where the tile has fewer rows than its {threads} threads "
                          f"(<= {allowed})"))
    hg = any(k.startswith("HGMMA") for k in c4.mma_shapes)
    if bm >= 64:
        if not hg:
            out.append(Budget("HGMMA overlap", 0, 1, False, "large tile without HGMMA in its loop"))
        elif c4.wait_depth is not None and c4.wait_depth >= 1:
            out.append(Budget("HGMMA overlap", c4.wait_depth, 1, True,
                              f"WARPGROUP.DEPBAR.LE gsb0, 0x{c4.wait_depth:x}: one group in flight (>= 1)"))
        else:
            m, n, k = 8192, 4096, 4096
            red, nout = (k, n) if direction == "fwd" else (n, k)
            t = loop_kernel_time("overlap", c4, dev, ctas=math.ceil(m / bm) * math.ceil(nout / bn),
                                 iters=math.ceil(red / bk), hbm_bytes=0)
            hidden = t.bound == "tensor"
            out.append(Budget("HGMMA overlap", 0 if c4.wait_depth is None else c4.wait_depth, 1, hidden,
                              f"the loop waits on every HGMMA group (wait depth 0x0); the model at M={m} "
                              f"{n}x{k} is {t.bound}-bound ({t.detail}), so the decode's issue time is "
                              f"{'hidden under' if hidden else 'NOT hidden under'} the tensor time"))
    return out


# ---------------------------------------------------------------------------------------------- compiling

def _sources_hash():
    h = hashlib.sha256()
    for p in sorted((ROOT / "lora_kernels").rglob("*.py")) + [ROOT / "tests" / "_gpu_compile.py"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _compile_worker(ids, cache):
    """In a process without TRITON_INTERPRET: build each case, write {id}.json into `cache`."""
    import triton

    by_id = {c["id"]: c for c in _cases()}
    for cid in ids:
        case = by_id[cid]
        path = Path(cache) / (hashlib.sha1(cid.encode()).hexdigest()[:20] + ".json")
        if path.exists():
            print(json.dumps(dict(id=cid, cached=True)), flush=True)
            continue
        try:
            k, log, usage, sass = gc.build(case)
            m = gc.RES_RE.search(usage)
            c = count_sass(case, sass, k.asm["ptx"], int(m.group(1)) if m else 0, int(k.metadata.shared),
                           triton.__version__)
        except Exception as e:  # noqa: BLE001  a case that does not build is a result
            c = LoopCount(id=cid, ok=False, error=f"{type(e).__name__}: {e}"[:1000], kernel=case["kernel"],
                          mode=case["mode"], config=case["config"], block=_block(case),
                          num_warps=case["num_warps"], triton=triton.__version__)
        path.write_text(json.dumps(dataclasses.asdict(c)))
        print(json.dumps(dict(id=cid, ok=c.ok, per_iter=c.per_iter)), flush=True)


def _from_json(d):
    d = dict(d)
    d["block"] = tuple(d["block"])
    return LoopCount(**d)


def count_cases(ids, cache=None, python=None, progress=None, workers=1):
    """{id: LoopCount} for cases of tests/_gpu_compile.cases(), compiled in clean subprocesses (no
    TRITON_INTERPRET, fresh TRITON_CACHE_DIR). `cache`: a directory where counts are kept between calls
    (keyed by the kernels' sources and the triton that runs); None: a temporary one. `python`: the
    interpreter to compile with (another venv's triton); default this one."""
    ids = list(dict.fromkeys(ids))
    python = python or sys.executable
    tmp = None
    if cache is None:
        tmp = tempfile.mkdtemp(prefix="lk-static-")
        cache = tmp
    ver = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                         text=True, check=True).stdout.strip()
    sub = Path(cache) / f"triton-{ver}-{_sources_hash()}"
    sub.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "LORA_KERNELS_BACKEND", "TRITON_CACHE_DIR")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    todo = [i for i in ids if not (sub / (hashlib.sha1(i.encode()).hexdigest()[:20] + ".json")).exists()]
    chunks = [todo[w::max(1, workers)] for w in range(max(1, workers))] if todo else []
    procs = []
    try:
        for chunk in chunks:
            if not chunk:
                continue
            tcache = tempfile.mkdtemp(prefix="lk-static-triton-")
            errf = open(os.path.join(tcache, "stderr.txt"), "w+")  # a file: a full pipe would stall the worker
            procs.append((subprocess.Popen(
                [python, "-m", "benchmarks.static_model", "--_worker", str(sub), *chunk], cwd=str(ROOT),
                env={**env, "TRITON_CACHE_DIR": tcache}, stdout=subprocess.PIPE, stderr=errf, text=True),
                tcache, errf))
        for p, tcache, errf in procs:
            for line in p.stdout:
                if progress and line.startswith("{"):
                    progress(json.loads(line))
            if p.wait() != 0:
                errf.seek(0)
                raise RuntimeError(f"compile worker exited {p.returncode}:\n{errf.read()[-3000:]}")
    finally:
        import shutil

        for _, tcache, errf in procs:
            errf.close()
            shutil.rmtree(tcache, ignore_errors=True)
    out = {i: _from_json(json.loads((sub / (hashlib.sha1(i.encode()).hexdigest()[:20] + ".json")).read_text()))
           for i in ids}
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def count_loop(case, cache=None, python=None) -> LoopCount:
    """The main loop of one case (a dict of tests/_gpu_compile.cases() or its id), compiled and counted."""
    cid = case if isinstance(case, str) else case["id"]
    return count_cases([cid], cache=cache, python=python)[cid]


def format_count(c: LoopCount) -> str:
    if not c.ok:
        return f"{c.id}: does not build: {c.error.splitlines()[0][:200]}"
    cls = " ".join(f"{k}={v}" for k, v in c.classes.items())
    mma = " ".join(f"{'.'.join(k.split('.')[:2])}*{v}" for k, v in c.mma_shapes.items()) or "no MMA"
    wait = "-" if c.wait_depth is None else f"0x{c.wait_depth:x}"
    loads = " ".join(f"{k}:{len(v)}x{'/'.join(sorted({str(w) for w in v}))}B" for k, v in sorted(c.loads.items()))
    return (f"{c.id}: {c.per_iter} instr/warp/iter [{cls}] {mma} wait={wait} regs={c.regs} "
            f"shared={c.shared}B loads/thread/iter: {loads or '-'}")



# ---------------------------------------------------------------------------------------------- timing

MEM_LATENCY_S = 600e-9  # assumption: one HBM round trip on Hopper (third-party microbenchmarks quote ~400-700 ns)
BS = 64  # NF4 blocksize of the bench (presets: quantize_nf4, blocksize 64)
SCALE_BYTES = 4  # the kernels read fp32 scales (block_scales decodes the nested uint8 absmax per call)
HOST_SCALE_KERNELS = 7  # block_scales, nested state: arange, //, long(), 2 gathers, *, + (PyTorch ops per call)


def tensor_efficiency(dev: Device) -> float:
    """Calibrated reachable fraction of the dense tensor rate (cuBLAS's measured rate / the datasheet's)."""
    return dev.cublas_flops / (2 * dev.fma_per_clk * dev.sms * dev.clock_hz)


def occupancy(c: LoopCount, dev: Device) -> int:
    """CTAs per SM from registers (256-register allocation units per warp), shared memory (1 KiB reserved
    per CTA), threads and the CTA limit."""
    warps = c.num_warps
    per_warp = math.ceil(max(c.regs, 1) * 32 / 256) * 256
    by_regs = (dev.regs_per_sm // per_warp) // warps
    by_smem = dev.smem_per_sm // (c.shared + 1024)
    by_threads = dev.max_threads_per_sm // (32 * warps)
    return max(0, min(by_regs, by_smem, by_threads, dev.max_ctas_per_sm))


@dataclass
class KernelTime:
    name: str
    seconds: float
    bound: str  # issue | tensor | smem | latency | hbm | launch
    detail: str = ""


def loop_kernel_time(name, c: LoopCount, dev: Device, *, ctas, iters, hbm_bytes) -> KernelTime:
    """A kernel of `ctas` CTAs each running `iters` iterations of c's main loop (plus its other code once).

    Per CTA iteration: issue = instr/warp/iter * warps / 4 clk; tensor = FMAs / (2048 * efficiency);
    shared = bytes / 128; latency = one memory round trip / (stages - 1) loads in flight. Alone, a CTA
    takes max(issue, shared, latency) + tensor if it waits on every HGMMA group (wait depth 0), else the
    max of all four; k co-resident CTAs overlap each other: max(k*issue, k*tensor, k*shared, alone)."""
    clk = dev.clock_hz
    eff = tensor_efficiency(dev)
    warps = c.num_warps
    stages = int(c.config.rsplit("s", 1)[-1]) if re.search(r"s\d+$", c.config) else 2
    issue = c.per_iter * warps / dev.issue_per_clk
    tensor = c.tensor_fma / (dev.fma_per_clk * eff)
    # Calibration: the load/store unit's traffic and HGMMA's operand reads are taken as separate paths,
    # each at the shared-memory rate (summed, they made the dense Triton GEMM smem-bound at ~0.85x cuBLAS).
    smem = max(c.smem_bytes, c.hgmma_smem_bytes) / dev.smem_bytes_per_clk
    lat = MEM_LATENCY_S * clk / max(1, stages - 1)
    alone = (max(issue, smem, lat) + tensor) if c.wait_depth == 0 else max(issue, tensor, smem, lat)
    occ = max(1, occupancy(c, dev))
    per_sm = math.ceil(ctas / dev.sms)

    def rnd(k):
        terms = {"issue": k * issue, "tensor": k * tensor, "smem": k * smem,
                 ("serial" if c.wait_depth == 0 and alone > max(issue, smem, lat, tensor) else "latency"): alone}
        return max(terms.values()), max(terms, key=terms.get)

    full, rem = divmod(per_sm, occ)
    t_full, b_full = rnd(occ)
    t_rem, b_rem = rnd(rem) if rem else (0.0, b_full)
    loop_clk = iters * (full * t_full + t_rem)
    bound = b_full if full else b_rem
    # Non-loop code (prologue, LoRA epilogue) once per CTA, overlapped across co-resident CTAs; one
    # memory round trip per round to fill the pipeline and one to store.
    other_issue = c.other_instrs * warps / dev.issue_per_clk
    other_tensor = c.other_tensor_fma / (dev.fma_per_clk * eff)
    rounds = full + (1 if rem else 0)
    k = min(occ, per_sm)
    other_clk = rounds * (max(k * other_issue, other_issue + other_tensor) + 2 * MEM_LATENCY_S * clk)
    sm_s = (loop_clk + other_clk) / clk
    hbm_s = hbm_bytes / dev.hbm_reached
    if hbm_s > sm_s:
        bound = "hbm"
    seconds = max(sm_s, hbm_s) + dev.launch_s
    detail = (f"{c.config} occ={occupancy(c, dev)} ctas={ctas} iters={iters} per-iter clk: issue={issue:.0f} "
              f"tensor={tensor:.0f} smem={smem:.0f} alone={alone:.0f}; loop={loop_clk / clk * 1e6:.1f}us "
              f"other={other_clk / clk * 1e6:.1f}us hbm={hbm_s * 1e6:.1f}us; LoRA epilogue "
              f"{100 * epilogue_share(c, dev, iters):.1f}% of the loop")
    return KernelTime(name, seconds, bound, detail)


def epilogue_share(c: LoopCount, dev: Device, iters: int) -> float:
    """One trip of the LoRA epilogue's MMA loop (issue + tensor, one CTA) over the main loop's time for one CTA
    alone on an SM (the same terms as loop_kernel_time's `alone`)."""
    eff = tensor_efficiency(dev)
    warps = c.num_warps
    issue = c.per_iter * warps / dev.issue_per_clk
    tensor = c.tensor_fma / (dev.fma_per_clk * eff)
    smem = max(c.smem_bytes, c.hgmma_smem_bytes) / dev.smem_bytes_per_clk
    per_iter = (max(issue, smem) + tensor) if c.wait_depth == 0 else max(issue, tensor, smem)
    epi = c.epi_instrs * warps / dev.issue_per_clk + c.epi_tensor_fma / (dev.fma_per_clk * eff)
    return epi / max(1.0, per_iter * iters)


def stream_time(name, dev: Device, hbm_bytes, flops=0.0, launches=1) -> KernelTime:
    """A kernel (or a few PyTorch ops) at the HBM rate reached, or cuBLAS's measured FLOP rate."""
    hbm = hbm_bytes / dev.hbm_reached
    mma = flops / dev.cublas_flops
    return KernelTime(name, max(hbm, mma) + launches * dev.launch_s, "hbm" if hbm >= mma else "tensor",
                      f"hbm={hbm * 1e6:.1f}us mma={mma * 1e6:.1f}us launches={launches}")


def cublas_time(name, dev, m, n, k):
    return stream_time(name, dev, 2 * (m * k + n * k + m * n), 2.0 * m * n * k)


# ---------------------------------------------------------------------------------------------- launches

def _cfg(case):
    c = case["constexprs"]
    return c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], case["num_warps"], case["num_stages"]


# Which cases of tests/_gpu_compile.cases() serve which launch, and how configs.config_allowed is asked
# about it: per launch, options in order of preference (case kernel, case mode for M > 1, for M = 1,
# config_allowed keywords); the first option whose kernel cases() lists is used, and only the keywords
# config_allowed's signature takes are passed. Edit here when cases() renames a kernel or a mode.
LAUNCHES = {
    ("4bit", "fwd"): [("qlora_fwd", "fwd", "fwd-M1", dict(kind="qlora_fwd")),
                      ("fused_linear/4bit", "fwd", "fwd-M1", dict(base=2, paired=True, w_trans=True))],
    ("4bit", "bwd"): [("qlora_dx", "bwd-nodrop", "bwd-nodrop", dict(kind="qlora_dx")),
                      ("fused_linear/4bit", "bwd-nodrop", "bwd-nodrop", dict(base=2, paired=True, w_trans=False))],
    ("dense", "fwd"): [("fused_linear/dense", "fwd", "fwd-M1", dict(kind="dense", base=1, paired=False,
                                                                     w_trans=False))],
    ("dense", "bwd"): [("fused_linear/dense", "bwd-nodrop", "bwd-nodrop", dict(kind="dense", base=1, paired=False,
                                                                            w_trans=False))],
}


@lru_cache(maxsize=None)
def _cases():
    return tuple(gc.cases())


def launch_option(weight, direction):
    """(case kernel, mode, mode at M = 1, config_allowed keywords) that today's cases() serves."""
    kernels = {c["kernel"] for c in _cases()}
    for opt in LAUNCHES[(weight, direction)]:
        if opt[0] in kernels:
            return opt
    raise LookupError(f"no kernel of tests/_gpu_compile.cases() serves the {weight} {direction} GEMM: "
                      f"update static_model.LAUNCHES")


def _allowed(cfg, m, extra, arch, dtype_bytes):
    import inspect

    from lora_kernels.ops import configs

    params = inspect.signature(configs.config_allowed).parameters
    kw = {k: v for k, v in dict(extra, m=m, arch=arch, dtype_bytes=dtype_bytes, dropout=False).items()
          if k in params}
    return configs.config_allowed(*cfg, **kw)


def gemm_candidates(weight, direction, m, arch=90, dtype="bf16"):
    """Case ids the autotuner may pick for this launch: weight "4bit" or "dense", direction "fwd" or "bwd"
    (dx, no dropout), M rows."""
    kernel, mode, mode1, extra = launch_option(weight, direction)
    mode = mode1 if m == 1 else mode
    out = [c["id"] for c in _cases()
           if (c["kernel"], c["mode"], c["dtype"], c["arch"]) == (kernel, mode, dtype, arch)
           and _allowed(_cfg(c), m, extra, arch, gc.DTYPES[dtype])]
    if not out:
        raise LookupError(f"no case of tests/_gpu_compile.cases() serves {weight} {direction} M={m} "
                          f"(kernel {kernel!r}, mode {mode!r}): update static_model.LAUNCHES")
    return out


def case_for(weight, direction, config, m=16, arch=90, dtype="bf16"):
    """The case id of a launch at a tile config string such as '128x128x64 w8 s3' (m = 1: the M = 1 mode)."""
    kernel, mode, mode1, _ = launch_option(weight, direction)
    mode = mode1 if m == 1 else mode
    for c in _cases():
        if (c["kernel"], c["mode"], c["dtype"], c["arch"], c["config"]) == (kernel, mode, dtype, arch, config):
            return c["id"]
    return None


def dense_twin(case_id):
    """The dense (BASE=1) case with the same tile, direction and M mode as a 4-bit case, or None."""
    c = next(x for x in _cases() if x["id"] == case_id)
    for direction in ("fwd", "bwd"):
        kernel, mode, mode1, _ = launch_option("4bit", direction)
        if c["kernel"] == kernel and c["mode"] in (mode, mode1):
            m = 1 if (c["mode"] == mode1 and mode1 != mode) else 16
            return case_for("dense", direction, c["config"], m=m, arch=c["arch"], dtype=c["dtype"])
    return None


def lora_down_case(r=16, dtype="bf16", arch=90):
    rb = gc._rank_block(r, 64)
    return next(c["id"] for c in _cases() if c["kernel"] == "lora_down" and c["mode"] == f"R_BLOCK={rb}"
                and c["dtype"] == dtype and c["arch"] == arch)


def needed_cases(ms, benches):
    ids = []
    for m in ms:
        for weight in ("4bit", "dense"):
            ids += gemm_candidates(weight, "fwd", m)
            if "layer_fwd_bwd" in benches:
                ids += gemm_candidates(weight, "bwd", m)
    ids.append(lora_down_case())
    return list(dict.fromkeys(ids))


def best_gemm(counts, weight, direction, m, out_features, red, r, dev):
    """The fastest candidate on the model (what the autotuner would keep): (KernelTime, LoopCount)."""
    four_bit = weight == "4bit"
    best = None
    for cid in gemm_candidates(weight, direction, m):
        c = counts[cid]
        if not c.ok:
            continue
        bm, bn, bk = c.block
        ctas = math.ceil(m / bm) * math.ceil(out_features / bn)
        w_bytes = out_features * red * (0.5 + scale_bytes(c) / BS) if four_bit else 2 * out_features * red
        hbm = w_bytes + 2 * (m * red + m * out_features + m * r + out_features * r)
        t = loop_kernel_time(f"{weight} GEMM {direction}", c, dev, ctas=ctas, iters=math.ceil(red / bk), hbm_bytes=hbm)
        if best is None or t.seconds < best[0].seconds:
            best = (t, c)
    if best is None:
        raise RuntimeError(f"no candidate of the {weight} {direction} GEMM builds for M={m}")
    return best


def nested_in_kernel(c: LoopCount) -> bool:
    """Whether the 4-bit loop decodes double-quantized scales itself (reads the uint8 absmax), so that no
    PyTorch block_scales pass runs per call."""
    return any("absmax" in k for k in c.loads)


def scale_bytes(c: LoopCount) -> int:
    """Scale bytes per block the 4-bit loop streams: 1 (uint8 absmax, nested decoded in-kernel) or 4 (fp32)."""
    return 1 if nested_in_kernel(c) else SCALE_BYTES


def lora_down_time(counts, m, k, r, dev):
    """The down-projection as launch_lora_down runs it: K split over programs when the (M, r) tiles are few,
    then the fp32 partial sums added (a stream over them)."""
    from lora_kernels.ops.fused_linear_kernels import LORA_DOWN_MIN_PROGRAMS

    c = counts[lora_down_case(r)]
    bm, bk = c.block[0] or 64, c.block[2] or 64
    programs = math.ceil(m / bm) * math.ceil(r / 16)
    split = min(math.ceil(k / bk), max(1, LORA_DOWN_MIN_PROGRAMS // programs))
    k_per = math.ceil(math.ceil(k / split) / bk) * bk
    split = math.ceil(k / k_per)
    t = loop_kernel_time("lora_down", c, dev, ctas=programs * split, iters=math.ceil(k_per / bk),
                         hbm_bytes=2 * (m * k + r * k) + (4 * split if split > 1 else 2) * m * r)
    if split > 1:
        return [t, stream_time("lora_down split-K sum", dev, 4 * split * m * r + 2 * m * r)]
    return [t]


def host_scales(n, k, dev):
    """block_scales() on the nested (double-quant) state, PyTorch ops on every call: reads the uint8 absmax,
    builds int64 indices, gathers, multiplies, adds: ~85 bytes per block read and written, 7 launches."""
    return stream_time("block_scales (PyTorch)", dev, 85 * n * k / BS, launches=HOST_SCALE_KERNELS)


def dequant_time(n, k, dev):
    return stream_time("dequantize_4bit", dev, n * k * (0.5 + SCALE_BYTES / BS + 2))


def epilogue_time(m, n, r, dev):
    return stream_time("epilogue (BASE=0)", dev, 2 * (2 * m * n + m * r + n * r))


def predict(counts, bench, n, k, m, r, dev, path_min_m=None):
    """{provider: (seconds, [KernelTime])} for one point. n = out_features, k = in_features."""
    from lora_kernels.ops import configs

    path_min_m = configs.DEQUANT_PATH_MIN_M if path_min_m is None else path_min_m
    train = bench == "layer_fwd_bwd"
    down = lora_down_time(counts, m, k, r, dev)
    scales = host_scales(n, k, dev)
    fwd_fused, cfg_f = best_gemm(counts, "4bit", "fwd", m, n, k, r, dev)
    fused = [*down, fwd_fused] if nested_in_kernel(cfg_f) else [scales, *down, fwd_fused]
    deq = [*down, scales, dequant_time(n, k, dev), cublas_time("cuBLAS x W^T", dev, m, n, k),
           epilogue_time(m, n, r, dev)]
    dense_fwd, cfg_d = best_gemm(counts, "dense", "fwd", m, n, k, 0, dev)
    triton_dense = [dense_fwd]
    cublas = [cublas_time("cuBLAS x W^T", dev, m, n, k)]
    if train:
        small = [stream_time("dxa = dy B", dev, 2 * (m * n + n * r + m * r)),
                 stream_time("dA = s dxa^T x", dev, 2 * (m * k + m * r + 2 * r * k), launches=2),
                 stream_time("dB = s dy^T xa", dev, 2 * (m * n + m * r + 2 * n * r), launches=2)]
        bwd_fused, cfg_b = best_gemm(counts, "4bit", "bwd", m, k, n, r, dev)
        fused += small + ([bwd_fused] if nested_in_kernel(cfg_b) else [host_scales(n, k, dev), bwd_fused])
        deq += small + [host_scales(n, k, dev), dequant_time(n, k, dev),
                        cublas_time("cuBLAS dy W", dev, m, k, n), epilogue_time(m, k, r, dev)]
        dense_bwd, _ = best_gemm(counts, "dense", "bwd", m, k, n, 0, dev)
        triton_dense.append(dense_bwd)
        cublas.append(cublas_time("cuBLAS dy W", dev, m, k, n))
    total = lambda parts: sum(p.seconds for p in parts)  # noqa: E731
    out = {
        "lora_kernels_fused": (total(fused), fused, cfg_f),
        "lora_kernels_dequant": (total(deq), deq, None),
        "triton_dense": (total(triton_dense), triton_dense, cfg_d),
        "cublas_bf16": (total(cublas), cublas, None),
    }
    dispatched = "lora_kernels_dequant" if m >= path_min_m else "lora_kernels_fused"
    out["lora_kernels"] = out[dispatched]
    return out


def memory_floor(n, k, dev, datasheet=True, scale_bytes=SCALE_BYTES):
    """Seconds to read the packed 4-bit weight and its scales once (the decode shapes' floor)."""
    return n * k * (0.5 + scale_bytes / BS) / (dev.hbm_peak if datasheet else dev.hbm_reached)


# ---------------------------------------------------------------------------------------------- outputs

BENCH_SHAPES = None  # filled from lora_kernels.bench.presets.SHAPE_PRESETS["design"] at run time
BENCH_MS = (1, 16, 512, 4096, 8192)
RANK = 16
PREDICTED = "_predicted"  # lora_kernels.bench.results.PREDICTED_SUFFIX: report/plot skip these rows


def prediction_rows(preds, dev: Device, env):
    from lora_kernels.bench.results import make_row

    rows = []
    for (bench, n, k, m), by in preds.items():
        for prov in ("lora_kernels", "lora_kernels_fused", "lora_kernels_dequant", "triton_dense", "cublas_bf16"):
            seconds = by[prov][0]
            r = 0 if prov in ("cublas_bf16", "triton_dense") else RANK
            row = make_row(bench, prov + PREDICTED, m, n, k, r, "bf16", (seconds * 1e3, 0.0, 0.0), None, env)
            row["ms_p20"] = row["ms_p80"] = None
            rows.append(row)
    return rows


def targets(preds, dev: Device):
    """[(target, predicted, status)] for issue 10's targets on the model (sm_90, r = 16, layer_fwd)."""
    out = []
    key = ("layer_fwd", 4096, 4096, 8192)
    if key in preds:
        by = preds[key]
        best = min(("lora_kernels_fused", "lora_kernels_dequant"), key=lambda p: by[p][0])
        v = by[best][0] / by["cublas_bf16"][0]
        out.append(("forward M=8192 4096x4096, best path <= 1.15x cuBLAS bf16", f"{v:.2f}x ({best[13:]} path)",
                    "met" if v <= 1.15 else f"missed by {v / 1.15:.2f}x"))
        gemm = [p for p in by["lora_kernels_fused"][1] if p.name == "4bit GEMM fwd"][0]
        c = by["lora_kernels_fused"][2]
        share = epilogue_share(c, dev, math.ceil(4096 / c.block[2]))
        out.append(("LoRA epilogue <= 3% of the fused GEMM's loop (M=8192 4096x4096)", f"{100 * share:.1f}% "
                    f"({c.config}, {gemm.bound}-bound loop)", "met" if share <= 0.03 else "missed"))
    for m in (1, 16):
        key = ("layer_fwd", 8192, 8192, m)
        if key not in preds:
            continue
        by = preds[key]
        c = by["lora_kernels_fused"][2]
        floor = memory_floor(8192, 8192, dev, True, scale_bytes(c))
        gemm = [p for p in by["lora_kernels_fused"][1] if p.name == "4bit GEMM fwd"][0]
        v = gemm.seconds / floor
        out.append((f"decode M={m} 8192x8192: fused GEMM within 1.25x of the memory floor ({floor * 1e6:.1f} us: "
                    f"packed bytes + {scale_bytes(c)}-byte scales at {dev.hbm_peak / 1e12:.2f} TB/s)",
                    f"{v:.2f}x ({gemm.seconds * 1e6:.1f} us, {gemm.bound}-bound; the whole op "
                    f"{by['lora_kernels'][0] * 1e6:.1f} us)", "met" if v <= 1.25 else f"missed by {v / 1.25:.2f}x"))
    return out


def markdown(preds, dev: Device, env, calib) -> str:
    lines = [f"#### {dev.name}: predicted by the static model, not measured", "",
             f"Device figures: benchmarks/static_model.py DEVICES ({dev.name}: HBM {dev.hbm_reached / 1e12:.1f} TB/s "
             f"reached of {dev.hbm_peak / 1e12:.2f}, cuBLAS bf16 {dev.cublas_flops / 1e12:.0f} TFLOP/s). Kernels "
             f"compiled for sm_90 by triton {env['triton']} at {env['commit']}, {env['date'][:10]}; r = {RANK}, "
             f"bf16, NF4 blocksize {BS} with double quantization. ms per call; `vs cuBLAS` = lora_kernels / cuBLAS "
             f"bf16 (r = 0); lora_kernels takes the path configs.choose_path dispatches to; the fused GEMM's tile is "
             f"the model's pick among the autotuner's candidates, with its bound. Calibration: {calib}. Triton "
             "kernels only (csrc/ CUDA kernels: benchmarks/csrc_model.py); host overhead (Python, autograd) is not "
             "modelled; launches count 2 us each.", ""]
    for bench in ("layer_fwd", "layer_fwd_bwd"):
        keys = [key for key in preds if key[0] == bench]
        if not keys:
            continue
        lines += [f"**{bench}**", "",
                  "| shape NxK | M | lora_kernels | fused path | dequant path | cuBLAS bf16 | vs cuBLAS | "
                  "Triton dense (r=0) | fused GEMM: tile, bound |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for key in sorted(keys, key=lambda t: (t[1] * t[2], t[1], t[3])):
            _, n, k, m = key
            by = preds[key]
            ours, fused, deq, cub, dense = (by[p][0] for p in ("lora_kernels", "lora_kernels_fused",
                                                               "lora_kernels_dequant", "cublas_bf16",
                                                               "triton_dense"))
            gemm = [p for p in by["lora_kernels_fused"][1] if p.name == "4bit GEMM fwd"][0]
            cfg = by["lora_kernels_fused"][2]
            lines.append(f"| {n}x{k} | {m} | {_ms(ours)} | {_ms(fused)} | {_ms(deq)} | {_ms(cub)} | "
                         f"{ours / cub:.2f}x | {_ms(dense)} | {cfg.config}, {gemm.bound} |")
        lines.append("")
    checks = targets(preds, dev)
    if checks:
        lines += ["**issue 10's targets, on the model**", "", "| target | predicted | status |", "| --- | --- | --- |"]
        lines += [f"| {t} | {v} | {st} |" for t, v, st in checks]
        lines.append("")
    return "\n".join(lines)


def _ms(s):
    ms = s * 1e3
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _env(dev: Device, python_triton):
    from lora_kernels.bench.results import environment

    env = environment("cpu")
    env["gpu"] = f"{dev.name} (static model, predicted)"
    env["triton"] = python_triton
    return env


def calibration(counts, dev: Device) -> str:
    """The dense Triton GEMM (BASE=1) against the calibrated roofline at M = 8192."""
    out = []
    for n in (4096, 8192):
        t, c = best_gemm(counts, "dense", "fwd", 8192, n, n, 0, dev)
        tflops = 2 * 8192 * n * n / t.seconds / 1e12
        out.append(f"dense Triton GEMM at M=8192 {n}x{n}: {c.config}, {t.bound}-bound, {tflops:.0f} TFLOP/s = "
                   f"{t.seconds / (2 * 8192 * n * n / dev.cublas_flops):.2f}x the roofline time")
    return "; ".join(out)


def _breakdown(parts):
    return " + ".join(f"{p.name} {p.seconds * 1e6:.1f}us ({p.bound})" for p in parts)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static_model", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Every time it prints or writes is a prediction, labelled as one.")
    ap.add_argument("--device", default="H100,H200",
                    help=f"comma list of device rows of the figure table, from {', '.join(DEVICES)} "
                         "(default %(default)s)")
    ap.add_argument("--bench", default="layer_fwd,layer_fwd_bwd", help="comma list of layer_fwd, layer_fwd_bwd")
    ap.add_argument("--m", default=",".join(map(str, BENCH_MS)), help="comma list of M (default %(default)s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="directory for static-sm90-<date>.csv/.md (default %(default)s); '-' writes nothing")
    ap.add_argument("--cache", default=None,
                    help="directory to keep counts between runs (keyed by kernel sources and triton version)")
    ap.add_argument("--python", default=None, help="python whose triton compiles (default: this one)")
    ap.add_argument("--workers", type=int, default=1, help="compile processes (default 1)")
    ap.add_argument("--counts-only", action="store_true", help="print the loop counts, predict nothing")
    args = ap.parse_args(argv)
    from lora_kernels.bench.presets import SHAPE_PRESETS

    devs = [DEVICES[d.strip()] for d in args.device.split(",") if d.strip()]
    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    ms = [int(x) for x in args.m.split(",")]
    ids = needed_cases(ms, benches)
    print(f"compiling {len(ids)} kernel/configs for sm_90 on CPU (cached ones are reused)...", flush=True)
    counts = count_cases(ids, cache=args.cache, python=args.python, workers=args.workers,
                         progress=lambda d: print(f"  {'cached ' if d.get('cached') else ''}{d['id']}", flush=True))
    print("\nmain-loop counts per warp per iteration (SASS, sm_90):")
    for cid in ids:
        print("  " + format_count(counts[cid]))
    _print_decode(counts)
    if args.counts_only:
        return 0
    triton_version = next((c.triton for c in counts.values() if c.triton), "?")
    rows, mds = [], []
    for dev in devs:
        env = _env(dev, triton_version)
        calib = calibration(counts, dev)
        print(f"\nPREDICTED, {dev.name}. Calibration: {calib}")
        preds = {}
        for bench in benches:
            for n, k in SHAPE_PRESETS["design"]:
                for m in ms:
                    by = preds[(bench, n, k, m)] = predict(counts, bench, n, k, m, RANK, dev)
                    print(f"PREDICTED {dev.name} {bench} {n}x{k} M={m}: " + ", ".join(
                        f"{p}={by[p][0] * 1e3:.4f}ms" for p in
                        ("lora_kernels", "lora_kernels_fused", "lora_kernels_dequant", "triton_dense", "cublas_bf16")),
                          flush=True)
                    print(f"    fused: {_breakdown(by['lora_kernels_fused'][1])}")
                    gemm = [x for x in by["lora_kernels_fused"][1] if x.name == "4bit GEMM fwd"][0]
                    print(f"    fused GEMM: {gemm.detail}")
                    if m >= 4096 or m == 1:
                        print(f"    dequant: {_breakdown(by['lora_kernels_dequant'][1])}")
        for n in (8192,):
            for sb in (4, 1):
                print(f"PREDICTED {dev.name} decode floor {n}x{n}: packed bytes + {sb}-byte scales at the "
                      f"datasheet {dev.hbm_peak / 1e12:.2f} TB/s = {memory_floor(n, n, dev, True, sb) * 1e6:.1f} us, "
                      f"at the reached {dev.hbm_reached / 1e12:.1f} TB/s = "
                      f"{memory_floor(n, n, dev, False, sb) * 1e6:.1f} us")
        rows += prediction_rows(preds, dev, env)
        mds.append(markdown(preds, dev, env, calib))
    md = "### Predicted by the static model, not measured\n\n" + "\n".join(mds)
    print("\n" + md)
    if args.out != "-":
        from lora_kernels.bench.results import append_csv

        day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        csv_path = Path(args.out) / f"static-sm90-{day}.csv"
        if csv_path.exists():
            csv_path.unlink()  # one model run per day's file: rewritten, not appended
        append_csv(str(csv_path), rows)
        csv_path.with_suffix(".md").write_text(md + "\n")
        print(f"wrote {csv_path} and {csv_path.with_suffix('.md')} (predicted rows, not measurements)")
    return 0


def _depth(c):
    return "-" if c.wait_depth is None else c.wait_depth


def _print_decode(counts):
    """Decode instructions per W element (the budget's figure) for each 4-bit case with a dense twin."""
    lines = []
    for cid, c in counts.items():
        if not c.ok:
            continue
        twin = counts.get(dense_twin(cid) or "")
        if twin is None or not twin.ok:
            continue
        lines.append(f"  {cid}: {decode_cost(c, twin):.2f} instr/W element/thread "
                     f"({c.per_iter} - {twin.per_iter} per warp per iter), wait depth "
                     f"{_depth(c)} (dense {_depth(twin)})")
    if lines:
        print("\ndecode cost over the dense loop of the same tile:")
        print("\n".join(lines))


def _main_counts(ids, cache, python):
    by = count_cases(ids, cache=cache, python=python, progress=lambda d: print(f"  compiled {d['id']}",
                                                                              file=sys.stderr, flush=True))
    for cid in ids:
        print(format_count(by[cid]))


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--_worker":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("TRITON_INTERPRET=1: the kernels would be interpreted functions")
    _compile_worker(sys.argv[3:], sys.argv[2])
elif __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--count":
    _main_counts(sys.argv[2:], os.environ.get("STATIC_MODEL_CACHE"), None)
elif __name__ == "__main__" and not (len(sys.argv) > 1 and sys.argv[1] == "--_worker"):
    sys.exit(main())
