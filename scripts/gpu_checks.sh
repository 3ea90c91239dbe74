#!/usr/bin/env bash
# GPU checks in parts that each fit one device call (10 minutes), on the GPU machine from the
# repo root after `source scripts/device_setup.sh`. Logs go to $OUT (or ./gpu-logs).
#   bash scripts/gpu_checks.sh ops http         # kernels against the reference; HTTP 4xx
#   bash scripts/gpu_checks.sh serving-graph    # tiny model served = reference, fp16 graph modes
#   bash scripts/gpu_checks.sh serving-other    # eager+mixed-chunk fp16 and bf16 modes
#   bash scripts/gpu_checks.sh soak             # 1000 requests, 10% aborted, pools free after
#   bash scripts/gpu_checks.sh profile          # where a decode step's time goes (real config)
set -uo pipefail
out="${OUT:-gpu-logs}"
mkdir -p "$out"
status=0
run() {  # name, command...
    local name=$1; shift
    echo "=== $name: $*"
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    grep -E "passed|failed|error|\[soak\] \{|kernels_per_step|gpu_busy_ms|span_ms" "$out/$name.log" | tail -3
    [ "$rc" -eq 0 ] || { echo "=== $name FAILED (rc $rc), log: $out/$name.log"; status=1; }
}
pytest_gpu() { python -m pytest -q -s -p no:cacheprovider "$@"; }
for part in "$@"; do
    case "$part" in
        ops) run ops pytest_gpu tests/test_gpu_lightning_ops.py tests/test_gpu_cuda_lightning.py \
                 tests/test_gpu_sparse_ops.py ;;
        http) run http pytest_gpu tests/test_gpu_http_errors.py ;;
        serving-graph) run serving-graph pytest_gpu tests/test_gpu_serving.py -k "graph_fp16" ;;
        serving-other) run serving-other pytest_gpu tests/test_gpu_serving.py \
                           -k "eager_mixed_fp16 or graph_bf16" ;;
        soak) run soak python benchmarks/soak.py --out "$out" ;;
        profile) run profile python benchmarks/profile_decode.py --out "$out" ;;
        *) echo "unknown part: $part (ops, http, serving-graph, serving-other, soak, profile)"
           exit 2 ;;
    esac
done
exit "$status"
