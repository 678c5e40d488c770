"""Checks the built library from cuobjdump's output, without a GPU.

    python csrc/sass_count.py SASS_FILE [--budget 3.0] [--budget-prescaled X] [--budget-prmt X]
                              [--resources RES_FILE]

SASS_FILE: `cuobjdump --dump-sass`; counts the main loop of each fast decode kernel.
RES_FILE: `cuobjdump --dump-resource-usage`; prints registers per kernel, fails on stack or local memory
(spills).

The main loop is the backward branch whose body holds the most HMMAs per instruction. Each lane feeds one
m16n8k16 MMA per 8 weight elements per n8 token tile, so elements per lane = 8 * HMMA / NT
(whatever the row tiles per warp).
Reports instructions per weight element (per lane) by kernel and arch; exits 1 over budget.
Also checks that the loop loads each step's W (two 128-bit streaming loads per 16-row tile and step).
Shared-memory-table kernels (the default decode) with SCALE_AFTER = true (blocksize >= 128) are held
to --budget, the others (blocksize 64: one packed multiply per decoded pair) to --budget-prescaled;
register-table (PRMT) kernels to --budget-prmt and exact-decode kernels to --budget-exact, or only reported
without them. The cp.async kernels (decode_async_kernel) have budgets of their own, --budget-async-table
(shared table) and --budget-async-exact: their loop computes the scales' addresses, which the register ring
left to its dependent loads. Their W copies (LDGSTS) are checked like the ring's W loads, plus one
DEPBAR.LE SB0, 0x2 per step and no register load from global memory but x's.
"""
import argparse
import re
import sys
from collections import Counter


def control(hi):
    """The scheduling control bits of a Volta+ instruction, from the high 64-bit word of its encoding:
    stall cycles, yield, the scoreboard it sets when it completes (wr) or has read its registers (rd), 7 for
    none, and the scoreboards it waits on (wait, a bit mask of 0..5)."""
    c = (hi >> 41) & 0x1FFFFF
    return dict(stall=c & 15, yld=(c >> 4) & 1, wr=(c >> 5) & 7, rd=(c >> 8) & 7, wait=(c >> 11) & 63)


def parse(text):
    """[(arch, function name, [(addr, instruction, control)])] in file order; control is None when the
    dump has no encodings."""
    out = []
    arch = None
    for block in re.split(r"\n(?=\s*(?:Fatbin elf code|Function :))", text):
        m = re.search(r"arch = (sm_\d+)", block)
        if m:
            arch = m.group(1)
        f = re.match(r"\s*Function : (\S+)", block)
        if not f:
            continue
        ins = [(int(a, 16), s.strip(), control(int(hi, 16)) if hi else None)
               for a, s, hi in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);(?:\s*/\* 0x[0-9a-f]{16} \*/"
                                          r"\s*/\* 0x([0-9a-f]{16}) \*/)?", block)]
        out.append((arch, f.group(1), ins))
    return out


def unpredicated(instruction):
    """The instruction without its guard predicate (@P0, @!UP1, ...)."""
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", instruction)


def opcode(instruction):
    return unpredicated(instruction).split()[0]


def w_load_reach(body):
    """How far the loop's streaming W loads (LDG.E.NA.128) run ahead, in HMMAs: for each, the HMMAs issued
    between it and the first wait covering its scoreboard, walking the loop body four times; the minimum. A
    scoreboard counts every variable-latency instruction set on it and a wait mask waits until it is zero (only
    DEPBAR.LE waits for a count), so a register ring that puts the loads of step j + 3 on the scoreboard it
    then waits on for step j's data stalls on the loads it just issued: it reaches 0 HMMAs, not 3 steps.
    None when the loop has no such load or no control bits."""
    if not body or body[0][1] is None:
        return None
    pending = {sb: [] for sb in range(6)}  # [(is W load, HMMAs issued before it)], oldest first
    hmma, reach = 0, []
    for _ in range(4):
        for text, ctl in body:
            op = opcode(text)
            m = re.match(r"DEPBAR\.LE\s+SB(\d),\s*0x([0-9a-f]+)", unpredicated(text))
            retire = {sb: 0 for sb in range(6) if ctl["wait"] >> sb & 1}
            if m:
                retire[int(m.group(1))] = int(m.group(2), 16)
            for sb, keep in retire.items():
                gone = pending[sb][:max(0, len(pending[sb]) - keep)]
                pending[sb] = pending[sb][len(gone):]
                reach += [hmma - at for is_w, at in gone if is_w]
            if op.startswith("HMMA"):
                hmma += 1
            if ctl["wr"] < 6:
                pending[ctl["wr"]].append((op.startswith("LDG.E.NA.128"), hmma))
    return min(reach) if reach else None


def main_loop(ins):
    """(body as [(instruction, control)], opcode counter) of the backward-branch loop with the most HMMAs per instruction, or None: the
    main loop. (Not simply the innermost: nvcc may place a cold exit path after the epilogue that branches
    back into the unrolled loop, which makes a smaller "loop" holding epilogue code and only one step.)"""
    index = {a: i for i, (a, _, _) in enumerate(ins)}
    best = None
    for i, (a, s, _) in enumerate(ins):
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", s)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= a or target not in index:
            continue
        body = [(x, c) for _, x, c in ins[index[target]:i + 1]]
        ops = [opcode(x) for x, _ in body]
        hmma = sum(o.startswith("HMMA") for o in ops)
        if hmma and (best is None or hmma / len(body) > best[2]):
            best = (body, Counter(o.split(".")[0] for o in ops), hmma / len(body))
    return best and best[:2]


def demangled_flags(name):
    m = re.search(r"decode_(fast|async)_kernelILb(\d)ELi(\d)ELi(\d)ELb(\d)ELb(\d)ELi(\d)E(?:Li(\d)E)?", name)
    if not m:
        return None
    bf16, nt, rt, nested, after, decode = (int(g) for g in m.groups()[1:7])
    return dict(dtype="bf16" if bf16 else "fp16", nt=nt, rt=rt, nested=bool(nested), scale_after=bool(after),
                smem=decode == 0, exact=decode == 2, loads_only=decode == 3, depth=int(m.group(8) or 0),
                pipeline="async" if m.group(1) == "async" else "ring")


def label(name):
    f = demangled_flags(name)
    if f is None:
        m = re.search(r"decode_generic_kernelILb(\d)E", name)
        return f"generic {'bf16' if m and m.group(1) == '1' else 'fp16'}" if m else name
    table = ("smem-table" if f["smem"] else "exact" if f["exact"] else "loads-only" if f["loads_only"]
             else "prmt-table")
    return (f"{'async' if f['pipeline'] == 'async' else 'fast'} {table} {f['dtype']} "
            f"M{'<=8' if f['nt'] == 1 else '<=16'} "
            f"{f['rt'] * 16}-row "
            f"{'nested' if f['nested'] else 'fp32-absmax'} {'scale-after' if f['scale_after'] else 'prescaled'}"
            + (f" depth {f['depth']}" if f["depth"] else ""))


def resource_usage(text):
    """[(arch, function name, REG, STACK, SHARED, LOCAL)] from cuobjdump --dump-resource-usage, in file order."""
    out, arch, name = [], None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            out.append((arch, name, *(int(v) for v in m.groups())))
            name = None
    return out


def check_resources(text):
    """Lines of 'arch kernel: REG n' and the problems (stack/local memory) found."""
    rows, bad = [], []
    for arch, name, reg, stack, shared, local in resource_usage(text):
        rows.append((arch, label(name), reg, shared))
        if stack or local:
            bad.append(f"{arch} {name}: STACK {stack} LOCAL {local} (spills or local arrays)")
    return sorted(set(rows)), bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resources", default=None)
    ap.add_argument("sass")
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--budget-prescaled", type=float, default=None)
    ap.add_argument("--budget-prmt", type=float, default=None)
    ap.add_argument("--budget-exact", type=float, default=None)
    ap.add_argument("--budget-async-table", type=float, default=None)
    ap.add_argument("--budget-async-exact", type=float, default=None)
    args = ap.parse_args()
    over = []
    if args.resources:
        res, bad = check_resources(open(args.resources).read())
        for arch, kernel, reg, shared in res:
            print(f"{arch} {kernel}: {reg} registers/thread, {shared} B static shared memory")
        over += bad
        if not res:
            over.append("no kernel found in the resource usage")
    rows = 0
    seen = set()
    for arch, name, ins in parse(open(args.sass).read()):
        if (arch, name) in seen:  # the fatbin may list each cubin twice
            continue
        seen.add((arch, name))
        flags = demangled_flags(name)
        if flags is None or flags["loads_only"]:  # the measurement variant has no MMA loop to count
            continue
        loop = main_loop(ins)
        if loop is None:
            over.append(f"{arch} {flags}: no main loop with HMMA found")
            continue
        body, ops = loop
        elems = 8 * ops["HMMA"] // flags["nt"]
        # Each 128-wide step of a row tile is 8 HMMAs per token tile and two 16-byte streaming loads of W
        # (rows g and g + 8): a loop that decodes what it never loaded shows here, not only on a GPU.
        # The async kernel copies W with cp.async (LDGSTS, bypassing L1) and waits with DEPBAR.LE SB0, 2 once
        # a step: three steps in flight. Its loop must load nothing else from HBM into registers (x, from L1/L2,
        # is the only register load).
        async_ = flags["pipeline"] == "async"
        w_pat = r"\bLDGSTS\.E\.BYPASS\.128 \[[^]]*\], (?:desc\[[^]]*\])?\[[^]]*\]$" if async_ else r"\bLDG\.E\.NA\.128\b"
        w_loads = sum(1 for x, _ in body if re.search(w_pat, x))
        if w_loads != ops["HMMA"] // (4 * flags["nt"]):
            over.append(f"{arch} {name}: {w_loads} W loads in the main loop for {ops['HMMA']} HMMA "
                        f"(expected {ops['HMMA'] // (4 * flags['nt'])})")
        if async_:
            steps = ops["HMMA"] // (8 * flags["nt"] * flags["rt"])
            waits = sum(1 for x, _ in body if re.search(r"\bDEPBAR\.LE SB0, 0x2\b", x))
            other = [x for x, _ in body if re.search(r"\bLDG\b", x) and not re.search(r"\bLDG\.E\.128\.CONSTANT\b", x)]
            if waits != steps or other:
                over.append(f"{arch} {name}: {waits} DEPBAR.LE SB0, 0x2 for {steps} steps; register loads "
                            f"other than x: {other[:3]}")
        per = len(body) / elems
        if async_ and flags["exact"]:
            budget = args.budget_async_exact
        elif async_:
            budget = args.budget_async_table if flags["smem"] else None
        elif flags["exact"]:
            budget = args.budget_exact
        elif not flags["smem"]:
            budget = args.budget_prmt
        elif flags["scale_after"] or args.budget_prescaled is None:
            budget = args.budget
        else:
            budget = args.budget_prescaled
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
        reach = w_load_reach(body)
        step = 8 * flags["nt"] * flags["rt"]  # HMMAs per 128-wide step
        ahead = ("; cp.async, 2 steps ahead" if async_ else "" if reach is None
                 else f"; W loads waited on after {reach} HMMA ({reach / step:.1f} steps)")
        print(f"{arch} {label(name)}: {len(body)} instructions / {elems} "
              f"elements per lane = {per:.2f} per element (budget {budget or 'report only'}){ahead} [{top}]")
        rows += 1
        if budget is not None and per > budget:
            over.append(f"{arch} {name}: {per:.2f} > {budget}")
    if rows == 0:
        over.append("no fast decode kernel found in the SASS")
    for o in over:
        print("OVER BUDGET:", o)
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
