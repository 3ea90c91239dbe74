"""Plots and the README table from the long-context results (benchmarks/long_context.py).

Reads results/long_context_*.json, writes results/ttft_vs_length.png (log-log, both models),
results/decode_vs_context.png, and prints a markdown table: TTFT, decode tok/s and MFU per
length, and the dense/SALA TTFT ratio where both ran.

    python benchmarks/plot_long_context.py [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: `sala_sglang` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sala_sglang.server_args import RECOMMENDED_SERVE_FLAGS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load_runs(results: Path) -> dict[str, dict]:
    """Batch-1 runs by label ('sala (minicpm_flashinfer)', 'qwen3-8b (flashinfer)', ...).
    Files with the same label merge, oldest first by their "date", so a length measured again
    (a sweep re-run in parts) takes the newest point; a point marked with a "note" (not
    comparable, e.g. it includes kernel JIT) is left out of plots and ratios."""
    records = [(json.loads(path.read_text()), path)
               for path in sorted(results.glob("long_context_*.json"))]
    runs: dict[str, dict] = {}
    for record, path in sorted(records, key=lambda rp: rp[0].get("date", "")):
        points = [p for p in record.get("batch1", []) if "ttft_s" in p and "note" not in p]
        label = _label(record)
        run = runs.setdefault(label, {**record, "points": [], "files": []})
        run["points"] = sorted(
            {**{p["input_tokens"]: p for p in run["points"]},
             **{p["input_tokens"]: p for p in points}}.values(),
            key=lambda p: p["input_tokens"])
        run["batch1"] = [*run.get("batch1", []), *record.get("batch1", [])]
        run["files"].append(path.name)
    return {label: run for label, run in runs.items() if run["points"]}


# The chunk size the benchmarks serve with (OpenBMB's, and the recommended flags').
DEFAULT_CHUNK = RECOMMENDED_SERVE_FLAGS[RECOMMENDED_SERVE_FLAGS.index("--chunked-prefill-size") + 1]
# Environment variables that choose kernels in the server (recorded in each result's "env").
KERNEL_OVERRIDES = ("SALA_SGLANG_KERNELS", "SALA_SGLANG_SELECT_TILE", "SALA_SGLANG_SELECT_SEGMENT")


def _label(record: dict) -> str:
    """'sala (minicpm_flashinfer)', or 'sala fp8 (minicpm_flashinfer)' for a run served with
    --quantization: quantized weights are another model, never merged with the bf16 points. A
    run with kernel overrides in its environment ('sala kernels=triton (...)'), without the
    prefix cache ('sala no-radix-cache (...)') or with another chunk size than the recommended
    one ('sala chunk=16384 (...)') is a comparison, not the default configuration, and is kept
    apart the same way."""
    flags = [part for flag in record.get("server_flags", [])
             for part in flag.replace("=", " ", 1).split()]
    values = {f: flags[i + 1] for i, f in enumerate(flags[:-1]) if f.startswith("--")}  # last wins
    variants = [values["--quantization"]] if "--quantization" in values else []
    variants += ["no-radix-cache"] if "--disable-radix-cache" in flags else []
    if values.get("--chunked-prefill-size", DEFAULT_CHUNK) != DEFAULT_CHUNK:
        variants.append(f"chunk={values['--chunked-prefill-size']}")
    env = record.get("env", {})
    variants += [f"{k.removeprefix('SALA_SGLANG_').lower()}={env[k]}"
                 for k in KERNEL_OVERRIDES if k in env]
    return f"{' '.join([record['model'].split(':')[0], *variants])} ({record['attention_backend']})"


def plot(runs: dict[str, dict], results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, ylabel, name, loglog in (
        ("ttft_s", "TTFT (s)", "ttft_vs_length.png", True),
        ("decode_tok_per_s", "decode tokens/s (batch 1)", "decode_vs_context.png", False),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, run in runs.items():
            xs = [p["input_tokens"] for p in run["points"] if p.get(key)]
            ys = [p[key] for p in run["points"] if p.get(key)]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        if loglog:
            ax.set_yscale("log")
        ax.set_xlabel("input tokens")
        ax.set_ylabel(ylabel)
        device = next(iter(runs.values()))["device"]
        ax.set_title(f"{ylabel.split(' (')[0]} vs context, {device}, random weights")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = results / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def table(runs: dict[str, dict]) -> str:
    sala = next((r for label, r in runs.items() if label.startswith("sala (")), None)
    dense = {label: r for label, r in runs.items() if not label.startswith("sala")}
    lengths = sorted({p["input_tokens"] for r in runs.values() for p in r["points"]})
    head = ["input tokens", "SALA TTFT (s)", "SALA decode (tok/s)", "SALA MFU"]
    for label in dense:
        head += [f"{label} TTFT (s)", f"{label} decode (tok/s)",
                 f"TTFT ratio {label.split()[1]}/SALA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in lengths:
        s = next((p for p in sala["points"] if p["input_tokens"] == n), None) if sala else None
        if s is None and all(p["input_tokens"] != n for r in dense.values() for p in r["points"]):
            continue
        row = [f"{n // 1024}K"]
        row += ([f"{s['ttft_s']:.2f}", f"{s['decode_tok_per_s']:.1f}", f"{s.get('mfu', 0):.0%}"]
                if s else ["-", "-", "-"])
        for run in dense.values():
            d = next((p for p in run["points"] if p["input_tokens"] == n), None)
            if d:
                ratio = f"{d['ttft_s'] / s['ttft_s']:.2f}x" if s else "-"
                decode = f"{d['decode_tok_per_s']:.1f}" if d.get("decode_tok_per_s") else "-"
                row += [f"{d['ttft_s']:.2f}", decode, ratio]
            else:
                row += ["does not fit" if _rejected(run, n) else "-", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _rejected(run: dict, n: int) -> bool:
    return any(p["input_tokens"] == n and "error" in p for p in run.get("batch1", []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    runs = load_runs(args.results)
    if not runs:
        raise SystemExit(f"no long_context_*.json with batch-1 points in {args.results}")
    for path in plot(runs, args.results):
        print(f"wrote {path}")
    print(table(runs))


if __name__ == "__main__":
    main()
