"""What every benchmark script shares: the record header (device, versions, date, command),
writing results, GPU timing, and the device ceilings measured in the same run. The record and
timing helpers live in the package (`sala-sglang bench` uses them too)."""

from __future__ import annotations

from pathlib import Path

import torch

from sala_sglang import bench
from sala_sglang.bench import gpu_time_ms, header, measure_bf16_peak, versions  # noqa: F401
from sala_sglang.config import RELEASED_CONFIG_PATH as RELEASED_CONFIG  # noqa: F401

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def write_result(record: dict, name: str, out: Path = RESULTS) -> Path:
    path = bench.write_result(record, name, out)
    print(f"wrote {path}", flush=True)
    return path


def measured_peaks() -> dict:
    """bf16 dense matmul TFLOP/s and device-to-device copy GB/s (bytes read + written), measured
    now on this GPU: the ceilings that achieved rates are quoted against."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = gpu_time_ms(lambda: dst.copy_(src))
    src = dst = None  # free the 4 GiB before the matmul
    torch.cuda.empty_cache()
    return {**measure_bf16_peak(), "copy_gb_per_s": round(2 * (2 << 30) / copy_ms / 1e6, 1)}
