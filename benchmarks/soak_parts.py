"""The real-config soak's parts added up (issue 20 asks for 30 minutes of traffic, which device
calls of at most 10 minutes serve a part at a time): one row per `soak.py --model sala` result
and the totals, written as `results/soak_sala_parts_total.json` and printed as the table
benchmarks/README.md keeps.

    python benchmarks/soak_parts.py            # every results/soak_sala*.json
    python benchmarks/soak_parts.py A.json B.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: `benchmarks` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS  # noqa: E402
from benchmarks.soak import pool_back_to_start  # noqa: E402

TOTAL_NAME = "soak_sala_parts_total.json"
# Summed over the parts.
COUNTS = ("requests", "completed", "aborted_by_client", "dropped_at_end", "errors",
          "retracted_requests", "forced_retracted_requests")


def part_row(path: Path, record: dict) -> dict:
    """One part: what it served and whether it left the server as it found it."""
    return {
        "file": path.name,
        "date": record.get("date"),
        "device": record.get("device"),
        "minutes": round(record.get("seconds", 0) / 60, 2),
        **{k: record.get(k) or 0 for k in COUNTS},
        "passed": bool(record.get("passed")),
        "server_alive_after_idle": bool(record.get("server_alive_after_idle")),
        "pool_back_to_start": pool_back_to_start(record),
        "gpu_used_mib_before": record.get("gpu_used_mib_before"),
        "gpu_used_mib_after": record.get("gpu_used_mib_after"),
    }


def summarize(paths: list[Path]) -> dict:
    """{parts: [row, ...], total: {...}} over the soak results at `paths`, oldest first."""
    rows = sorted((part_row(p, json.loads(p.read_text())) for p in paths),
                  key=lambda r: r["date"] or "")
    total = {
        "parts": len(rows),
        "minutes": round(sum(r["minutes"] for r in rows), 2),
        **{k: sum(r[k] for r in rows) for k in COUNTS},
        "every_part_passed": all(r["passed"] for r in rows),
        "every_pool_back_to_start": all(r["pool_back_to_start"] for r in rows),
    }
    return {"parts": rows, "total": total}


def _line(label: str, counts: dict, pool_back: bool, gpu_cell: str) -> str:
    """One table line: a part's row or the totals (the same count keys); the last cell as
    given, spaces included."""
    return (f"| {label} | {counts['minutes']} | {counts['requests']} | {counts['completed']} | "
            f"{counts['aborted_by_client']} | {counts['dropped_at_end']} | "
            f"{counts['retracted_requests']} / {counts['forced_retracted_requests']} | "
            f"{counts['errors']} | {'yes' if pool_back else 'NO'} |{gpu_cell}|")


def table(summary: dict) -> str:
    """The summary as a markdown table, one line per part and the totals."""
    head = ("| part | minutes | requests | completed | aborted | dropped at end | retracted "
            "(pool full / forced) | errors | pool back | GPU MiB before / after |")
    lines = [head, "|" + "---|" * 10]
    lines += [_line(r["file"], r, r["pool_back_to_start"],
                    f" {r['gpu_used_mib_before']} / {r['gpu_used_mib_after']} ")
              for r in summary["parts"]]
    t = summary["total"]
    parts = f"{t['parts']} part{'' if t['parts'] == 1 else 's'}"
    lines.append(_line(f"total ({parts})", t, t["every_pool_back_to_start"], " "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = ([Path(a) for a in args] if args
             else sorted(p for p in RESULTS.glob("soak_sala*.json") if p.name != TOTAL_NAME))
    if not paths:
        print("no soak_sala results", file=sys.stderr)
        return 1
    summary = summarize(paths)
    (RESULTS / TOTAL_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
