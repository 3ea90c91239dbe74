# Source on the GPU machine from the repo root: offline SGLang kit + this project, editable.
# (See ../shared/gpu-kit/README.md; the kit is carried as .device-kit/.)
source .device-kit/setup.sh || return 1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null || return 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
