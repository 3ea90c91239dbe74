"""Run a script with Triton's CPU interpreter (TRITON_INTERPRET is read when kernels are defined,
so it needs a fresh interpreter) and return the last line it printed."""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(script: str, timeout_s: int = 900) -> str:
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]
