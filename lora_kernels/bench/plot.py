"""The benchmark plot, drawn from CSV rows only (never from typed-in numbers), as one PNG:

  per layer bench (layer_fwd, layer_fwd_bwd), one column per shape:
    throughput vs r   tokens/s (= M / time) of each provider at the largest M measured for that shape;
                      cublas_bf16 (r=0 only) is the dashed ceiling
    speedup vs M      baseline time / lora_kernels time at r=16 (or the nearest rank measured), one line per
                      baseline; above the grey line at 1, lora_kernels is faster
  train_step: tokens/s vs r and peak memory vs r, one line per provider.
"""
from __future__ import annotations

import os

from ..errors import CLIError
from .report import BASELINES, OURS, header, select_gpu
from .results import base_provider

_STYLE = {
    "lora_kernels": dict(color="tab:red", marker="o"),
    "lora_kernels_fused": dict(color="tab:orange", marker="^"),
    "lora_kernels_dequant": dict(color="tab:brown", marker="v"),
    "peft_bnb": dict(color="tab:blue", marker="s"),
    "dequant_cublas": dict(color="tab:green", marker="D"),
    "cublas_bf16": dict(color="black", linestyle="--"),
    "peft_bf16": dict(color="tab:purple", marker="x"),
    "lora_kernels_bf16": dict(color="tab:pink", marker="P"),
}


def _ref_rank(ranks, want=16):
    positive = sorted(r for r in ranks if r > 0)
    if not positive:
        return 0
    return min(positive, key=lambda r: (abs(r - want), r))


def plot_rows(rows, path: str) -> str:
    """Draws the PNG at `path` from benchmark rows; returns the path."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend and figures alone
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise CLIError("--plot needs matplotlib (pip install 'lora-kernels[plot]')") from None
    rows, _ = select_gpu(rows)  # drops predicted rows: a plot shows measurements only
    if not rows:
        raise ValueError("no measured rows to plot (predicted rows of the static model are never plotted)")
    layer_benches = [b for b in ("layer_fwd", "layer_fwd_bwd") if any(r["bench"] == b for r in rows)]
    train = [r for r in rows if r["bench"] == "train_step"]
    shapes = sorted({(r["n"], r["k"]) for r in rows if r["bench"] in layer_benches},
                    key=lambda s: (s[0] * s[1], s))
    ncols = max(len(shapes), 2 if train else 1)
    nrows = 2 * len(layer_benches) + (1 if train else 0)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.8))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    labels = {}
    for r in rows:
        labels.setdefault(base_provider(r["provider"]), r["provider"])
    for bi, bench in enumerate(layer_benches):
        mine = [r for r in rows if r["bench"] == bench]
        by = {(base_provider(r["provider"]), r["m"], r["n"], r["k"], r["r"]): r["ms_p50"] for r in mine}
        for si, (n, k) in enumerate(shapes):
            pts = [r for r in mine if (r["n"], r["k"]) == (n, k)]
            ax = axes[2 * bi][si]
            if not pts:
                ax.set_visible(False)
                axes[2 * bi + 1][si].set_visible(False)
                continue
            m_max = max(r["m"] for r in pts)
            ranks = sorted({r["r"] for r in pts if base_provider(r["provider"]) != "cublas_bf16"})
            pos = {r: i for i, r in enumerate(ranks)}
            for p in dict.fromkeys(base_provider(r["provider"]) for r in pts):
                xs = [(rk, by[(p, m_max, n, k, rk)]) for rk in ranks if (p, m_max, n, k, rk) in by]
                if p == "cublas_bf16":
                    ms = by.get((p, m_max, n, k, 0))
                    if ms is not None:
                        ax.axhline(m_max / ms * 1e3, label=f"{labels[p]} (r=0)", **_STYLE[p])
                    continue
                if xs:
                    ax.plot([pos[rk] for rk, _ in xs], [m_max / ms * 1e3 for _, ms in xs], label=labels[p],
                            **_STYLE.get(p, {}))
            ax.set_xticks(range(len(ranks)))
            ax.set_xticklabels([str(r) for r in ranks])
            ax.set_xlabel("r")
            ax.set_ylabel("tokens/s")
            ax.yaxis.set_major_formatter(EngFormatter())
            ax.set_ylim(bottom=0)
            ax.set_title(f"{bench} {n}x{k}, M={m_max}: throughput vs r", fontsize=9)
            ax.legend(fontsize=7)
            # speedup vs M
            ax = axes[2 * bi + 1][si]
            rr = _ref_rank({r["r"] for r in pts})
            ms_values = sorted({r["m"] for r in pts})
            for b in BASELINES:
                xy = []
                for m in ms_values:
                    ours = by.get((OURS, m, n, k, rr))
                    theirs = by.get((b, m, n, k, 0 if b == "cublas_bf16" else rr))
                    if ours and theirs:
                        xy.append((ms_values.index(m), theirs / ours))
                if xy:
                    style = dict(_STYLE[b])
                    style.setdefault("marker", "o")
                    ax.plot([m for m, _ in xy], [v for _, v in xy], label=f"vs {labels.get(b, b)}", **style)
            ax.axhline(1.0, color="grey", linewidth=1)
            ax.set_xticks(range(len(ms_values)))
            ax.set_xticklabels([str(m) for m in ms_values])
            ax.set_xlabel("M (rows of x)")
            ax.set_ylabel(f"speedup of {labels.get(OURS, OURS)}")
            ax.set_title(f"{bench} {n}x{k}, r={rr}: speedup vs M", fontsize=9)
            ax.legend(fontsize=7)
        for si in range(len(shapes), ncols):
            axes[2 * bi][si].set_visible(False)
            axes[2 * bi + 1][si].set_visible(False)
    if train:
        ax_t, ax_m = axes[-1][0], axes[-1][1]
        ranks = sorted({r["r"] for r in train})
        pos = {r: i for i, r in enumerate(ranks)}
        for p in dict.fromkeys(base_provider(r["provider"]) for r in train):
            pts = sorted((r for r in train if base_provider(r["provider"]) == p), key=lambda r: r["r"])
            ax_t.plot([pos[r["r"]] for r in pts], [r["m"] / r["ms_p50"] * 1e3 for r in pts], label=pts[0]["provider"],
                      **_STYLE.get(p, {}))
            mem = [r for r in pts if r["peak_mem_mb"] is not None]
            if mem:
                ax_m.plot([pos[r["r"]] for r in mem], [r["peak_mem_mb"] / 1024 for r in mem], label=pts[0]["provider"],
                          **_STYLE.get(p, {}))
        first = train[0]
        ax_t.yaxis.set_major_formatter(EngFormatter())
        for ax, what in ((ax_t, "tokens/s"), (ax_m, "peak memory, GiB")):
            ax.set_xticks(range(len(ranks)))
            ax.set_xticklabels([str(r) for r in ranks])
            ax.set_xlabel("r")
            ax.set_ylabel(what)
            ax.set_ylim(bottom=0)
            ax.set_title(f"train_step {what}\n(hidden {first['n']}, {first['k']} layers, {first['m']} tokens/step)",
                         fontsize=9)
            if ax.lines:
                ax.legend(fontsize=7)
        if not ax_m.lines:
            ax_m.text(0.5, 0.5, "peak memory not measured on CPU", ha="center", va="center", transform=ax_m.transAxes)
        for si in range(2, ncols):
            axes[-1][si].set_visible(False)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    title = "lora-kernels bench\n" + header(rows).replace("; ", "\n", 1)
    if all(r["gpu"] == "cpu" for r in rows):
        title += "\nCPU run: reference PyTorch code, not kernel figures"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.25 * title.count("\n") + 0.4) / (3.4 * nrows + 0.8)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_csv(csv_path: str, path: str | None = None) -> str:
    """Reads a benchmark CSV and draws its plot (default: the CSV's path with .png)."""
    from .results import read_csv

    rows = read_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows to plot")
    return plot_rows(rows, path or os.path.splitext(csv_path)[0] + ".png")
