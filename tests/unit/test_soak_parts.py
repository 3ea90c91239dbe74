"""benchmarks/soak_parts.py: the real-config soak's parts added up."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import soak_parts


def _part(path: Path, date: str, seconds: float, errors: int, used_after: int) -> Path:
    load = {"num_used_tokens": 0, "num_running_reqs": 0, "num_waiting_reqs": 0,
            "max_total_num_tokens": 3253056}
    path.write_text(json.dumps({
        "date": date, "device": "NVIDIA H100 80GB HBM3", "seconds": seconds, "requests": 90,
        "completed": 17, "aborted_by_client": 8, "dropped_at_end": 64, "errors": errors,
        "retracted_requests": 0, "forced_retracted_requests": 5, "passed": errors == 0,
        "server_alive_after_idle": True, "load_before": load,
        "load_after": {**load, "num_used_tokens": used_after},
        "gpu_used_mib_before": 72097, "gpu_used_mib_after": 72323,
    }))
    return path


def test_parts_are_summed_oldest_first(tmp_path: Path) -> None:
    late = _part(tmp_path / "b.json", "2026-12-08T10:00:00+00:00", 270.0, 0, 0)
    early = _part(tmp_path / "a.json", "2026-12-07T02:42:14+00:00", 150.0, 0, 0)
    summary = soak_parts.summarize([late, early])
    assert [r["file"] for r in summary["parts"]] == ["a.json", "b.json"]
    total = summary["total"]
    assert (total["parts"], total["minutes"], total["requests"]) == (2, 7.0, 180)
    assert total["errors"] == 0
    assert total["forced_retracted_requests"] == 10
    assert total["every_part_passed"] and total["every_pool_back_to_start"]
    lines = soak_parts.table(summary).splitlines()
    assert len(lines) == 5 and lines[-1].startswith("| total (2 parts) | 7.0 | 180 |")


def test_a_part_with_an_error_or_a_pool_left_in_use_shows(tmp_path: Path) -> None:
    bad = _part(tmp_path / "c.json", "2026-12-08T11:00:00+00:00", 60.0, 1, 512)
    summary = soak_parts.summarize([bad])
    assert summary["total"]["errors"] == 1
    assert not summary["total"]["every_part_passed"]
    assert not summary["total"]["every_pool_back_to_start"]
    assert "| NO |" in soak_parts.table(summary)
