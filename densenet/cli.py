"""The ``densenet`` command: ``densenet models``, ``densenet info NAME``, ..."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import torch

from .registry import create_model, list_models, model_spec
from .summary import count_macs, count_parameters, stage_summary


def _table(header: Sequence[str], rows: list[Sequence[object]]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    rows = []
    for name in list_models():
        spec = model_spec(name)
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = create_model(name)
        params = count_parameters(model)
        macs = count_macs(model, spec.input_size)
        rows.append([name, spec.depth, spec.growth_rate, spec.family, f"{params:,}",
                     f"{spec.paper_params:,}", f"{spec.input_size}x{spec.input_size}", f"{macs / 1e9:.3f}"])
    print(_table(["name", "depth", "k", "layout", "parameters", "paper", "input", "GMACs"], rows))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    spec = model_spec(args.name)
    with torch.device("meta"):
        model = create_model(args.name, num_classes=args.num_classes or spec.kwargs["num_classes"])
    size = args.input_size or spec.input_size
    model.check_input_size(size)
    print(f"{args.name}: {model.extra_repr()}")
    print(f"parameters: {count_parameters(model):,}; multiply-adds at {size}x{size}: "
          f"{count_macs(model, size) / 1e9:.3f} G\n")
    rows = [[s.name, s.in_channels, s.out_channels, f"{s.size}x{s.size}", f"{s.params:,}"]
            for s in stage_summary(model, size)]
    print(_table(["stage", "in", "out", "output size", "parameters"], rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densenet", description="DenseNet models, training and analysis.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered models with parameters and multiply-adds")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="per-block structure of one model")
    p.add_argument("name", help="a registered name (see `densenet models`) or densenet_bc{L}_k{k} / densenet{L}_k{k}")
    p.add_argument("--input-size", type=int, default=None, help="image side in pixels (default: the model's native size)")
    p.add_argument("--num-classes", type=int, default=None)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("DENSENET_DEBUG"):
            raise
        print(f"densenet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
