#!/usr/bin/env bash
# GPU checks in parts that each fit one device call (10 minutes), on the GPU machine from the
# repo root after `source scripts/device_setup.sh`. Logs go to $OUT (or ./gpu-logs).
#   bash scripts/gpu_checks.sh ops http         # kernels against the reference; HTTP 4xx
#   bash scripts/gpu_checks.sh serving-graph    # tiny model served = reference, fp16 graph modes
#   bash scripts/gpu_checks.sh serving-other    # eager+mixed-chunk fp16 and bf16 modes
#   bash scripts/gpu_checks.sh serving-parallel # dense_as_sparse, eager, bf16 and http side by side
#   bash scripts/gpu_checks.sh serving-cuda     # graph fp16/bf16 with every op on its CUDA kernel
#   bash scripts/gpu_checks.sh serving-segments # graph fp16, CUDA selection in 8-token CTAs that
#                                               # merge 3-block segments (the tiny suite's widths
#                                               # never need a second segment otherwise)
#   bash scripts/gpu_checks.sh prefix-cache     # prefix-cache hits = reference = no-cache server,
#                                               # graph, eager and dense_as_sparse side by side
#   bash scripts/gpu_checks.sh retraction       # forced decode retraction: outputs = reference
#   bash scripts/gpu_checks.sh side-by-side     # ops and every served module above, in parallel
#   bash scripts/gpu_checks.sh aborts           # client drops while queued, between prefill
#                                               # chunks, while decoding; /abort_request
#   PREBUILT_C=.prebuilt/_C.cpython-312-x86_64-linux-gnu.so.xz bash scripts/gpu_checks.sh op-errors
#                                               # op errors with this machine's _C, then with one
#                                               # from scripts/prebuild_extension.sh
#   bash scripts/gpu_checks.sh speculative      # NGRAM chains served = reference = plain decode
#   bash scripts/gpu_checks.sh soak             # 1000 requests, 10% aborted, pools free after
#   bash scripts/gpu_checks.sh soak-real        # real config, random weights: 8K-1M prompts for
#                                               # 4.5 minutes, 10% dropped, a forced retraction
#                                               # every 100 steps, pools free after
#   bash scripts/gpu_checks.sh profile          # where a decode step's time goes (real config,
#                                               # 128K of context, a server for 256K)
#   bash scripts/gpu_checks.sh profile-verify   # the same, sampled, plain and NGRAM T=4 (128K)
#   bash scripts/gpu_checks.sh kernels-decode-attention  # decode attention split sweep, both kernels
#   bash scripts/gpu_checks.sh profile-prefill  # where one 8192-token prefill chunk's time goes
#                                               # at 128K, 512K and 1M of context (real config)
# The long-context benchmark (real configs) in parts that each fit one call; results merge by
# model in benchmarks/plot_long_context.py, the newest point of a length winning:
#   sweep-sala-short (32K-256K, then bench_serving: 16 prompts of 32K-128K, concurrency 8 and
#   unlimited)  sweep-sala-long (512K, 1M)  sweep-dense (32K-512K)  serving-dense (bench_serving)
#   sweep-1m-no-radix-cache, sweep-1m-chunk16k (1M without the prefix cache, with 16K chunks)
#   compare-sala, compare-dense (both models at 64K-256K, back to back on one machine)
#   targets-256k (issue 17's TTFT at 256K and decode at 128K, one server for 256K)
# The prefix cache (issue 16), each part one server with the cache and one with
# --disable-radix-cache, one after the other on the same GPU, one result file:
#   prefix-bench-a (4-turn conversations about 128K and 512K-token documents, then
#   bench_serving's generated-shared-prefix set)  prefix-bench-b (the same conversation at 1M)
# The SOAR-style score: soar-sala-a, soar-sala-b (the whole set, concurrency 1, then 8 and
#   unlimited); soar-cmp-sala, soar-cmp-dense-a, -b (inputs capped at 256K, a quarter of the
#   set, SALA and the dense shape on the same machine)
# NGRAM speculative decoding, a server without speculation and one per draft depth, one after the
# other on the same GPU, one result file:
#   spec-bench (32K and 128K documents: a prompt repeating one span, greedy, and sampled random
#   ids that no draft matches; --draft-tokens 4 and 8)  spec-bench-128k (128K, T = 4 only)
#   spec-sweep-a, spec-sweep-b (draft tokens 2, 3, 5 and 6, 7, 9 against plain decode, the
#   repeating workload at 32K only)
# Two GPUs (issue 19; a kind with two GPUs, e.g. nvidia-h100-x2):
#   two-gpus (the tiny model at --tp-size 2 in graph, eager and dense_as_sparse modes and at
#   --dp-size 2: served = reference, 1 and 8 concurrent requests, every replica's pools free)
#   two-gpus-bench-tp (real config: TTFT and decode at 128K, 256K and 1M, --tp-size 2 then TP 1
#   on GPU 0)  two-gpus-bench-dp (bench_serving at concurrency 8 and unlimited on 16 prompts of
#   32K-128K, --dp-size 2 then one replica on GPU 0); each bench part one result file
set -uo pipefail
# NVLink multicast off in NCCL, PyTorch and NVSHMEM, for every part and every server it starts
# (the device notes: on shared hosts it can put the GPUs out of service). At TP > 1 SGLang's
# custom all-reduce and logits all-gather sit on PyTorch's symmetric memory, which would use it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out="${OUT:-gpu-logs}"
mkdir -p "$out"
status=0
run() {  # name, command...
    local name=$1; shift
    echo "=== $name: $*"
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    grep -E "passed|failed|error|\[soak\] \{|\[bench\] \{|kernels_per_step|gpu_busy_ms|span_ms" "$out/$name.log" | tail -3
    [ "$rc" -eq 0 ] || { echo "=== $name FAILED (rc $rc), log: $out/$name.log"; status=1; }
    return "$rc"
}
# Tiny-model test servers sharing one GPU: SGLang sizes pools from --mem-fraction-static of the
# whole GPU less what the other processes hold at that moment (0.06 left nothing once a few
# servers ran: "Computed max_mamba_cache_size=-3084"), so each takes a large fraction and caps
# its pools; a test's own pool flags still win (testing/server.py).
SHARED_GPU="--mem-fraction-static 0.9 --max-total-tokens 262144 --max-mamba-cache-size 96"
pytest_gpu() { python -m pytest -q -s -p no:cacheprovider "$@"; }
SERVING=tests/serving/test_gpu_serving.py
TWO_GPUS=tests/serving/test_gpu_two_gpus.py
long_context() { python benchmarks/long_context.py --out "$out" "$@"; }
# Qwen3-8B's shape on FlashInfer, SGLang's fastest dense backend here; its piecewise prefill
# graph capture did not finish within 170 s of startup, and 8192-token chunks gain nothing by it.
DENSE=(--model qwen3-8b --backend flashinfer --server-args=--disable-piecewise-cuda-graph)
for part in "$@"; do
    case "$part" in
        # Every op test, each implementation against the reference (on a GPU nothing skips).
        ops) run ops pytest_gpu tests/ops ;;
        http) run http pytest_gpu tests/serving/test_gpu_http_errors.py ;;
        # Server modes by marker (tests/serving/test_gpu_serving.py: MODE_MARKS).
        serving-graph) run "$part" pytest_gpu "$SERVING" -m "fp16 and cuda_graph" ;;
        serving-other) run "$part" pytest_gpu "$SERVING" -m "eager or bf16" ;;
        # The three modes serving-graph and serving-other leave out of one call, side by side on
        # one GPU (a fifth of its memory each; the tiny model needs little): one call, not two.
        serving-parallel)
            # a fifth of the GPU each, unless the caller shares it out further
            export SALA_SGLANG_TEST_SERVER_FLAGS="${SALA_SGLANG_TEST_SERVER_FLAGS:-$SHARED_GPU}"
            pids=()
            for m in "dense_as_sparse" "eager" "bf16"; do
                run "$part-$m" pytest_gpu "$SERVING" -m "$m" & pids+=($!)
            done
            run http pytest_gpu tests/serving/test_gpu_http_errors.py & pids+=($!)
            for pid in "${pids[@]}"; do wait "$pid" || status=1; done
            unset SALA_SGLANG_TEST_SERVER_FLAGS ;;
        # Every op on its CUDA kernel where one exists, also where Triton is the faster one.
        serving-cuda) SALA_SGLANG_KERNELS=cuda run "$part" pytest_gpu "$SERVING" \
                          -m "cuda_graph and not dense_as_sparse" ;;
        serving-segments) SALA_SGLANG_KERNELS=cuda SALA_SGLANG_SELECT_TILE=8 SALA_SGLANG_SELECT_SEGMENT=3 \
                              run "$part" pytest_gpu "$SERVING" -m "fp16 and cuda_graph and not dense_as_sparse" ;;
        prefix-cache)
            pids=()
            for m in "cuda_graph and not dense_as_sparse" "eager" "dense_as_sparse"; do
                run "$part-${m%% *}" pytest_gpu tests/serving/test_gpu_prefix_cache.py -m "$m" \
                    & pids+=($!)
            done
            for pid in "${pids[@]}"; do wait "$pid" || status=1; done ;;
        retraction) run "$part" pytest_gpu tests/serving/test_gpu_retraction.py ;;
        # The op suite and every served tiny-model module side by side on one GPU (SHARED_GPU):
        # one call of about 6-8 minutes.
        side-by-side)
            export SALA_SGLANG_TEST_SERVER_FLAGS="${SALA_SGLANG_TEST_SERVER_FLAGS:-$SHARED_GPU}"
            pids=()
            for p in ops prefix-cache serving-graph serving-parallel retraction aborts; do
                bash "$0" "$p" >"$out/$p.out" 2>&1 & pids+=($!)
            done
            for pid in "${pids[@]}"; do wait "$pid" || status=1; done
            cat "$out"/{ops,prefix-cache,serving-graph,serving-parallel,retraction,aborts}.out ;;
        aborts) run "$part" pytest_gpu tests/serving/test_gpu_aborts.py ;;
        # The op-error tests (a bad argument to a `_C` op must come back as a RuntimeError) with
        # this machine's `_C`, then, given PREBUILT_C (an .xz from scripts/prebuild_extension.sh),
        # with that one in its place (this machine's is put back after); first the compilers and
        # the C++ runtime this machine's build records and loads. ~1.5 minutes.
        op-errors)
            c++ --version | head -1; nvcc --version | tail -1
            so=$(python -c "import torch, sala_sglang._C as m; print(m.__file__)") \
                || { echo "=== $part FAILED: sala_sglang._C does not load"; status=1; continue; }
            readelf -p .comment "$so" | grep -v "^$\|String dump" | sort | uniq -c
            python -c "import torch, sala_sglang._C; print(sorted({l.split()[-1] for l in \
                open('/proc/self/maps').read().splitlines() if any(s in l for s in \
                ('stdc++', 'gcc_s', 'unwind', 'libc++'))}))"
            tests=(tests/ops/test_extension_errors.py
                   tests/ops/test_compress.py::test_cuda_op_names_the_bad_argument
                   tests/ops/test_lightning.py::test_cuda_decode_names_the_bad_argument)
            if ! run "$part-built-here" pytest_gpu "${tests[@]}"; then
                # Where the throw dies: the host-only op's step under cuda-gdb (the image's only
                # debugger), and what this machine built with, kept for reading elsewhere.
                python -c "import sysconfig as s; [print(v, '=', s.get_config_var(v)) for v in \
                    ('CC', 'CXX', 'CFLAGS', 'LDSHARED', 'LDFLAGS')]"
                # (pip's editable build may have compiled in a temporary folder it removed)
                find . /tmp -name build.ninja -path "*temp*" 2>/dev/null | head -1 | xargs -r grep -h \
                    "^cflags\|^post_cflags\|^cuda_post_cflags\|^ldflags"
                readelf -d "$so" | grep "NEEDED\|FLAGS"
                xz -c "$so" >"$out/_C-built-here.so.xz"
                PYTHONPATH=tests:tests/ops python -c "from test_extension_errors import PRELUDE, \
                    STEPS; print(PRELUDE + STEPS['host_op_raises'])" >"$out/host_op_raises.py"
                timeout 120 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt \
                    -ex "info sharedlibrary" -ex "x/8i \$pc" \
                    --args python "$out/host_op_raises.py" >"$out/$part-backtrace.log" 2>&1
                grep -A40 "SIGSEGV" "$out/$part-backtrace.log" | head -60
            fi
            if [ -n "${PREBUILT_C:-}" ]; then
                mv "$so" "$so.built-here"
                xz -dc "$PREBUILT_C" >"$so"
                run "$part-prebuilt" pytest_gpu "${tests[@]}"
                mv "$so.built-here" "$so"
            fi ;;
        # NGRAM chains (graph, eager, graph without the prefix cache) side by side, and the
        # verify/commit op tests
        speculative)
            export SALA_SGLANG_TEST_SERVER_FLAGS="${SALA_SGLANG_TEST_SERVER_FLAGS:-$SHARED_GPU}"
            pids=()
            for m in "cuda_graph and prefix_cache" "eager" "cuda_graph and not prefix_cache"; do
                name="$part-$(echo "$m" | tr -d ' ' | tr -c 'a-z_\n' '-')"
                run "$name" pytest_gpu tests/serving/test_gpu_speculative.py -m "$m" & pids+=($!)
            done
            run "$part-ops" pytest_gpu tests/ops/test_lightning_verify.py \
                tests/ops/test_lightning_commit.py & pids+=($!)
            for pid in "${pids[@]}"; do wait "$pid" || status=1; done
            unset SALA_SGLANG_TEST_SERVER_FLAGS ;;
        soak) run soak python benchmarks/soak.py --out "$out" ;;
        # Startup 160-185 s on a fresh machine, 270 s of requests, ~40 s of checks: ~8.5 min.
        # One part of the 30-minute soak (issue 20): its own tag and seed; soak_parts.py sums.
        # SOAK_MINUTES: a machine still warm from a call before starts the server faster (its
        # JIT caches are there), so a part there can send traffic longer.
        soak-real) run "$part" python benchmarks/soak.py --model sala --minutes "${SOAK_MINUTES:-4.5}" \
                       --force-retract-every 100 --part --out "$out" ;;
        # Decode attention at 128K, batch 1, 8 and 32: both kernels at 4-96 splits (CUDA-graph
        # replays) against the served plan; the data of the plan's decode rules. ~2 minutes.
        kernels-decode-attention) run "$part" python benchmarks/kernels/sparse_attention.py \
                                      --decode-attention-only --batches 1 8 32 \
                                      --tag kernels_decode_attention_splits --out "$out" ;;
        # Issue 17's points alone: TTFT at 128K and 256K, decode at 128K in a server for 256K
        # (one server start, two cold prefills; ~4 minutes).
        targets-256k) run "$part" long_context --model sala --lengths 131072 262144 \
                          --concurrency --tag long_context_sala_128k_256k ;;
        # Issue 17's decode point: 128K of context in a server started for 256K.
        profile) run profile python benchmarks/profile_decode.py --context 131072 \
                     --server-context 262144 --tag profile_decode_sala_128k_in_256k --out "$out" ;;
        # Where an NGRAM verify's extra time goes (issue 18: 1.62x a decode step at 128K when no
        # draft matches): the same sampled request profiled without speculation, then with
        # NGRAM T=4, two server starts, ~7 minutes.
        profile-verify)
            run "$part-plain" python benchmarks/profile_decode.py --context 131072 --sampled \
                --tag profile_decode_sampled_sala_128k --out "$out"
            run "$part-ngram4" python benchmarks/profile_decode.py --context 131072 --sampled \
                --server-args "--speculative-algorithm NGRAM --speculative-num-draft-tokens 4" \
                --tag profile_verify_ngram4_sala_128k --out "$out" ;;
        # One server start (160-185 s on a fresh machine), each context's cold prefill (8.7,
        # 31.6 and 75-88 s at 128K, 512K and 1M by the long-context sweeps), then per context one
        # 8192-token chunk over the cached prefix (under 2 s) and its trace (a few seconds):
        # ~5.5 minutes, ~6.5 with 36-54 s of machine setup, so all three fit one call.
        profile-prefill) run "$part" python benchmarks/profile_prefill.py --out "$out" ;;
        # One server for both: SALA's startup (graph capture, Triton JIT) is 80-190 s.
        sweep-sala-short) run "$part" long_context --model sala --lengths 32768 65536 131072 262144 \
                              --concurrency 8 0 --serving-prompts 16 \
                              --tag long_context_sala_32k_to_256k ;;
        sweep-sala-long) run "$part" long_context --model sala --lengths 524288 1048576 \
                             --concurrency --tag long_context_sala_512k_1m ;;
        # 1M served without the prefix cache, then with 16384-token chunks: what SGLang's radix
        # cache costs between chunks (benchmarks/radix_cache_chunks.py), beside sweep-sala-long's
        # 1M point; one server each, ~5 minutes a part.
        sweep-1m-no-radix-cache) run "$part" long_context --model sala --lengths 1048576 \
                                     --concurrency --server-args=--disable-radix-cache \
                                     --tag long_context_sala_1m_no_radix_cache ;;
        sweep-1m-chunk16k) run "$part" long_context --model sala --lengths 1048576 --concurrency \
                               "--server-args=--chunked-prefill-size 16384" \
                               --tag long_context_sala_1m_chunk16k ;;
        sweep-dense) run "$part" long_context "${DENSE[@]}" --lengths 32768 65536 131072 262144 \
                         524288 --concurrency --tag long_context_qwen3-8b_flashinfer ;;
        # Both models at 64K-256K on one machine, for ratios from one run; together they overrun
        # one 10-minute call, so run them back to back while the machine is held (see
        # benchmarks/NOTES.md).
        compare-sala) run "$part" long_context --model sala --lengths 65536 131072 262144 \
                          --concurrency --tag long_context_compare_sala ;;
        compare-dense) run "$part" long_context "${DENSE[@]}" --lengths 65536 131072 262144 \
                           --concurrency --tag long_context_compare_qwen3-8b ;;
        serving-dense) run "$part" long_context "${DENSE[@]}" --lengths --concurrency 8 0 \
                           --serving-prompts 16 --tag long_context_qwen3-8b_serving ;;
        # The SOAR-style score (issue 17), each part one server and some of the set's three
        # bench_serving runs, results summed across parts. Estimates from the batch-1 TTFTs and
        # decode rates (benchmarks/NOTES.md, 2026-12-07): SALA's whole set is ~130 s of prefill
        # and ~80 s of decode at concurrency 1, ~150 s at 8 and unlimited, so with a server start
        # (110-185 s) it takes two calls. The comparison with the dense shape caps inputs at
        # 256K and takes a quarter of the set (8 requests, two of them 256K): the dense model's
        # prefill is ~150 s at each level (61 s for one 256K prompt), so two levels in one call
        # (one server start, ~60 s) and the third beside SALA's three in the next.
        soar-sala-a) run "$part" long_context --workload soar --soar-concurrency 1 \
                         --tag soar_sala_c1 ;;
        soar-sala-b) run "$part" long_context --workload soar --soar-concurrency 8 0 \
                         --tag soar_sala_c8_unlimited ;;
        soar-cmp-sala) run "$part" long_context --workload soar --soar-max-input 262144 \
                           --soar-scale 0.25 --tag soar_cmp_sala ;;
        soar-cmp-dense-a) run "$part" long_context "${DENSE[@]}" --workload soar \
                              --soar-max-input 262144 --soar-scale 0.25 --soar-concurrency 1 8 \
                              --tag soar_cmp_qwen3-8b_c1_c8 ;;
        soar-cmp-dense-b) run "$part" long_context "${DENSE[@]}" --workload soar \
                              --soar-max-input 262144 --soar-scale 0.25 --soar-concurrency 0 \
                              --tag soar_cmp_qwen3-8b_unlimited ;;
        # Two server starts (the first 159-183 s on a fresh machine) leave each part ~5 minutes
        # of requests. The server without the cache gets turn 2 only, a cold prefill of the whole
        # conversation (75 s at 1M): turn 1 is a cold prefill with the cache too, and turns 3-4
        # only add ~1.3K tokens each to a prompt of 128K or more.
        prefix-bench-a) run "$part" long_context --workload multiturn --lengths 131072 524288 \
                            --no-cache-turns 2 --concurrency 0 --tag prefix_cache_sala_128k_512k ;;
        prefix-bench-b) run "$part" long_context --workload multiturn --lengths 1048576 \
                            --no-cache-turns 2 --concurrency --tag prefix_cache_sala_1m ;;
        # Three server starts (the first 160-185 s on a fresh machine, later ones nearer 110 s)
        # leave ~3 minutes for 2 warm-ups and 4 measured requests per server: 512 tokens each
        # (~5 s of decode) rather than 1024.
        spec-bench) run "$part" long_context --workload speculative --lengths 32768 131072 \
                        --draft-tokens 4 8 --decode-tokens 512 --concurrency \
                        --tag speculative_sala_32k_128k ;;
        # The headline pair alone (issue 18: never-matching within 5%, repeating >= 1.8x): 128K,
        # T = 4, against the plain server; two server starts, ~6 minutes.
        spec-bench-128k) run "$part" long_context --workload speculative --lengths 131072 \
                             --draft-tokens 4 --decode-tokens 512 --concurrency \
                             --tag speculative_sala_128k_t4 ;;
        # Draft depths 1-8 (issue 18): a verify step's cost over a plain decode step, measured
        # on the repeating workload alone (its steps verify; never-matching ones run as plain
        # decode steps) at 32K, 256 tokens, so that four server starts fit one call; the plain
        # server starts in each part for ratios from one run.
        spec-sweep-a|spec-sweep-b)
            if [ "$part" = spec-sweep-a ]; then depths=(2 3 5); else depths=(6 7 9); fi
            run "$part" long_context --workload speculative --spec-workloads repeating \
                --lengths 32768 --draft-tokens "${depths[@]}" --decode-tokens 256 --concurrency \
                --tag "speculative_sala_depths_${part#spec-sweep-}" ;;
        # The four two-GPU modes in two halves side by side on both GPUs (SHARED_GPU pools), each
        # half two server starts one after the other: tp2_graph and dp2_graph; tp2_eager and
        # tp2_graph_dense_as_sparse. One tiny mode alone took 170-197 s with its server's start
        # on one GPU, so a half ~5.5 minutes, ~6.5 with machine setup. Should two servers side
        # by side not start, run each half (its -m) alone: one call each.
        two-gpus)
            export SALA_SGLANG_TEST_SERVER_FLAGS="${SALA_SGLANG_TEST_SERVER_FLAGS:-$SHARED_GPU}"
            pids=()
            for m in "cuda_graph and not dense_as_sparse" "eager or dense_as_sparse"; do
                name="$part-$(echo "$m" | tr -d ' ' | tr -c 'a-z_\n' '-')"
                run "$name" pytest_gpu "$TWO_GPUS" -m "$m" & pids+=($!)
            done
            for pid in "${pids[@]}"; do wait "$pid" || status=1; done
            unset SALA_SGLANG_TEST_SERVER_FLAGS ;;
        # Real config, two servers one after the other, the two-GPU one first. A start is ~170 s
        # on a fresh machine and TP 2's per-GPU head counts compile kernels of their own, so
        # TP 1's start is cold too; --disable-prefill-cuda-graph, on both, takes ~25 s off each
        # without moving TTFT (benchmarks/NOTES.md, calls 19-20). TP 2: ~160 s start (NCCL and
        # the all-reduce's setup on top), ~75 s of requests if its 1M prefill takes about half
        # of TP 1's; TP 1: ~135 s start, ~120 s of requests (prefills 8.7, 12.9 and 75-88 s, 256
        # decode tokens each): ~9-9.5 minutes with 36-54 s of machine setup, a tight fit. A run
        # cut short keeps TP 2's points and TP 1's before the cut (1M comes last).
        two-gpus-bench-tp) run "$part" python benchmarks/two_gpus.py --parts tp --out "$out" \
                               --server-args=--disable-prefill-cuda-graph ;;
        # DP 2 (~140 s start, both replicas compiling at once; two warm-ups; bench_serving ~35 s
        # at concurrency 8 and ~30 s unlimited, 8 prompts a replica) then one replica (~60 s
        # start on the kernels DP 2 compiled; ~60 and ~55 s as in the serving sweep): ~7.5
        # minutes with machine setup.
        two-gpus-bench-dp) run "$part" python benchmarks/two_gpus.py --parts dp --out "$out" \
                               --server-args=--disable-prefill-cuda-graph ;;
        *) echo "unknown part: $part (ops, http, serving-graph, serving-other, prefix-cache, retraction, aborts, op-errors, soak, soak-real, profile, profile-verify," \
                "profile-prefill," \
                "sweep-sala-short, sweep-sala-long, sweep-1m-no-radix-cache, sweep-1m-chunk16k, sweep-dense, serving-dense, compare-sala," \
                "compare-dense, serving-cuda, serving-segments, prefix-bench-a, prefix-bench-b, spec-bench," \
                "spec-bench-128k," \
                "spec-sweep-a, spec-sweep-b," \
                "soar-sala-a, soar-sala-b, soar-cmp-sala, soar-cmp-dense-a, soar-cmp-dense-b," \
                "two-gpus, two-gpus-bench-tp, two-gpus-bench-dp)"
           exit 2 ;;
    esac
done
exit "$status"
