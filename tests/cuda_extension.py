"""What the GPU tests of the compiled ops (`sala_sglang._C`) share: the skip mark of tests that
call an op of the extension directly, and running a snippet in a child process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def _extension_built() -> bool:
    from sala_sglang.ops import _cuda

    return torch.cuda.is_available() and _cuda.available()


needs_extension = pytest.mark.skipif(not _extension_built(), reason="sala_sglang._C is not built")


def child_stdout(script: str) -> str:
    """Run script in a fresh interpreter and return what it printed: an error path that brings
    the interpreter down (a segfault was seen on the H100 image) then fails one test instead of
    ending the whole session."""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    return out.stdout
