"""Readable tables from benchmark rows: speedups of lora_kernels against each baseline, the LoRA overhead
against its own r=0, train_step throughput and memory, and the issue's targets checked (GPU rows only).

Speedup = baseline ms / lora_kernels ms at the same shape, M and r (> 1: lora_kernels is faster);
cublas_bf16 is always its r=0 row (the dense GEMM without LoRA, the ceiling), so "vs cublas_bf16" at r > 0
includes the LoRA term. Overhead = lora_kernels(r) / lora_kernels(r=0) - 1.
"""
from __future__ import annotations

from .results import base_provider, is_predicted, latest, measured

BASELINES = ("peft_bnb", "dequant_cublas", "cublas_bf16")
TRAIN_BASELINES = ("peft_bnb", "peft_bf16")
OURS = "lora_kernels"


class Table:
    def __init__(self, title, headers, align=None):
        self.title, self.headers, self.rows = title, list(headers), []
        self.align = align or ["<"] + [">"] * (len(headers) - 1)

    def add(self, *cells):
        self.rows.append(["" if c is None else str(c) for c in cells])

    def text(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.headers)]

        def fmt(cells):
            return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, self.align, widths)).rstrip()

        lines = [self.title, fmt(self.headers), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in self.rows]
        return "\n".join(lines)

    def markdown(self) -> str:
        sep = ["---" if a == "<" else "---:" for a in self.align]
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |", "| " + " | ".join(sep) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def _ms(x):
    return "-" if x is None else (f"{x:.4f}" if x < 0.1 else f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _ratio(num, den):
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _index(rows):
    """{(bench, base provider, m, n, k, r): row}, plus the full label each base provider ran as."""
    idx, labels = {}, {}
    for row in rows:
        base = base_provider(row["provider"])
        idx[(row["bench"], base, row["m"], row["n"], row["k"], row["r"])] = row
        labels.setdefault(base, row["provider"])
    return idx, labels


def _ms_of(idx, *key):
    row = idx.get(key)
    return None if row is None else row["ms_p50"]


def select_gpu(rows):
    """Rows of one device (the one of the last row) so that ratios never mix machines; and the note saying so.
    Predicted rows (the static model's) are dropped: tables, targets and plots show measurements only."""
    rows = latest(measured(rows))
    if not rows:
        return rows, None
    gpus = list(dict.fromkeys(r["gpu"] for r in rows))
    if len(gpus) == 1:
        return rows, None
    gpu = rows[-1]["gpu"]
    return [r for r in rows if r["gpu"] == gpu], f"the CSV holds {len(gpus)} devices; showing {gpu} only"


def layer_tables(rows) -> list:
    rows, _ = select_gpu(rows)
    idx, labels = _index(rows)
    tables = []
    for bench in ("layer_fwd", "layer_fwd_bwd"):
        mine = [r for r in rows if r["bench"] == bench]
        if not mine:
            continue
        present = [b for b in BASELINES if any(base_provider(r["provider"]) == b for r in mine)]
        ours_label = labels.get(OURS, OURS)
        what = "forward" if bench == "layer_fwd" else "forward + backward (dx, dA, dB)"
        t = Table(f"{bench}: {what}; ms per call (median) and speedup = baseline ms / {ours_label} ms "
                  "(>1: lora_kernels faster)",
                  ["shape NxK", "M", "r", f"{ours_label} ms"] + [f"vs {b}" + (" (r=0)" if b == "cublas_bf16" else "")
                                                                   for b in present] + ["LoRA overhead"])
        paths = [p for p in ("lora_kernels_fused", "lora_kernels_dequant")
                 if any(base_provider(r["provider"]) == p for r in mine)]
        t.headers[4:4] = [f"{p.split('_')[-1]} path ms" for p in paths]
        t.align[4:4] = [">"] * len(paths)
        keys = sorted({(r["n"], r["k"], r["m"], r["r"]) for r in mine})
        for n, k, m, r in keys:
            ours = _ms_of(idx, bench, OURS, m, n, k, r)
            cells = []
            for b in present:
                theirs = _ms_of(idx, bench, b, m, n, k, 0 if b == "cublas_bf16" else r)
                cells.append(_x(_ratio(theirs, ours)))
            if ours is None and all(c == "-" for c in cells):
                continue
            base0 = _ms_of(idx, bench, OURS, m, n, k, 0)
            over = "-" if (r == 0 or ours is None or base0 is None) else f"{(ours / base0 - 1) * 100:+.1f}%"
            forced = [_ms(_ms_of(idx, bench, p, m, n, k, r)) for p in paths]
            t.add(f"{n}x{k}", m, r, _ms(ours), *forced, *cells, over)
        tables.append(t)
    return tables


def train_table(rows):
    rows, _ = select_gpu(rows)
    mine = [r for r in rows if r["bench"] == "train_step"]
    if not mine:
        return None
    idx, _ = _index(mine)
    first = mine[0]
    present = [b for b in TRAIN_BASELINES if any(base_provider(r["provider"]) == b for r in mine)]
    t = Table(f"train_step: Llama, hidden {first['n']}, {first['k']} layer(s), {first['m']} tokens per step, "
              "AdamW step included; speedup = tokens/s over the baseline's",
              ["r", "provider", "tokens/s", "ms/step", "peak MiB"] + [f"vs {b}" for b in present] +
              ["mem vs peft_bnb"], [">", "<", ">", ">", ">"] + [">"] * (len(present) + 1))
    order = {p: i for i, p in enumerate(("peft_bnb", "lora_kernels", "peft_bf16", "lora_kernels_bf16"))}
    for row in sorted(mine, key=lambda r: (r["n"], r["k"], r["m"], r["r"], order.get(base_provider(r["provider"]), 9))):
        ms = row["ms_p50"]
        cells = [_x(_ratio(_ms_of(idx, "train_step", b, row["m"], row["n"], row["k"], row["r"]), ms)) for b in present]
        stock = idx.get(("train_step", "peft_bnb", row["m"], row["n"], row["k"], row["r"]))
        mem = _ratio(row["peak_mem_mb"], stock["peak_mem_mb"] if stock else None)
        t.add(row["r"], row["provider"], f"{row['m'] / ms * 1e3:,.0f}", _ms(ms),
              "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:,.0f}", *cells, _x(mem))
    return t


def check_targets(rows) -> list:
    """[(target, measured, status)] for the issue's H100 targets; status is 'met', 'MISSED' or 'not measured'."""
    rows, _ = select_gpu(rows)
    idx, _ = _index(rows)
    out = []

    def ms(bench, p, m, n, k, r):
        return _ms_of(idx, bench, p, m, n, k, r)

    for bench in ("layer_fwd", "layer_fwd_bwd"):
        ours, dense, peft = (ms(bench, OURS, 8192, 4096, 4096, 16), ms(bench, "cublas_bf16", 8192, 4096, 4096, 0),
                             ms(bench, "peft_bnb", 8192, 4096, 4096, 16))
        v = _ratio(ours, dense)
        out.append((f"{bench} M=8192 4096x4096 r=16: <= 1.10x cublas_bf16 time", _x(v),
                    "not measured" if v is None else "met" if v <= 1.10 else "MISSED"))
        v = _ratio(peft, ours)
        out.append((f"{bench} M=8192 4096x4096 r=16: >= 1.28x faster than peft_bnb", _x(v),
                    "not measured" if v is None else "met" if v >= 1.28 else "MISSED"))
    overheads = sorted((r for r in rows if r["bench"] in ("layer_fwd", "layer_fwd_bwd") and r["m"] == 8192
                        and r["r"] > 0 and base_provider(r["provider"]) == OURS),
                       key=lambda r: (r["bench"], r["n"], r["k"], r["r"]))
    for row in overheads:
        base0 = ms(row["bench"], OURS, 8192, row["n"], row["k"], 0)
        if base0 is None:
            continue
        over = row["ms_p50"] / base0 - 1
        limit = max(0.02, 1.5 * row["r"] / 2048)
        out.append((f"{row['bench']} LoRA overhead M=8192 {row['n']}x{row['k']} r={row['r']}: <= {limit * 100:.1f}%",
                    f"{over * 100:+.1f}%", "met" if over <= limit else "MISSED"))
    for m, goal in ((1, 2.5), (16, 2.3)):
        v = _ratio(ms("layer_fwd", "cublas_bf16", m, 8192, 8192, 0), ms("layer_fwd", OURS, m, 8192, 8192, 16))
        out.append((f"decode layer_fwd M={m} 8192x8192 r=16: >= {goal}x faster than cublas_bf16", _x(v),
                    "not measured" if v is None else "met" if v >= goal else "MISSED"))
    train = [r for r in rows if r["bench"] == "train_step" and base_provider(r["provider"]) == OURS]
    for row in sorted(train, key=lambda r: r["r"]):
        stock = idx.get(("train_step", "peft_bnb", row["m"], row["n"], row["k"], row["r"]))
        if stock is None:
            continue
        v = _ratio(stock["ms_p50"], row["ms_p50"])
        out.append((f"train_step r={row['r']}: >= 1.3x tokens/s of peft_bnb", _x(v), "met" if v >= 1.3 else "MISSED"))
        if row["peak_mem_mb"] is not None and stock["peak_mem_mb"] is not None:
            out.append((f"train_step r={row['r']}: peak memory <= peft_bnb's",
                        f"{row['peak_mem_mb']:,.0f} vs {stock['peak_mem_mb']:,.0f} MiB",
                        "met" if row["peak_mem_mb"] <= stock["peak_mem_mb"] else "MISSED"))
    return out


def targets_table(rows):
    checks = check_targets(rows)
    if not any(status != "not measured" for _, _, status in checks):
        return None
    t = Table("targets (from the issue; H100, bf16, ratios within one run)", ["target", "measured", "status"],
              ["<", ">", "<"])
    for c in checks:
        t.add(*c)
    return t


def header(rows) -> str:
    if not rows:
        return "no rows"
    predicted = sum(map(is_predicted, rows))
    rows, note = select_gpu(rows)
    if not rows:
        return f"no measured rows ({predicted} predicted rows of the static model skipped: not measurements)"
    last = rows[-1]
    dates = sorted({r["date"] for r in rows})
    when = dates[-1] if len(dates) == 1 else f"{dates[0]} .. {dates[-1]} ({len(dates)} runs)"
    text = (f"{last['gpu']}; torch {last['torch']}, triton {last['triton']}, lora-kernels {last['commit']}; "
            f"{when}; dtype {last['dtype']}")
    return text + (f"\n({note})" if note else "")


def speedup_table(rows, *, markdown=False, targets=True) -> str:
    """Everything above for `rows` (one run's rows, or a CSV's; the newest row of each point is used)."""
    parts = [header(rows)]
    cpu = bool(rows) and all(r["gpu"] == "cpu" for r in select_gpu(rows)[0])
    tables = layer_tables(rows)
    t = train_table(rows)
    if t is not None:
        tables.append(t)
    if targets and not cpu:
        t = targets_table(rows)
        if t is not None:
            tables.append(t)
    for t in tables:
        parts.append(t.markdown() if markdown else t.text())
    if not tables:
        parts.append("no measurements")
    return "\n\n".join(parts)
