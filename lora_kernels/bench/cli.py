"""`lora-kernels bench`: throughput of the fused QLoRA layer and of a training step across LoRA ranks.

    lora-kernels bench                          # GPU: the quick preset (~10 min on an H100); CPU: smoke, < 1 min
    lora-kernels bench --full --shapes 4096x4096 --csv results.csv --plot
    lora-kernels bench --mode layer_fwd --shapes llama3-8b 8192x8192 --m 1 16 8192 --ranks 0 16
    lora-kernels bench --from-csv benchmarks/results/nvidia-h100-80gb-hbm3-2026-01-01.csv --plot --markdown t.md

See docs/bench.md.
"""
from __future__ import annotations

import datetime as _dt
import os
import sys

from ..errors import CLIError
from .presets import LAYER_PROVIDERS, MODES, SHAPE_PRESETS, TRAIN_MODELS, TRAIN_PROVIDERS

_MODE_ALIASES = {"all": MODES, "layer": ("layer_fwd", "layer_fwd_bwd"), "fwd": ("layer_fwd",),
                 "fwd_bwd": ("layer_fwd_bwd",), "train": ("train_step",)}


def add_arguments(parser) -> None:
    g = parser.add_argument_group("what to run (defaults: --preset quick on a GPU, smoke on CPU)")
    pre = g.add_mutually_exclusive_group()
    pre.add_argument("--preset", choices=("quick", "full", "smoke"), default=None,
                     help="quick: target shapes, ~10 min on an H100; full: the whole DESIGN.md sweep; "
                          "smoke: tiny shapes for CPU/CI")
    pre.add_argument("--quick", dest="preset", action="store_const", const="quick", help="same as --preset quick")
    pre.add_argument("--full", dest="preset", action="store_const", const="full", help="same as --preset full")
    g.add_argument("--mode", nargs="+", metavar="MODE",
                   help=f"{', '.join(MODES)}, or all / layer (default: all)")
    g.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help=f"NxK (N = out_features, K = in_features) or presets: {', '.join(SHAPE_PRESETS)}")
    g.add_argument("--m", nargs="+", metavar="M", help="rows of x (tokens), e.g. 1 16 512 4096 8192")
    g.add_argument("--ranks", "-r", nargs="+", metavar="R", help="LoRA ranks for the layer benches; 0 = no LoRA")
    g.add_argument("--providers", nargs="+", metavar="P",
                   help=f"layer: {', '.join(LAYER_PROVIDERS)}; train_step: {', '.join(TRAIN_PROVIDERS)}")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=("bf16", "fp16"), default=None, help="compute dtype (default: bf16)")
    t = parser.add_argument_group("train_step")
    t.add_argument("--train-ranks", nargs="+", metavar="R", help="ranks for train_step (GPU default: 8 16 64)")
    t.add_argument("--layers", type=int, default=None, help="decoder layers (GPU default: 4; CPU: 2)")
    t.add_argument("--train-model", choices=tuple(TRAIN_MODELS), default=None,
                   help="layer shapes (GPU default: llama3-8b; CPU: tiny)")
    t.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (GPU default: 2048)")
    t.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 1)")
    t.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default: 0)")
    t.add_argument("--train-steps", type=int, default=None, help="timed steps (GPU default: 10)")
    t.add_argument("--train-warmup", type=int, default=None, help="untimed steps first (GPU default: 3)")
    o = parser.add_argument_group("output")
    o.add_argument("--csv", default=None, metavar="PATH",
                   help="append rows here (GPU default: benchmarks/results/<gpu>-<date>.csv; "
                        "CPU default: <tmp>/lora-kernels-bench/cpu-<date>.csv)")
    o.add_argument("--no-csv", action="store_true", help="write no CSV")
    o.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="draw throughput vs r and speedup vs M from the CSV (default PNG: the CSV's name .png)")
    o.add_argument("--from-csv", default=None, metavar="CSV",
                   help="measure nothing: print the tables (and --plot/--markdown) of an existing CSV")
    o.add_argument("--markdown", default=None, metavar="PATH", help="also write the tables as Markdown")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    o.add_argument("--list", action="store_true", help="list presets, shapes and providers, then exit")
    tm = parser.add_argument_group("timing")
    tm.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="start no new case after S seconds (quick preset: 480, smoke: 45, full: none; 0: no limit); the rest is reported as skipped")
    tm.add_argument("--rep-ms", type=float, default=None, help="CUDA: timed milliseconds per case (default 100)")
    tm.add_argument("--warmup-ms", type=float, default=None, help="CUDA: warm-up milliseconds per case (default 25)")
    tm.add_argument("--reps", type=int, default=None, help="CPU: timed calls per case (default 3)")


def _resolve_device(name):
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = name.strip().lower()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise CLIError(f"--device {name!r} is not a device name such as cuda, cuda:0 or cpu") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return str(dev)
    if name != "cpu":
        raise CLIError(f"--device {name!r} is not cuda, cuda:N or cpu")
    return "cpu"


def build_spec(args):
    from .presets import BenchSpec, parse_ints, parse_names, parse_shapes

    device = _resolve_device(args.device)
    on_cuda = device.startswith("cuda")
    preset = args.preset or ("quick" if on_cuda else "smoke")
    if preset != "smoke" and not on_cuda:
        raise CLIError(f"--preset {preset} is sized for a GPU (Llama-3-8B shapes); on CPU use the default smoke "
                       "preset, or give --shapes/--m/--ranks")
    spec = BenchSpec.from_preset(preset, device)
    changes = {}
    if args.mode:
        modes = []
        for item in parse_names(args.mode):
            for m in _MODE_ALIASES.get(item, (item,)):
                if m not in MODES:
                    raise CLIError(f"--mode {item!r} is not one of {', '.join(MODES)}, all, layer")
                if m not in modes:
                    modes.append(m)
        changes["modes"] = tuple(modes)
    if args.shapes:
        changes["shapes"] = parse_shapes(args.shapes)
    if args.m:
        changes["ms"] = parse_ints(args.m, "--m")
    if args.ranks:
        changes["ranks"] = parse_ints(args.ranks, "--ranks")
    if args.train_ranks:
        changes["train_ranks"] = parse_ints(args.train_ranks, "--train-ranks")
    if args.providers:
        changes["providers"] = parse_names(args.providers)
    for attr in ("dtype", "layers", "train_model", "seq_len", "batch_size", "lora_dropout", "train_steps",
                 "train_warmup", "rep_ms", "warmup_ms"):
        value = getattr(args, attr)
        if value is not None:
            changes[attr] = value
    if args.reps is not None:
        if args.reps < 1:
            raise CLIError(f"--reps must be at least 1, got {args.reps}")
        changes["cpu_reps"] = args.reps
    if args.time_limit is not None:
        if args.time_limit < 0:
            raise CLIError(f"--time-limit must be at least 0 (0: no limit), got {args.time_limit:g}")
        changes["time_limit_s"] = args.time_limit or None
    for name in ("rep_ms", "warmup_ms"):
        if changes.get(name, 1) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive")
    if changes.get("train_warmup", 0) < 0:
        raise CLIError("--train-warmup must be at least 0")
    return spec.replace(**changes).validate()


def _list() -> int:
    from .presets import __doc__ as presets_doc

    print(presets_doc.strip())
    print("\nshape presets (N x K = out_features x in_features):")
    for name, shapes in SHAPE_PRESETS.items():
        print(f"  {name:<11} " + ", ".join(f"{n}x{k}" for n, k in shapes))
    print("\nlayer providers (layer_fwd, layer_fwd_bwd):")
    for name, text in LAYER_PROVIDERS.items():
        print(f"  {name:<21} {text}")
    print("\ntrain_step providers:")
    for name, text in TRAIN_PROVIDERS.items():
        print(f"  {name:<21} {text}")
    return 0


def _default_csv(device) -> str:
    from .results import default_csv_path, gpu_name

    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return default_csv_path({"gpu": gpu_name(device), "date": today})


def _outputs(rows, csv_path, args) -> None:
    from .report import speedup_table

    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as fh:
            fh.write(speedup_table(rows, markdown=True) + "\n")
        print(f"wrote {args.markdown}")
    if args.plot is not None:
        from .plot import plot_rows

        png = args.plot or (os.path.splitext(csv_path)[0] + ".png" if csv_path else "lora-kernels-bench.png")
        print(f"wrote {plot_rows(rows, png)}")


def _check_output_paths(args) -> None:
    for opt, path in (("--plot", args.plot), ("--markdown", args.markdown)):
        if path and os.path.isdir(path):
            raise CLIError(f"{opt} {path} is a directory; give a file name")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise CLIError(f"--plot {args.plot}: the plot is a PNG; give a path ending in .png")


class _DropThirdPartyNoise:
    """A logging filter for messages other packages log at import that say nothing about the run: bitsandbytes
    0.50 warns on every CPU with AVX512-BF16 that an optional package ('kernels') is not installed."""

    PREFIXES = ("Failed to load CPU gemm_4bit_forward",)

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def quiet_third_party_logs() -> None:
    """Installs the filter on the loggers concerned (before they log: call it before importing bitsandbytes)."""
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropThirdPartyNoise) for f in logger.filters):
        logger.addFilter(_DropThirdPartyNoise())


def run(args) -> int:
    quiet_third_party_logs()
    if args.list:
        return _list()
    _check_output_paths(args)
    if args.from_csv:
        from .report import speedup_table
        from .results import read_csv

        if args.csv or args.no_csv:
            raise CLIError("--from-csv reads a CSV and measures nothing; --csv/--no-csv do not apply")
        rows = read_csv(args.from_csv)
        if not rows:
            raise CLIError(f"{args.from_csv} has no rows")
        print(speedup_table(rows))
        if args.plot == "":
            args.plot = os.path.splitext(args.from_csv)[0] + ".png"
        _outputs(rows, args.from_csv, args)
        return 0

    if args.csv and args.no_csv:
        raise CLIError("--csv and --no-csv contradict each other")
    spec = build_spec(args)
    csv_path = None if args.no_csv else (args.csv or _default_csv(spec.device))
    if csv_path is not None:
        from .results import check_writable

        check_writable(csv_path)

    from .report import speedup_table
    from .runner import CPU_NOTE, plan, run_bench

    tasks = plan(spec)
    per_mode = ", ".join(f"{m} {sum(t.mode == m for t in tasks)}" for m in spec.modes)
    print(f"lora-kernels bench: preset {spec.preset}, {len(tasks)} cases ({per_mode}) on {spec.device}"
          + (f", time limit {spec.time_limit_s:g} s" if spec.time_limit_s else ""), flush=True)
    if not spec.on_cuda:
        print(CPU_NOTE, flush=True)
    res = run_bench(spec, csv_path=csv_path, progress=not args.quiet)
    print()
    print(speedup_table(res.rows))
    print()
    from .runner import step_ratios
    from .train_step import loss_parity_lines

    for line in loss_parity_lines(res.train_losses, step_ratios(res.rows), interleaved=not spec.on_cuda):
        print(line)
    if res.train_losses and not spec.on_cuda:
        print("train_step on CPU: the patched variants run as a user's would, PEFT's forward by default "
              "(lora_kernels[patched]); LORA_KERNELS_PATCH_CPU=op measures the op's PyTorch path instead")
    if res.skipped:
        print(f"{len(res.skipped)} case(s) skipped; reasons printed above")
    if not spec.on_cuda:
        print(CPU_NOTE)
    print(f"{len(res.rows)} measurement(s) in {res.seconds:.0f} s" +
          (f"; appended to {csv_path}" if csv_path and res.rows else ""))
    if res.rows:
        plot_rows_from = res.rows
        if csv_path is not None:
            from .results import read_csv

            plot_rows_from = read_csv(csv_path)  # the whole CSV: earlier runs' points too (newest wins)
        _outputs(plot_rows_from, csv_path, args)
    if res.aborted:
        print(f"aborted: {res.aborted}", file=sys.stderr)
        return 1
    if not res.rows:
        print("lora-kernels bench: no case could run (see the reasons above)", file=sys.stderr)
        return 1
    return 0
