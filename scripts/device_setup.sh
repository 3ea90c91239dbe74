# Source on the GPU machine from the repo root: offline SGLang kit + this project, editable.
# (See ../shared/gpu-kit/README.md; the kit is carried as .device-kit/.)
# A warm machine keeps processes from the previous call: a server left behind by a killed run
# would hold the GPU's memory, so any GPU process found now is stale and is stopped.
for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do
    pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
    [ -n "$pgid" ] && kill -9 -- "-$pgid" 2>/dev/null
    kill -9 "$pid" 2>/dev/null
done
source .device-kit/setup.sh || return 1
# SALA_SGLANG_CUDA=0 when sala_sglang/_C was built elsewhere for this Python and torch and carried
# (saves the nvcc build of a fresh machine); otherwise the install builds it. A warm machine keeps
# the previous call's ignored build outputs: when its editable install still points at this
# checkout and its `_C` was built from the same csrc and build files (hash kept in build/),
# installing again would only rebuild the same extension (~35 s a call).
_sala_build_hash=$(cat csrc/* setup.py pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat build/sala-installed.sha256 2>/dev/null)" = "$_sala_build_hash" ] && python3 -c "
import os, sys, torch, sala_sglang, sala_sglang._C
sys.exit(os.path.dirname(os.path.realpath(sala_sglang.__file__)) != os.path.realpath('sala_sglang'))
" 2>/dev/null; then
    echo "device_setup: sala-sglang already installed here from this csrc (${_sala_build_hash:0:12})"
else
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null || return 1
    mkdir -p build && echo "$_sala_build_hash" >build/sala-installed.sha256
fi
unset _sala_build_hash
# sglang.bench_serving imports `datasets`, which the kit lacks: carry its wheels (datasets, dill,
# multiprocess) as .whl/ to run the benchmark's serving part.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index .whl/*.whl >/dev/null || return 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
