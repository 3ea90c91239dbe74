#!/usr/bin/env bash
# Builds sala_sglang._C on this machine for another CPython (default python3.12, the GPU
# machine's) against the active Python's torch, and writes it xz-compressed with the hash of the
# csrc it came from, for `scripts/gpu_checks.sh op-errors` (PREBUILT_C=...) to compare with the
# GPU machine's own build. Needs nvcc (CUDA_HOME), a CUDA build of torch in the active Python,
# and the target Python's headers. Sources are built for sm_90a unless TORCH_CUDA_ARCH_LIST says.
#   bash scripts/prebuild_extension.sh [OUT_DIR]    # default .prebuilt (git-ignored locally)
set -euo pipefail
out=${1:-.prebuilt}
target=${TARGET_PYTHON:-python3.12}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} SALA_SGLANG_CUDA=1
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$root/csrc" "$root/sala_sglang" "$root/setup.py" "$root/pyproject.toml" "$work/"
find "$work/sala_sglang" -name "_C*.so" -delete
# The .cu objects do not depend on the Python version; module.cpp (the module init) does.
(cd "$work" && python setup.py build_ext --inplace >"$work/build.log" 2>&1) \
    || { tail -20 "$work/build.log"; exit 1; }
objects=()
for o in "$work"/build/temp.*/csrc/*.o; do
    [ "$(basename "$o")" = module.o ] && continue
    if nm -u "$o" | grep -q " U _\?Py"; then
        echo "$o uses the Python C API: it would need the target Python's headers too" >&2
        exit 1
    fi
    objects+=("$o")
done
torch_dir=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))")
include=$("$target" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
suffix=$("$target" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
c++ -O3 -std=c++17 -fPIC -DNDEBUG -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" -I"$CUDA_HOME/include" \
    -I"$include" -c "$root/csrc/module.cpp" -o "$work/module.o"
g++ -shared "${objects[@]}" "$work/module.o" -L"$torch_dir/lib" -L"$CUDA_HOME/lib64" \
    -lc10 -ltorch -ltorch_cpu -ltorch_python -lcudart -lc10_cuda -ltorch_cuda -o "$work/_C$suffix"
mkdir -p "$out"
xz -c "$work/_C$suffix" >"$out/_C$suffix.xz"
(cd "$root/csrc" && cat ./*.cu ./*.cpp ./*.cuh | sha256sum | cut -d' ' -f1) >"$out/csrc.sha256"
echo "$out/_C$suffix.xz (csrc $(cut -c1-12 "$out/csrc.sha256"), $(c++ --version | head -1))"
