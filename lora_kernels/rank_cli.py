"""`lora-kernels params MODEL`: LoRA parameter counts per rank and target-module set, from a config alone.

    lora-kernels params path/to/model --ranks 4 8 16 32 64 --targets q_proj,k_proj,v_proj,o_proj
    lora-kernels params config.json --targets attention --targets all-linear
    lora-kernels params path/to/model --list-modules
    lora-kernels params path/to/model --task domain --dataset-size 20000
"""
from __future__ import annotations

import csv
import json
import sys

DEFAULT_RANKS = (4, 8, 16, 32, 64)
DEFAULT_TARGETS = ("qv", "attention", "all-linear")


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a local model directory, its config.json, or 'builtin' (the small demo Llama); "
                             "only the config is read: the model is built on the meta device")
    parser.add_argument("--ranks", "-r", type=int, nargs="+", default=list(DEFAULT_RANKS), metavar="R",
                        help="LoRA ranks to count (default: %(default)s)")
    parser.add_argument("--targets", "-t", action="append", metavar="SPEC",
                        help="a preset (qv, attention, mlp, all-linear) or comma-separated module names such "
                             "as q_proj,v_proj; repeat for several tables (default: qv, attention, all-linear)")
    parser.add_argument("--list-modules", action="store_true",
                        help="list the layers LoRA can target, grouped by name, with their shapes")
    parser.add_argument("--task", metavar="TASK",
                        help="also recommend a starting r, alpha and targets for a task: style, domain, "
                             "classification, reasoning or unknown")
    parser.add_argument("--dataset-size", type=int, metavar="N", help="training examples, for --task")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="output format of the counts (default: table)")


def _check_ranks(ranks) -> list[int]:
    bad = [r for r in ranks if r < 1]
    if bad:
        raise ValueError(f"rank r must be at least 1, got {bad[0]}")
    return sorted(set(ranks))


def _per_matrix_text(mc) -> str:
    return "/".join(f"{v:,d}" for v in mc.per_matrix)


def _table(model_name, spec, counts) -> str:
    first = counts[0]
    groups = list(first.per_module)
    headers = ["r", "trainable", "% of total"] + groups
    rows = [[str(c.r), f"{c.trainable:,d}", f"{c.percent:.4f}%"] +
            [_per_matrix_text(c.per_module[g]) for g in groups] for c in counts]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    matrices = ", ".join(f"{g} x{first.per_module[g].matrices}" for g in groups)
    lines = [f"targets {spec}: {matrices} ({first.matrices} matrices); "
             f"per-module columns: parameters per matrix, r * (in + out)"]
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def run(args) -> int:
    from . import rank

    ranks = _check_ranks(args.ranks)
    specs = args.targets or list(DEFAULT_TARGETS)
    if args.dataset_size is not None and args.task is None:
        raise ValueError("--dataset-size needs --task")
    model = rank.as_model(args.model)  # one meta build, shared by every count below
    base = rank.base_parameter_count(model)
    header = f"{type(model).__name__} from {args.model}: {base:,d} parameters"

    if args.list_modules:
        print(header)
        print(rank.format_target_modules(rank.find_target_modules(model)))
        return 0

    tables = []
    for spec in specs:
        targets = rank.parse_targets(spec)
        counts = [rank.count_lora_parameters(model, r=r, target_modules=targets) for r in ranks]
        tables.append((spec, counts))

    if args.format == "json":
        out = {"model": args.model, "model_class": type(model).__name__, "base_params": base, "tables": [
            {"targets": spec, "modules": list(counts[0].per_module), "rows": [
                {"r": c.r, "trainable": c.trainable, "total": c.total, "percent": c.percent,
                 "per_module": {g: {"matrices": m.matrices, "params_per_matrix": m.params_per_matrix,
                                    "params": m.params, "shapes": [list(s) for s in m.shapes]}
                                for g, m in c.per_module.items()}}
                for c in counts]} for spec, counts in tables]}
        print(json.dumps(out, indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["targets", "r", "trainable", "total", "percent", "module", "matrices",
                         "params_per_matrix", "module_params"])
        for spec, counts in tables:
            for c in counts:
                for g, m in c.per_module.items():
                    writer.writerow([spec, c.r, c.trainable, c.total, f"{c.percent:.6f}", g, m.matrices,
                                     m.params_per_matrix, m.params])
    else:
        print(header)
        for spec, counts in tables:
            print()
            print(_table(args.model, spec, counts))

    if args.task is not None:
        rec = rank.recommend(args.task, args.dataset_size, model=model)
        print()
        print(f"recommendation for {rec.task}: {rec}")
    return 0
