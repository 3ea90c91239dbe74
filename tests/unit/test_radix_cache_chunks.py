"""The radix-cache host-time benchmark runs SGLang's own cache chunk by chunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sglang")

from benchmarks import radix_cache_chunks  # noqa: E402


def test_every_chunk_is_cached_and_timed() -> None:
    times = radix_cache_chunks.chunked_caching_times(1024, 256)
    assert len(times) == 4 and all(t > 0 for t in times)


def test_the_record_has_a_row_per_length_and_chunk(tmp_path: Path) -> None:
    path = radix_cache_chunks.main(["--lengths", "512", "1024", "--chunks", "256", "--out",
                                    str(tmp_path)])
    record = json.loads(path.read_text())
    assert [(r["length"], r["chunk"], r["chunks"]) for r in record["rows"]] == [
        (512, 256, 2), (1024, 256, 4)]
    assert record["cpu"] and record["device"] is None
