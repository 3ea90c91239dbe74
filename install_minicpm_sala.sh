#!/usr/bin/env bash
# One-command install of sala-sglang (MiniCPM-SALA for SGLang) on a Linux machine with an NVIDIA
# GPU: a virtual environment, the pinned SGLang and torch, this checkout with its CUDA extension,
# and a check that SGLang finds the model. Run with --help for the options.
set -euo pipefail

# pyproject.toml's requires-python, and the CUDA the pinned torch==2.11.0 wheels are built with
# (the toolkit that compiles sala_sglang._C must have the same major version).
readonly MIN_PYTHON="3.11"
readonly TORCH_CUDA="13.0"

SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SRC_DIR
PROG="$(basename "${BASH_SOURCE[0]}")"
readonly PROG

usage() {
    cat <<EOF
Usage: $PROG [OPTIONS]

Installs sala-sglang from this checkout ($SRC_DIR) into a virtual environment:
  1. checks the tools first (Python >= $MIN_PYTHON; for the CUDA extension nvcc, gcc, g++ and
     the Python headers), and stops before installing anything if one is missing;
  2. creates the venv (with \`uv venv\` when uv is on PATH, else \`python3 -m venv\`), or reuses it;
  3. installs the runtime dependencies from pyproject.toml (SGLang 0.5.16, torch 2.11.0, ...)
     and the build requirements; what is already installed is skipped;
  4. installs sala-sglang with --no-build-isolation, which compiles its CUDA extension
     sala_sglang._C against the installed torch (SALA_SGLANG_CUDA=1: a failed build is an error);
  5. verifies: imports sala_sglang and sglang, registers the plugin, resolves the
     MiniCPMSALAForCausalLM architecture in SGLang's ModelRegistry, reports whether
     sala_sglang._C is built; then prints the command to serve.
Running it again reuses the venv and reinstalls only sala-sglang itself.

Options:
  --venv DIR             virtual environment to create or reuse (default: ./.venv)
  --python PY            Python interpreter for a new venv (default: python3)
  --editable             install the checkout editable (pip install -e): source edits take
                         effect without reinstalling (the CUDA extension still needs a rerun)
  --no-cuda-build        skip the CUDA extension (SALA_SGLANG_CUDA=0); the pure Triton kernels
                         serve the model. nvcc, gcc and g++ are then not needed
  --index-url URL        package index to install from (a PyPI mirror), passed to pip/uv
  --extra-index-url URL  an additional package index; may be given more than once
  --no-uv                use python -m venv and pip even when uv is on PATH
  --dry-run              check the tools and print every step without running any
  -h, --help             show this help

Environment: CUDA_HOME (the CUDA toolkit root; default: the directory above nvcc's bin/ on
PATH, else /usr/local/cuda), TORCH_CUDA_ARCH_LIST (GPU architectures to compile for; default:
sm_90a and sm_80, with PTX for newer GPUs), MAX_JOBS (parallel compile jobs).
EOF
}

say() { printf '==> %s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
# An error: the first argument on the error line, each further one (what to do) indented below.
error() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    shift
    [[ $# -eq 0 ]] || printf '    %s\n' "$@" >&2
}
die() {
    error "$@"
    exit 1
}

# Print a command, then run it unless this is a dry run.
run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ $DRY_RUN -eq 0 ]]; then
        "$@"
    fi
}

VENV=".venv"
PYTHON="python3"
EDITABLE=0
CUDA_BUILD=1
USE_UV=1
DRY_RUN=0
INDEX_ARGS=()

need_value() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --venv) need_value "$@"; VENV=$2; shift 2 ;;
        --python) need_value "$@"; PYTHON=$2; shift 2 ;;
        --editable) EDITABLE=1; shift ;;
        --no-cuda-build) CUDA_BUILD=0; shift ;;
        --index-url) need_value "$@"; INDEX_ARGS+=(--index-url "$2"); shift 2 ;;
        --extra-index-url) need_value "$@"; INDEX_ARGS+=(--extra-index-url "$2"); shift 2 ;;
        --no-uv) USE_UV=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[[ $VENV == /* ]] || VENV="$PWD/$VENV"
VENV_PY="$VENV/bin/python"
[[ -f $SRC_DIR/pyproject.toml ]] || die "no pyproject.toml next to $PROG: run it from a sala-sglang checkout"
if [[ $USE_UV -eq 1 ]] && ! command -v uv >/dev/null; then
    USE_UV=0
fi

# ---------------------------------------------------------------- 1. tools, before installing
# Missing prerequisites, all reported together; each one's lines are joined by tabs.
PROBLEMS=()
problem() {
    local IFS=$'\t'
    PROBLEMS+=("$*")
}

[[ $(uname -s) == Linux ]] || warn "SGLang serves on Linux only; this is $(uname -s)"

# A reused venv decides the Python; otherwise the interpreter that will create it.
CHECK_PY=$PYTHON
[[ -x $VENV_PY ]] && CHECK_PY=$VENV_PY
if ! command -v "$CHECK_PY" >/dev/null; then
    die "Python interpreter '$CHECK_PY' not found" \
        "install Python >= $MIN_PYTHON (Ubuntu 24.04: apt-get install python3 python3-venv python3-dev)" \
        "or pass --python PATH"
fi
PY_VERSION=$("$CHECK_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if ! "$CHECK_PY" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))"; then
    die "$CHECK_PY is Python $PY_VERSION; sala-sglang needs Python >= $MIN_PYTHON (pass --python PATH)"
fi
say "Python $PY_VERSION ($(command -v "$CHECK_PY"))"
if [[ ! -x $VENV_PY && $USE_UV -eq 0 ]] && ! "$CHECK_PY" -c 'import ensurepip, venv' 2>/dev/null; then
    problem "$CHECK_PY cannot create a virtual environment (no venv or ensurepip module)" \
        "apt-get install python3-venv (or python$PY_VERSION-venv)"
fi

NO_CUDA_HINT="or re-run with --no-cuda-build: the Triton kernels need no compiler"
if [[ $CUDA_BUILD -eq 1 ]]; then
    # The toolkit torch's extension builder will use: CUDA_HOME or CUDA_PATH, else the directory
    # above nvcc's bin/ on PATH, else /usr/local/cuda.
    TOOLKIT=${CUDA_HOME:-${CUDA_PATH:-}}
    if [[ -z $TOOLKIT ]] && command -v nvcc >/dev/null; then
        TOOLKIT=$(dirname "$(dirname "$(command -v nvcc)")")
    fi
    TOOLKIT=${TOOLKIT:-/usr/local/cuda}
    NVCC="$TOOLKIT/bin/nvcc"
    if [[ ! -x $NVCC ]]; then
        WHERE="not on PATH, and no $NVCC"
        [[ -n ${CUDA_HOME:-${CUDA_PATH:-}} ]] && WHERE="no $NVCC (CUDA_HOME/CUDA_PATH is $TOOLKIT)"
        problem "nvcc (the CUDA compiler) not found: $WHERE" \
            "the CUDA extension needs the CUDA toolkit $TORCH_CUDA (torch 2.11.0's CUDA): install it" \
            "(https://developer.nvidia.com/cuda-downloads, or apt-get install cuda-toolkit-13-0" \
            "from NVIDIA's apt repository), then export PATH=/usr/local/cuda/bin:\$PATH or set CUDA_HOME;" \
            "$NO_CUDA_HINT"
    elif [[ ! -f $TOOLKIT/include/cuda_runtime.h ]]; then
        HINT="set CUDA_HOME to the toolkit root"
        [[ -f /usr/local/cuda/include/cuda_runtime.h ]] && HINT+=" (export CUDA_HOME=/usr/local/cuda)"
        problem "found $NVCC but no CUDA headers in $TOOLKIT/include (torch takes the toolkit root from nvcc's location)" \
            "$HINT;" "$NO_CUDA_HINT"
    else
        NVCC_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
        say "nvcc: $NVCC (CUDA ${NVCC_VERSION:-unknown version})"
        if [[ -n $NVCC_VERSION && ${NVCC_VERSION%%.*} != "${TORCH_CUDA%%.*}" ]]; then
            warn "nvcc is CUDA $NVCC_VERSION, the pinned torch's CUDA is $TORCH_CUDA:" \
                "the build stops after installing torch unless its CUDA is ${NVCC_VERSION%%.*}.x"
        fi
    fi
    for tool in gcc "${CXX:-g++}"; do
        if command -v "$tool" >/dev/null; then
            say "$tool: $(command -v "$tool")"
        else
            problem "$tool (C/C++ compiler) not found on PATH; the CUDA extension needs gcc and g++" \
                "apt-get install build-essential (RHEL, Fedora: dnf install gcc gcc-c++);" "$NO_CUDA_HINT"
        fi
    done
    if ! "$CHECK_PY" -c 'import os, sysconfig, sys; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        problem "the Python $PY_VERSION headers (Python.h) are missing; the CUDA extension needs them" \
            "apt-get install python3-dev (or python$PY_VERSION-dev);" "$NO_CUDA_HINT"
    fi
else
    say "--no-cuda-build: skipping the CUDA extension (nvcc, gcc and g++ not needed)"
fi

if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    DRIVER_CUDA=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
    say "GPU driver supports CUDA ${DRIVER_CUDA:-unknown}"
    if [[ -n $DRIVER_CUDA && ${DRIVER_CUDA%%.*} -lt ${TORCH_CUDA%%.*} ]]; then
        warn "the NVIDIA driver supports CUDA $DRIVER_CUDA only; torch 2.11.0 (CUDA $TORCH_CUDA) needs a driver >= 580 to use the GPU"
    fi
else
    warn "no NVIDIA GPU visible (nvidia-smi missing or failing): installing works, serving needs a GPU"
fi

if [[ ${#PROBLEMS[@]} -gt 0 ]]; then
    for p in "${PROBLEMS[@]}"; do
        IFS=$'\t' read -r -a lines <<<"$p"
        error "${lines[@]}"
    done
    die "${#PROBLEMS[@]} missing prerequisite(s); nothing was installed"
fi

# ---------------------------------------------------------------- 2. the virtual environment
if [[ -x $VENV_PY ]]; then
    say "reusing the virtual environment $VENV"
elif [[ -e $VENV ]]; then
    die "$VENV exists but is not a virtual environment (no bin/python): remove it or pass --venv DIR"
elif [[ $USE_UV -eq 1 ]]; then
    say "creating the virtual environment $VENV (uv)"
    run uv venv --python "$(command -v "$PYTHON")" "$VENV"
else
    say "creating the virtual environment $VENV"
    run "$PYTHON" -m venv "$VENV"
fi

if [[ $USE_UV -eq 1 ]]; then
    INSTALL=(uv pip install --python "$VENV_PY")
else
    INSTALL=("$VENV_PY" -m pip install)
fi
INSTALL+=("${INDEX_ARGS[@]}")

# ---------------------------------------------------------------- 3. dependencies
# pyproject.toml is the one list of requirements: its runtime dependencies and build requirements.
mapfile -t DEPS < <("$CHECK_PY" - "$SRC_DIR/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    meta = tomllib.load(f)
for req in meta["build-system"]["requires"] + meta["project"]["dependencies"]:
    print(req)
EOF
)
[[ ${#DEPS[@]} -gt 0 ]] || die "could not read the requirements from $SRC_DIR/pyproject.toml"
[[ $CUDA_BUILD -eq 1 ]] && DEPS+=(ninja)  # torch compiles extensions in parallel with ninja
say "installing the dependencies (torch, SGLang, build requirements)"
run "${INSTALL[@]}" "${DEPS[@]}"

if [[ $CUDA_BUILD -eq 1 && $DRY_RUN -eq 1 ]]; then
    say "then: check that torch's CUDA (torch.version.cuda) has nvcc's major version"
elif [[ $CUDA_BUILD -eq 1 ]]; then
    TORCH_BUILT_CUDA=$("$VENV_PY" -c 'import torch; print(torch.version.cuda or "")')
    if [[ -z $TORCH_BUILT_CUDA ]]; then
        die "the installed torch is a CPU-only build, which cannot compile sala_sglang._C" \
            "install a CUDA build: --index-url https://download.pytorch.org/whl/cu130 --extra-index-url https://pypi.org/simple;" \
            "$NO_CUDA_HINT"
    fi
    if [[ -n ${NVCC_VERSION:-} && ${NVCC_VERSION%%.*} != "${TORCH_BUILT_CUDA%%.*}" ]]; then
        die "CUDA mismatch: torch is built with CUDA $TORCH_BUILT_CUDA but nvcc ($NVCC) is CUDA $NVCC_VERSION" \
            "install the CUDA toolkit ${TORCH_BUILT_CUDA%%.*}.x and put it first on PATH (or set CUDA_HOME);" \
            "$NO_CUDA_HINT"
    fi
    say "torch is built with CUDA $TORCH_BUILT_CUDA, nvcc is CUDA $NVCC_VERSION"
fi

# ---------------------------------------------------------------- 4. sala-sglang itself
PROJECT=("$SRC_DIR")
[[ $EDITABLE -eq 1 ]] && PROJECT=(-e "$SRC_DIR")
# pip always rebuilds a local directory; uv must be told to, or it keeps a stale build.
[[ $USE_UV -eq 1 ]] && INSTALL+=(--reinstall-package sala-sglang)
say "installing sala-sglang from $SRC_DIR$([[ $EDITABLE -eq 1 ]] && echo ' (editable)')"
run env "SALA_SGLANG_CUDA=$CUDA_BUILD" "${INSTALL[@]}" --no-build-isolation "${PROJECT[@]}"

# ---------------------------------------------------------------- 5. verify
say "verifying: imports, plugin registration, MiniCPMSALAForCausalLM in SGLang's ModelRegistry"
VERIFY='
import importlib, sys
import sala_sglang, sglang
from sala_sglang.plugin import register
from sglang.srt.models.registry import ModelRegistry
register()
cls, _ = ModelRegistry.resolve_model_cls(["MiniCPMSALAForCausalLM"])
print(f"sala-sglang {sala_sglang.__file__}")
print(f"sglang {sglang.__version__}: MiniCPMSALAForCausalLM -> {cls.__module__}.{cls.__name__}")
try:
    import torch
    ext = importlib.import_module("sala_sglang._C")
    print(f"sala_sglang._C: built ({ext.__file__})")
except ImportError as exc:
    print(f"sala_sglang._C: not built ({exc}); the Triton kernels serve the model")
    sys.exit(3 if sys.argv[1] == "1" else 0)
'
if [[ $DRY_RUN -eq 1 ]]; then
    printf '+ %q -c <import sala_sglang, sglang; register(); ModelRegistry.resolve_model_cls(["MiniCPMSALAForCausalLM"]); import sala_sglang._C> %s\n' "$VENV_PY" "$CUDA_BUILD"
else
    # Run outside the checkout so that the installed package, not the source tree, is imported.
    status=0
    (cd / && "$VENV_PY" -c "$VERIFY" "$CUDA_BUILD") || status=$?
    if [[ $status -eq 3 ]]; then
        die "the CUDA build was requested but sala_sglang._C does not import (see above)" \
            "$NO_CUDA_HINT"
    elif [[ $status -ne 0 ]]; then
        die "verification failed (see the Python error above): sala-sglang is installed in $VENV" \
            "but SGLang does not find MiniCPM-SALA; check \`$VENV_PY -m pip show sglang\` (0.5.16 needed)"
    fi
fi

if [[ $DRY_RUN -eq 1 ]]; then
    say "dry run: nothing was installed"
    exit 0
fi
cat <<EOF

sala-sglang is installed in $VENV. Serve the tiny test model (or add --model PATH):

    source $VENV/bin/activate && sala-sglang serve

or SGLang directly, with a real checkpoint:

    source $VENV/bin/activate && python -m sglang.launch_server --model-path PATH --attention-backend minicpm_flashinfer
EOF
