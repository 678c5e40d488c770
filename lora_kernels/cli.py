"""`lora-kernels bench | params | sweep`.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args) -> int`.
User errors (CLIError, and ValueError/FileNotFoundError from argument checks) print one line and exit 2.
"""
import argparse
import sys
from importlib import import_module

from .errors import CLIError

_SUBCOMMANDS = {
    "bench": ("lora_kernels.bench.cli", "throughput of the fused QLoRA layer across LoRA ranks (the main job)"),
    "params": ("lora_kernels.rank_cli", "LoRA parameter counts per rank and target-module set"),
    "sweep": ("lora_kernels.sweep", "train one adapter per rank and compare eval loss against r"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{bench,params,sweep}")
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"lora-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lora-kernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
