"""What every benchmark script shares: the record header (device, versions, date, command),
writing results, GPU timing, and the device ceilings measured in the same run."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
RELEASED_CONFIG = ROOT / "tests" / "fixtures" / "minicpm_sala_config.json"

PACKAGES = ("sglang", "sglang-kernel", "flashinfer-python", "flash-linear-attention", "triton",
            "sala-sglang")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def header(benchmark: str, tag: str) -> dict:
    """The fields every result file starts with."""
    return {
        "benchmark": benchmark,
        "tag": tag,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions(),
        "command": " ".join([sys.executable, *sys.argv]),
    }


def write_result(record: dict, name: str, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def gpu_time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() over iters runs, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measured_peaks() -> dict:
    """bf16 dense matmul TFLOP/s and device-to-device copy GB/s (bytes read + written), measured
    now on this GPU: the ceilings that achieved rates are quoted against."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = gpu_time_ms(lambda: a @ b)
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = gpu_time_ms(lambda: dst.copy_(src))
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {
        "bf16_tflops": round(2 * n**3 / mm_ms / 1e9, 1),
        "copy_gb_per_s": round(2 * (2 << 30) / copy_ms / 1e6, 1),
    }
