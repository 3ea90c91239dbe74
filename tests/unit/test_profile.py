"""The profile scripts' pure parts on synthetic Chrome traces: which kind each kernel is, a
chunk's span, busy and idle time, the GEMM rate, and the decode summary as it was."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from pathlib import Path

import pytest

from benchmarks import profile_decode
from benchmarks import profile_prefill as pp
from sala_sglang.bench import MODELS

ROOT = Path(__file__).resolve().parents[2]


def kernel(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


# Names as the H100 traces show them (benchmarks/results/profile_decode_*.json), and each of our
# kernels as sala_sglang/ops and csrc define it.
NAMES = {
    "gemm": ["nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1",
             "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6>",
             "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>"],
    "lightning": ["_prefill_kernel", "_segment_kv_kernel", "_segment_scan_kernel",
                  "void (anonymous namespace)::lightning_decode_kernel<128, c10::BFloat16>("
                  "(anonymous namespace)::TokenRows<c10::BFloat16>)"],
    "compression": ["_compress_kernel",
                    "void (anonymous namespace)::compress_kernel<__nv_bfloat16, 128>("
                    "(anonymous namespace)::Args<__nv_bfloat16>)"],
    "selection": ["_stage1_stats_kernel", "_window_probs_kernel", "_block_topk_kernel",
                  "_merge_topk_kernel",
                  "void (anonymous namespace)::select_blocks_tiled_kernel<__nv_bfloat16, 8>()"],
    "sparse_attention": ["_block_attention_kernel",
                         "void (anonymous namespace)::block_sparse_attention_kernel<128>("
                         "const Params)",
                         "void (anonymous namespace)::merge_splits_kernel<__nv_bfloat16>()"],
    "norms_elementwise": [
        "void flashinfer::norm::FusedAddRMSNormKernel<8u, __nv_bfloat16>(__nv_bfloat16*)",
        "void flashinfer::norm::RMSNormKernel<8u, __nv_bfloat16>(__nv_bfloat16*)",
        "void (anonymous namespace)::fused_rope_kernel<true, 128l, true, __nv_bfloat16>()",
        "_qk_norm_rope_kernel",
        "void (anonymous namespace)::act_and_mul_kernel<__nv_bfloat16, 0, true, false>()",
        "void at::native::vectorized_elementwise_kernel<8, at::native::sigmoid_kernel_cuda>()",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>>()",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::OpaqueType<2>>()",
        "triton_poi_fused_add_mul_sigmoid_0"],
    "memcpy_memset": ["Memcpy HtoD (Pageable -> Device)", "Memset (Device)"],
    "other": ["write_req_to_token_pool_triton", "some_new_kernel"],
}


@pytest.mark.parametrize("kind, name", [(k, n) for k, names in NAMES.items() for n in names])
def test_each_kernel_name_is_filed_under_its_kind(kind: str, name: str) -> None:
    assert pp.classify(name) == kind


def test_every_kind_has_a_pattern_and_other_takes_the_rest() -> None:
    assert [kind for kind, _ in pp.KINDS][-1] == "other"
    assert {kind for kind, _ in pp.KINDS} == set(NAMES)
    for _, pattern in pp.KINDS:
        re.compile(pattern)


def _chunk_trace() -> list[dict]:
    """One chunk: 1000 us of GEMM at 0, two lightning kernels, a selection kernel overlapping
    the second (another stream), an RMSNorm, a memcpy; gaps of 100 and 50 us; then events that
    are no GPU work (a CPU op, a runtime call, an instant event)."""
    return [
        kernel("Memcpy HtoD (Pageable -> Device)", 0, 10, cat="gpu_memcpy"),
        kernel("nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT", 10, 1000),
        kernel("_prefill_kernel", 1110, 200),  # 100 us gap after the GEMM
        kernel("_prefill_kernel", 1310, 200),
        kernel("_stage1_stats_kernel", 1410, 100),  # inside the second _prefill_kernel
        kernel("void flashinfer::norm::RMSNormKernel<8u, __nv_bfloat16>()", 1560, 40),  # gap 50
        kernel("aten::mm", 0, 3000, cat="cpu_op"),
        kernel("cudaLaunchKernel", 5, 3, cat="cuda_runtime"),
        {"ph": "i", "cat": "kernel", "name": "nvjet_x", "ts": 5},
    ]


def test_chunk_summary_sums_each_kind_with_its_calls_and_share_of_the_span() -> None:
    s = pp.chunk_summary(_chunk_trace(), tokens=8192, matmul_params=10**9)
    assert s["gpu_events"] == 6
    kinds = s["kinds"]
    assert kinds["gemm"]["ms"] == 1.0 and kinds["gemm"]["calls"] == 1
    assert kinds["lightning"] == {"ms": 0.4, "share": 0.25, "calls": 2,
                                  "top": [{"name": "_prefill_kernel", "ms": 0.4, "calls": 2}]}
    assert kinds["selection"]["ms"] == 0.1 and kinds["norms_elementwise"]["ms"] == 0.04
    assert kinds["memcpy_memset"]["calls"] == 1
    assert kinds["other"] == {"ms": 0.0, "share": 0.0, "calls": 0, "top": []}
    assert kinds["gemm"]["share"] == 1000 / 1600


def test_idle_is_the_span_less_the_time_anything_runs() -> None:
    s = pp.chunk_summary(_chunk_trace(), tokens=8192, matmul_params=10**9)
    assert s["span_ms"] == 1.6  # the memcpy's start to the norm's end
    assert s["gpu_busy_ms"] == 1.45  # the selection kernel runs inside a lightning one: once
    assert s["idle_ms"] == 0.15 and s["busy_fraction"] == round(1.45 / 1.6, 4)
    assert s["overlap_ms"] == 0.1
    assert pp.busy_us([kernel("a", 0, 10), kernel("b", 2, 3), kernel("c", 8, 4)]) == 12


def test_largest_gaps_name_the_kernels_either_side() -> None:
    s = pp.chunk_summary(_chunk_trace(), tokens=8192, matmul_params=10**9)
    assert s["largest_gaps"] == [
        {"ms": 0.1, "after": "nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT", "before": "_prefill_kernel"},
        # the gap follows the kernel that ended last, not the one that started last
        {"ms": 0.05, "after": "_prefill_kernel",
         "before": "void flashinfer::norm::RMSNormKernel<8u, __nv_bfloat16>()"},
    ]


def test_gemm_rate_is_the_chunk_matmul_flops_over_the_gemm_time() -> None:
    params = MODELS["sala"].matmul_params()
    assert pp.gemm_tflops(8192, params, 250.0) == pytest.approx(2 * 8192 * params / 0.25 / 1e12)
    s = pp.chunk_summary(_chunk_trace(), tokens=8192, matmul_params=10**9)
    assert s["gemm_tflop"] == round(2 * 8192 * 1e9 / 1e12, 2)
    assert s["gemm_tflops"] == round(2 * 8192 * 1e9 / 1e-3 / 1e12, 1)  # over 1 ms of GEMM


def test_a_trace_without_gpu_work_is_an_error() -> None:
    assert "error" in pp.chunk_summary(_chunk_trace()[-3:], tokens=8192, matmul_params=1)


def test_decode_summary_is_unchanged() -> None:
    """profile_decode.kernel_summary's output on this trace before the trace helpers were shared
    with profile_prefill."""
    events = [kernel("cudaGraphLaunch", 0, 3, cat="cuda_runtime"),
              kernel("cudaGraphLaunch", 1000, 3, cat="cuda_runtime"),
              kernel("aten::mm", 0, 50, cat="cpu_op"),
              kernel("Memcpy HtoD (Pageable -> Device)", 5, 7, cat="gpu_memcpy"),
              {"name": "nvjet_gemm", "cat": "kernel", "ph": "i", "ts": 5}]
    for step in (0, 1000):
        events += [kernel("nvjet_a", step + 10, 120.5), kernel("rmsnorm", step + 140, 8.25),
                   kernel("rmsnorm", step + 150, 8.25),
                   kernel("_block_attention_kernel", step + 160, 30),
                   kernel("x" * 200, step + 200, 1)]
    assert profile_decode.kernel_summary(events) == {
        "steps": 2, "kernels_per_step": 5.0, "gpu_busy_ms_per_step": 0.168,
        "span_ms_per_step": 0.596, "busy_fraction": 0.282,
        "top_kernels": [
            {"name": "nvjet_a", "calls_per_step": 1.0, "ms_per_step": 0.1205, "mean_us": 120.5},
            {"name": "_block_attention_kernel", "calls_per_step": 1.0, "ms_per_step": 0.03,
             "mean_us": 30.0},
            {"name": "rmsnorm", "calls_per_step": 2.0, "ms_per_step": 0.0165, "mean_us": 8.25},
            {"name": "x" * 160, "calls_per_step": 1.0, "ms_per_step": 0.001, "mean_us": 1.0},
        ],
    }
    assert [k["name"] for k in profile_decode.kernel_summary(events, top=2)["top_kernels"]] == [
        "nvjet_a", "_block_attention_kernel"]


class _FakeServer:
    """What extend_cached_prefix sends, in order; the second request's prefix hit as given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cached_tokens: int) -> None:
        self.calls: list[tuple] = []

        def stream_one(url: str, ids: list[int], new_tokens: int, keep_output: bool = False):
            self.calls.append(("generate", len(ids), new_tokens))
            out = {"ttft_s": 1.5}
            if keep_output:
                out.update(output_ids=[7], cached_tokens=cached_tokens)
            return out

        class Reply:
            def raise_for_status(self) -> None:
                pass

        monkeypatch.setattr(pp, "stream_one", stream_one)
        monkeypatch.setattr(pp, "flush_cache", lambda url: self.calls.append(("flush",)))
        monkeypatch.setattr(pp, "start_profile", lambda url, folder, **options: self.calls.append(
            ("start_profile", folder.name, options)))
        monkeypatch.setattr(pp.requests, "post", lambda url, **kw: self.calls.append(
            ("post", url.rsplit("/", 1)[1])) or Reply())
        monkeypatch.setattr(pp, "wait_for_trace", lambda folder: folder)
        monkeypatch.setattr(pp, "load_events", lambda path: _chunk_trace())


def test_one_chunk_is_profiled_over_the_cached_context(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    server = _FakeServer(monkeypatch, cached_tokens=4096)
    row = pp.extend_cached_prefix("http://x", 4096, 8192, 10**9, tmp_path)
    assert server.calls == [
        ("flush",),
        ("generate", 4096, 1),
        ("start_profile", "4096", {"activities": ["CPU", "GPU"], "with_stack": False,
                                   "record_shapes": False}),
        ("generate", 4096 + 8192, 1),
        ("post", "stop_profile"),
    ]
    assert row["cached_tokens"] == 4096 and row["chunk"]["tokens"] == 8192
    assert "error" not in row


def test_a_prefix_miss_is_an_error_not_a_profile(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    _FakeServer(monkeypatch, cached_tokens=0)
    row = pp.extend_cached_prefix("http://x", 4096, 8192, 10**9, tmp_path)
    assert "cached_tokens 0, expected 4096" in row["error"] and "chunk" not in row


def test_the_warm_up_runs_without_the_profiler(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _FakeServer(monkeypatch, cached_tokens=4096)
    row = pp.extend_cached_prefix("http://x", 4096, 8192, 10**9, None)
    assert [c[0] for c in server.calls] == ["flush", "generate", "generate"]
    assert "chunk" not in row and "error" not in row


def test_contexts_are_whole_pages_and_the_chunk_is_the_servers() -> None:
    assert pp.parse_args([]).contexts == [131072, 524288, 1048576]
    with pytest.raises(SystemExit):
        pp.parse_args(["--contexts", "131072", "1000"])
    assert pp.chunk_tokens(list(pp.COMMON_FLAGS)) == 8192
    assert pp.chunk_tokens([*pp.COMMON_FLAGS, "--chunked-prefill-size=4096"]) == 4096
    later = ["--chunked-prefill-size=4096", "--chunked-prefill-size", "2048"]
    assert pp.chunk_tokens(later) == 2048


def test_context_labels() -> None:
    assert [pp.label(n) for n in (131072, 524288, 1048576, 8192 + 64)] == [
        "128K", "512K", "1M", "8256"]


def test_the_gpu_checks_part_runs_the_default_contexts() -> None:
    script = (ROOT / "scripts" / "gpu_checks.sh").read_text()
    line = re.search(r"profile-prefill\) run \"\$part\" python benchmarks/profile_prefill.py"
                     r" (.*?);;", script)
    args = pp.parse_args(shlex.split(line.group(1).replace('"$out"', "out")))
    assert args.contexts == pp.DEFAULT_CONTEXTS and args.out == Path("out")
    assert "profile-prefill" in script.split("set -uo pipefail")[0]  # the header lists it
    assert re.search(r"unknown part: .*profile-prefill", script, re.S)


def test_table_has_a_line_per_kind_and_a_column_per_profiled_context() -> None:
    summary = pp.chunk_summary(_chunk_trace(), tokens=8192, matmul_params=10**9)
    rows = [{"context": 131072, "chunk": summary}, {"context": 524288, "error": "a miss"},
            {"context": 1048576, "chunk": summary}]
    lines = pp.table(rows).splitlines()
    assert lines[0].split() == ["128K", "1M"]
    assert [line.split()[0] for line in lines[1:]] == [
        *(kind for kind, _ in pp.KINDS), "idle", "span", "gemm"]
    assert lines[1].split() == ["lightning", "0.4", "ms", "25%", "0.4", "ms", "25%"]


def _fake_run(monkeypatch: pytest.MonkeyPatch, warmup_error: str | None) -> list[tuple]:
    """main() with a served() that starts nothing and an extend_cached_prefix that answers a
    profiled row for each context (the warm-up's row carries warmup_error, if given)."""
    sent = []

    @contextlib.contextmanager
    def served(model_dir, log_path, flags, info, keep_log):
        info["startup_s"] = 1.0
        yield type("S", (), {"url": "http://x", "alive": lambda self: True})()

    def extend(url, context, chunk, matmul_params, traces):
        sent.append((context, chunk, traces is not None))
        if traces is None:
            return {"context": context, **({"error": warmup_error} if warmup_error else {})}
        summary = pp.chunk_summary(_chunk_trace(), chunk, matmul_params)
        return {"context": context, "cached_tokens": context, "chunk": summary}

    monkeypatch.setattr(pp, "served", served)
    monkeypatch.setattr(pp, "extend_cached_prefix", extend)
    return sent


def test_main_warms_up_then_profiles_each_context_into_one_result(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sent = _fake_run(monkeypatch, warmup_error=None)
    assert pp.main(["--contexts", "131072", "1048576", "--out", str(tmp_path)]) == 0
    assert sent == [(pp.WARMUP_TOKENS, 8192, False), (131072, 8192, True), (1048576, 8192, True)]
    [path] = tmp_path.glob("profile_prefill_sala_*.json")
    record = json.loads(path.read_text())
    assert [r["context"] for r in record["rows"]] == [131072, 1048576]
    assert record["chunk_tokens"] == 8192 and record["kind_patterns"] == dict(pp.KINDS)
    i = record["server_flags"].index("--context-length")
    assert record["server_flags"][i + 1] == str(1048576 + 8192 + 64)
    assert "[profile] 1M: span_ms 1.6" in capsys.readouterr().out


def test_a_warm_up_miss_stops_before_any_context(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    sent = _fake_run(monkeypatch, warmup_error="cached_tokens 0, expected 16384")
    with pytest.raises(RuntimeError, match="warm-up"):
        pp.main(["--out", str(tmp_path)])
    assert len(sent) == 1
    [path] = tmp_path.glob("profile_prefill_sala_*.json")
    assert json.loads(path.read_text())["warmup"]["error"] == "cached_tokens 0, expected 16384"


@pytest.mark.parametrize("argv, sampling, speculative, context_length", [
    ([], None, False, 8192 + 64 + 4 * 32 + 64),
    (["--sampled", "--server-args",
      "--speculative-algorithm NGRAM --speculative-num-draft-tokens 4"],
     {"temperature": 1.0, "top_k": -1, "top_p": 1.0}, True, 8448),
    (["--server-context", "262144"], None, False, 262144),
    (["--server-context", "4096"], None, False, 8448),  # never below what the request needs
], ids=["greedy_plain", "sampled_ngram", "server_for_256k", "server_context_too_small"])
def test_profile_decode_sends_the_profiled_request_as_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str], sampling: dict | None,
    speculative: bool, context_length: int,
) -> None:
    """--sampled samples the profiled request at temperature 1 (the warm-up stays greedy), and a
    server with speculation counts its decode rate in tokens; --server-context starts the server
    for more tokens than the request needs; the record says which."""
    sent: list[tuple[int, dict | None, bool]] = []

    class FakeServer:
        url = "http://x"

        def __init__(self, *args, **kwargs) -> None:
            pass

        def wait_ready(self) -> None:
            pass

        def stop(self) -> None:
            pass

        def tail(self, n: int) -> str:
            return ""

    def stream_one(url, ids, new_tokens, sampling=None, speculative=False, first_token=None):
        sent.append((len(ids), sampling, speculative))
        if first_token is not None:
            first_token.set()
        return {"decode_tok_per_s": 1.0}

    monkeypatch.setattr(profile_decode, "Server", FakeServer)
    monkeypatch.setattr(profile_decode, "prepare_model_dir", lambda shape, work: (work, work))
    monkeypatch.setattr(profile_decode, "stream_one", stream_one)
    monkeypatch.setattr(profile_decode, "start_profile", lambda *a, **k: None)
    monkeypatch.setattr(profile_decode, "wait_for_trace", lambda traces: traces)
    monkeypatch.setattr(profile_decode, "load_events", lambda path: [])
    monkeypatch.setattr(profile_decode, "kernel_summary", lambda events: {"steps": 1})
    assert profile_decode.main(["--context", "8192", "--out", str(tmp_path), *argv]) == 0
    assert sent == [(4096, None, False), (8192, sampling, speculative)]
    record = json.loads(next(tmp_path.glob("profile_decode_sala_*.json")).read_text())
    assert record["sampling"] == (sampling or "greedy")
    flags = record["server_flags"]
    assert flags[flags.index("--context-length") + 1] == str(context_length)
