"""`sala-sglang` command line: one subcommand per task, each added by its own `_add_*` function."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from sala_sglang.server_args import RECOMMENDED_SERVE_FLAGS
from sala_sglang.tiny import GEOMETRIES


def _run_make_tiny(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from sala_sglang.config import MiniCPMSALAConfig
    from sala_sglang.tiny import make_tiny

    out = make_tiny(args.dir, seed=args.seed, geometry=args.geometry)
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
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny",
                   help="sparse-attention geometry: scaled down (tiny, the default) or the "
                   "released model's heads, head_dim and blocks (released)")
    p.set_defaults(func=_run_make_tiny)


def default_tiny_dir() -> Path:
    """Where `serve` keeps the tiny checkpoint it serves when no model is given."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sala-sglang" / "tiny-seed0"


def _tiny_checkpoint(path: Path) -> Path:
    """path, with the tiny checkpoint written into it first if it holds no config.json."""
    if not (path / "config.json").is_file():
        from sala_sglang.tiny import make_tiny

        make_tiny(path)
    return path


def serve_command(model: str, dense_as_sparse: bool, sglang_args: Sequence[str]) -> list[str]:
    """The `sglang.launch_server` command line; later flags (the user's) override earlier ones."""
    flags = [*RECOMMENDED_SERVE_FLAGS, *(["--dense-as-sparse"] if dense_as_sparse else [])]
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", model, *flags,
            *sglang_args]


def _run_serve(args: argparse.Namespace) -> int:
    model = args.model if args.model is not None else str(_tiny_checkpoint(default_tiny_dir()))
    cmd = serve_command(model, not args.no_dense_as_sparse, args.sglang_args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("sala-sglang serve: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "SGLang needs one to serve", file=sys.stderr)
        return 2
    print(f"sala-sglang serve: {shlex.join(cmd)}", flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve MiniCPM-SALA with SGLang (the tiny checkpoint when no model is given)",
        description="Launch `python -m sglang.launch_server` with the minicpm_flashinfer "
        "backend and OpenBMB's recommended flags (" + " ".join(RECOMMENDED_SERVE_FLAGS)
        + " --dense-as-sparse). Any other SGLang flag passes through and overrides these.",
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: a tiny random "
                   f"checkpoint written once to {default_tiny_dir()})")
    p.add_argument("--no-dense-as-sparse", action="store_true",
                   help="keep the dense_len switch (dense attention for short prompts)")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.set_defaults(func=_run_serve, takes_sglang_args=True)


def _run_check(args: argparse.Namespace) -> int:
    import torch

    from sala_sglang.check import check_reference, check_served

    model = _tiny_checkpoint(Path(args.model) if args.model else default_tiny_dir())
    problems = check_reference(model)
    if torch.cuda.is_available() and not args.cpu_only:
        problems += check_served(model)
    else:
        print("no CUDA GPU visible (or --cpu-only): skipped the served comparison")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    print("check: " + ("all good" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def _add_check(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="run the reference model on the tiny checkpoint; compare with SGLang on a GPU",
        description="Runs the plain-PyTorch reference on the tiny checkpoint on the CPU (chunked "
        "prefill equals one shot, incremental decode equals a full forward) and, where a CUDA "
        "GPU is visible, serves the checkpoint with SGLang and compares teacher-forced.",
    )
    p.add_argument("--model", default=None, help="a tiny-layout checkpoint (default: the cached "
                   "tiny checkpoint)")
    p.add_argument("--cpu-only", action="store_true", help="skip the served comparison")
    p.set_defaults(func=_run_check)


def _run_bench(args: argparse.Namespace) -> int:
    from sala_sglang.bench import bench

    return bench(args)


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from sala_sglang.bench import add_arguments

    p = subparsers.add_parser(
        "bench",
        help="long-context benchmark: TTFT, decode speed and memory, 32K to 1M tokens",
        description="Serves the released MiniCPM-SALA config (or the dense Qwen3-8B-shaped "
        "baseline) with random weights and measures TTFT, decode tokens/s and GPU memory at "
        "batch 1 for each length, then sglang.bench_serving at fixed and unlimited concurrency. "
        "--workload soar runs a SOAR-style request set instead; --workload multiturn the prefix "
        "cache, on and off: TTFT per turn of long-document conversations, and bench_serving's "
        "generated-shared-prefix set. Writes JSON after every point.",
    )
    add_arguments(p)
    p.set_defaults(func=_run_bench)


def build_parser() -> argparse.ArgumentParser:
    """The `sala-sglang` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sala-sglang", description="MiniCPM-SALA on SGLang: command-line tools."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_make_tiny(subparsers)
    _add_serve(subparsers)
    _add_check(subparsers)
    _add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_sglang_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.sglang_args = extra
    return args.func(args)
