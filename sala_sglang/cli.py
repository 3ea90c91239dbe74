"""`sala-sglang` command line: one subcommand per task, each added by its own `_add_*` function."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence


def _run_make_tiny(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from sala_sglang.config import MiniCPMSALAConfig
    from sala_sglang.tiny import make_tiny

    out = make_tiny(args.dir, seed=args.seed)
    config = MiniCPMSALAConfig.from_pretrained(out)
    weights = out / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    print(f"wrote tiny MiniCPM-SALA checkpoint to {out.resolve()}")
    print(
        f"seed {args.seed}: {config.num_hidden_layers} layers (sparse {config.sparse_layer_ids}, "
        f"linear {config.linear_layer_ids}), hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}, {params / 1e6:.2f} M parameters, "
        f"{weights.stat().st_size / 2**20:.1f} MiB"
    )
    return 0


def _add_make_tiny(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-tiny",
        help="write a tiny random MiniCPM-SALA checkpoint (tests, smoke runs)",
        description="Write a tiny random checkpoint with the released model's layout: config, "
        "bf16 weights, tokenizer. The same seed gives byte-identical files.",
    )
    p.add_argument("dir", help="output directory (created if missing; its files are overwritten)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.set_defaults(func=_run_make_tiny)


def build_parser() -> argparse.ArgumentParser:
    """The `sala-sglang` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sala-sglang", description="MiniCPM-SALA on SGLang: command-line tools."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_make_tiny(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)
