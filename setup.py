"""Build of the optional CUDA extension `sala_sglang._C` (csrc/); all metadata is in pyproject.toml.

The extension is built when torch is importable in the build environment, is a CUDA build, and
nvcc is found (CUDA_HOME). `SALA_SGLANG_CUDA=1` requires it (a clear error names what is missing),
`SALA_SGLANG_CUDA=0` skips it. Otherwise, e.g. in pip's isolated build environment, which has no
torch, the package installs as pure Python: the Triton kernels serve every op. GPU targets: sm_90a
and sm_80 (plus compute_80 PTX for newer GPUs), unless TORCH_CUDA_ARCH_LIST names others.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
MODE = os.environ.get("SALA_SGLANG_CUDA", "").strip()

DEFAULT_GENCODE = [
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=[sm_80,compute_80]",
]


def log(message: str) -> None:
    print(f"sala-sglang setup: {message}", file=sys.stderr, flush=True)


def missing_cuda_toolchain() -> str | None:
    """Why the extension cannot be built here, or None when it can."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return "torch is not importable in the build environment (pip's build isolation hides it: "\
            "use --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return "nvcc not found: set CUDA_HOME to the CUDA toolkit"
    if not (Path(home) / "include" / "cuda_runtime.h").exists():
        return f"no CUDA headers under CUDA_HOME={home}/include: set CUDA_HOME to the toolkit root"
    if not list(CSRC.glob("*.cu")):
        return f"no CUDA sources in {CSRC}"
    return None


def cuda_extension_setup() -> dict:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in [*CSRC.glob("*.cpp"), *CSRC.glob("*.cu")])
    gencode = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else DEFAULT_GENCODE
    extension = CUDAExtension(
        name="sala_sglang._C",
        sources=sources,
        depends=sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cuh")),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            # No --use_fast_math: the kernels call fast intrinsics only where accuracy allows.
            "nvcc": ["-O3", "-std=c++17", "--threads=2", "-lineinfo", *gencode],
        },
    )
    log(f"building sala_sglang._C from {len(sources)} sources")
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


def extension_setup() -> dict:
    if MODE not in ("", "0", "1"):
        raise SystemExit(f"SALA_SGLANG_CUDA={MODE!r}: expected 1 (require the CUDA extension), "
                         "0 (skip it) or unset (build it when the toolchain is there)")
    if MODE == "0":
        log("SALA_SGLANG_CUDA=0: pure Python install (Triton kernels only)")
        return {}
    reason = missing_cuda_toolchain()
    if reason is None:
        return cuda_extension_setup()
    if MODE == "1":
        raise SystemExit(f"SALA_SGLANG_CUDA=1 but the CUDA extension cannot be built: {reason}")
    log(f"pure Python install, no sala_sglang._C: {reason}")
    return {}


setup(**extension_setup())
