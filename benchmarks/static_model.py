"""Static sm_90 cost model: the kernels' main loops counted from SASS, and times predicted from them.

    python -m benchmarks.static_model [--device H100|H200] [--bench layer_fwd,layer_fwd_bwd] [--out DIR]
                                     [--cache DIR] [--counts-only] [--count CASE_ID ...]

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

Calibration (once, on paper): with the figures of DEVICES as cited, the dense Triton GEMM (BASE=1,
128x128x64, 8 warps) comes out tensor-bound, its loop issue time ~0.3x its tensor time; the only
fitted figure is the reachable tensor rate, set to cuBLAS's measured bf16 8192^3 rate (~780 of 989
TFLOP/s, DESIGN.md) so that this dense kernel lands at ~1.0x cuBLAS at M = 8192, i.e. on its roofline.
Issue and shared-memory rates are peak figures: issue-bound predictions are lower bounds (latency,
dependent-issue stalls and bank conflicts are not modelled), as are HBM times (the compulsory bytes).

API for tests and scripts (`from benchmarks import static_model as sm`):
    sm.count_loop(case_or_id) -> LoopCount        one case of tests/_gpu_compile.cases(), compiled and counted
    sm.count_cases(ids, cache=None) -> {id: LoopCount}   several, in one clean subprocess
    sm.decode_cost(count_4bit, count_dense) -> instructions per W element per thread (the budget's figure)
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
    smem_bytes: int = 0  # per CTA per iteration, incl. HGMMA shared operands
    tensor_fma: int = 0  # per CTA per iteration
    loads: dict = field(default_factory=dict)  # parameter -> [bytes per thread of each load] per iteration
    other_instrs: int = 0  # per warp, outside the main loop, loops other than it counted once
    other_tensor_fma: int = 0  # per CTA, outside the main loop
    loop_branches: int = 0  # forward branches inside the loop body (counts assume every path runs)
    has_loop: bool = True

    def load_bytes(self, param_substr):
        """Bytes per CTA iteration loaded from parameters whose name contains param_substr."""
        threads = 32 * self.num_warps
        return sum(sum(ws) * threads for k, ws in self.loads.items() if param_substr in k)

    def load_count(self, param_substr):
        """Thread-level loads per CTA iteration from parameters whose name contains param_substr."""
        threads = 32 * self.num_warps
        return sum(len(ws) * threads for k, ws in self.loads.items() if param_substr in k)


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
    res.smem_bytes, res.tensor_fma = _smem_and_fma(body, warps)
    outside = [i for i in instrs if not (loop and loop.start <= i.addr <= loop.end) and i.base not in ("NOP",)]
    res.other_instrs = len(outside)
    res.other_tensor_fma = _smem_and_fma(outside, warps)[1]
    names = [n for n, kind in _runtime_params(case)]
    res.loads = ptx_loads(ptx, names) if loop else {}
    return res


def _smem_and_fma(body, warps):
    """(shared-memory bytes, tensor FMAs) per CTA for one pass over `body` (SASS of one warp)."""
    smem = 0
    fma = 0
    groups = max(1, warps // 4)
    for ins in body:
        if ins.cls == "tensor":
            m, n, k, elem, a_regs = mma_shape(ins)
            if ins.base.endswith("GMMA"):  # one warpgroup instruction, listed in each of its 4 warps' code
                fma += m * n * k * groups
                smem += (n * k * elem + (0 if a_regs else m * k * elem)) * groups
            else:
                fma += m * n * k * warps
        else:
            smem += _smem_bytes(ins) * warps
    return smem, fma


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


# ---------------------------------------------------------------------------------------------- compiling

def _sources_hash():
    h = hashlib.sha256()
    for p in sorted((ROOT / "lora_kernels").rglob("*.py")) + [ROOT / "tests" / "_gpu_compile.py"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _compile_worker(ids, cache):
    """In a process without TRITON_INTERPRET: build each case, write {id}.json into `cache`."""
    import triton

    by_id = {c["id"]: c for c in gc.cases()}
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
            procs.append((subprocess.Popen(
                [python, "-m", "benchmarks.static_model", "--_worker", str(sub), *chunk], cwd=str(ROOT),
                env={**env, "TRITON_CACHE_DIR": tcache}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True), tcache))
        for p, tcache in procs:
            for line in p.stdout:
                if progress and line.startswith("{"):
                    progress(json.loads(line))
            err = p.stderr.read()
            if p.wait() != 0:
                raise RuntimeError(f"compile worker exited {p.returncode}:\n{err[-3000:]}")
    finally:
        import shutil

        for _, tcache in procs:
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
    mma = " ".join(f"{k.split('.')[0]}.{k.split('.')[1]}x{v}" for k, v in c.mma_shapes.items()) or "no MMA"
    wait = "-" if c.wait_depth is None else f"0x{c.wait_depth:x}"
    loads = " ".join(f"{k}:{len(v)}x{'/'.join(sorted({str(w) for w in v}))}B" for k, v in sorted(c.loads.items()))
    return (f"{c.id}: {c.per_iter} instr/warp/iter [{cls}] {mma} wait={wait} regs={c.regs} "
            f"smem={c.shared}B loads/thread/iter: {loads or '-'}")


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--_worker":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("TRITON_INTERPRET=1: the kernels would be interpreted functions")
    _compile_worker(sys.argv[3:], sys.argv[2])
    sys.exit(0)


def _main_counts(ids, cache, python):
    by = count_cases(ids, cache=cache, python=python, progress=lambda d: print(f"  compiled {d['id']}",
                                                                              file=sys.stderr, flush=True))
    for cid in ids:
        print(format_count(by[cid]))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--count":
    _main_counts(sys.argv[2:], os.environ.get("STATIC_MODEL_CACHE"), None)
