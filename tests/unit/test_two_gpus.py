"""benchmarks/two_gpus.py without a GPU: its ratios, each part's two servers against faked ones
(flags, visible GPUs, warm-ups, the record), its parts in scripts/gpu_checks.sh, and its
servers' flags through SGLang's parser and the plugin's startup checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import two_gpus
from benchmarks.two_gpus import DP_METRICS, NVLINK_MULTICAST_OFF, PARTS, TP_METRICS, ratios
from sala_sglang.bench import MODELS, WARMUP_TOKENS, prepare_model_dir, server_flags

ROOT = Path(__file__).resolve().parents[2]


def test_ratios_pair_rows_of_the_same_key_where_both_servers_measured() -> None:
    rows = [
        {"server": "tp2", "input_tokens": 1, "ttft_s": 1.0, "decode_tok_per_s": 150.0},
        {"server": "tp2", "input_tokens": 2, "ttft_s": 3.0, "decode_tok_per_s": 120.0},
        {"server": "tp2", "input_tokens": 3, "error": "HTTP 500: ..."},
        {"server": "tp2", "input_tokens": 4, "ttft_s": 2.0, "decode_tok_per_s": None},
        {"server": "tp1", "input_tokens": 1, "ttft_s": 2.0, "decode_tok_per_s": 100.0},
        {"server": "tp1", "input_tokens": 3, "ttft_s": 9.0, "decode_tok_per_s": 90.0},
        {"server": "tp1", "input_tokens": 4, "ttft_s": 3.0, "decode_tok_per_s": 80.0},
    ]
    # 2: not measured on tp1; 3: failed on tp2; 4: no decode rate on tp2
    assert ratios(rows, "input_tokens", TP_METRICS, "tp2", "tp1") == [
        {"input_tokens": 1, "ttft_s_tp2_over_tp1": 0.5, "decode_tok_per_s_tp2_over_tp1": 1.5},
        {"input_tokens": 4, "ttft_s_tp2_over_tp1": 0.667},
    ]
    serving = [{"server": "dp2", "max_concurrency": 0, "duration": 30.0},
               {"server": "dp2", "max_concurrency": 8, "duration": 40.0},
               {"server": "dp1", "max_concurrency": 8, "duration": 60.0},
               {"server": "dp1", "max_concurrency": 0, "duration": 55.0}]
    assert ratios(serving, "max_concurrency", DP_METRICS, "dp2", "dp1") == [
        {"max_concurrency": 0, "duration_dp2_over_dp1": 0.545},
        {"max_concurrency": 8, "duration_dp2_over_dp1": 0.667},
    ]


@pytest.mark.parametrize("before", [None, "0,1"])
def test_gpus_visible_sets_the_variable_for_the_block_only(
    monkeypatch: pytest.MonkeyPatch, before: str | None,
) -> None:
    if before is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", before)
    with two_gpus.gpus_visible("0"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    with two_gpus.gpus_visible(None):
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == before


class _FakeServers:
    """`served`, `stream_one`, `server_state` and `bench_serving` of the benchmark, faked: the
    two-GPU servers ("tp2", "dp2") twice as fast as the others. Keeps each server's start
    (flags, CUDA_VISIBLE_DEVICES, the multicast variables) and every request."""

    def __init__(self) -> None:
        self.starts: list[dict] = []
        self.requests: list[tuple[str, int, int]] = []
        self.serving: list[tuple[str, list[str], int, int]] = []

    @staticmethod
    def _speed(url: str) -> float:
        return 2.0 if url.endswith("2") else 1.0

    @contextlib.contextmanager
    def served(self, model_dir, log_path, flags, info, keep_log) -> Iterator[SimpleNamespace]:
        name = log_path.stem.removeprefix("server_")
        self.starts.append({"name": name, "flags": flags,
                            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "multicast": {k: os.environ.get(k) for k in NVLINK_MULTICAST_OFF}})
        info["startup_s"] = 1.0
        yield SimpleNamespace(url=f"http://{name}", alive=lambda: True)

    def stream_one(self, url: str, ids: list[int], new_tokens: int, **kwargs) -> dict:
        self.requests.append((url.removeprefix("http://"), len(ids), new_tokens))
        speed = self._speed(url)
        return {"ttft_s": len(ids) / 1000 / speed, "decode_tok_per_s": 100 * speed,
                "streamed_chunks": new_tokens}

    def server_state(self, url: str, *keys: str) -> dict:
        name = url.removeprefix("http://")
        return {"tp_size": 2 if name == "tp2" else 1, "dp_size": 2 if name == "dp2" else 1}

    def bench_serving(self, url, tokenizer, dataset, prompts, concurrency, work) -> dict:
        self.serving.append((url.removeprefix("http://"), dataset, prompts, concurrency))
        speed = self._speed(url)
        return {"command": ["bench_serving", *dataset], "completed": prompts,
                "duration": 60 / speed, "output_throughput": 40.0 * speed}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> _FakeServers:
    """The fakes in place, two GPUs "visible", and this process's environment a copy that main()
    may change."""
    servers = _FakeServers()
    for name in ("served", "stream_one", "server_state", "bench_serving"):
        monkeypatch.setattr(two_gpus, name, getattr(servers, name))
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("CUDA_VISIBLE_DEVICES",
                                                     *NVLINK_MULTICAST_OFF)})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"GPU {i}")
    monkeypatch.setattr(two_gpus.signal, "signal", lambda *a: None)
    monkeypatch.setattr(two_gpus.importlib.util, "find_spec", lambda name: object())
    return servers


def _record(out: Path) -> dict:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def test_tp_part_measures_each_length_at_tp2_then_at_tp1_on_gpu_0_alone(
    fake: _FakeServers, tmp_path: Path,
) -> None:
    assert two_gpus.main(["--parts", "tp", "--lengths", "4096", "8192", "--decode-tokens", "8",
                          "--out", str(tmp_path)]) == 0
    tp2, tp1 = fake.starts
    assert (tp2["name"], tp1["name"]) == ("tp2", "tp1")
    assert tp2["flags"] == [*tp1["flags"], "--tp-size", "2"]
    assert (tp2["visible"], tp1["visible"]) == (None, "0")
    assert tp2["multicast"] == tp1["multicast"] == NVLINK_MULTICAST_OFF
    context = int(tp1["flags"][tp1["flags"].index("--context-length") + 1])
    assert context >= 8192 + 8
    # a warm-up, then the lengths, the same on both servers
    assert fake.requests == [(name, n, tokens) for name in ("tp2", "tp1")
                             for n, tokens in ((WARMUP_TOKENS, 16), (4096, 8), (8192, 8))]

    record = _record(tmp_path)
    assert record["benchmark"] == "two_gpus" and record["tag"] == "two_gpus_tp"
    assert record["gpus"] == ["GPU 0", "GPU 1"]
    assert record["nvlink_multicast_off"] == NVLINK_MULTICAST_OFF
    assert record["servers"]["tp1"]["cuda_visible_devices"] == "0"
    assert (record["servers"]["tp2"]["tp_size"], record["servers"]["tp1"]["tp_size"]) == (2, 1)
    assert [(r["server"], r["input_tokens"]) for r in record["batch1"]] == [
        (name, n) for name in ("tp2", "tp1") for n in (4096, 8192)]
    assert record["tp2_over_tp1"] == [
        {"input_tokens": n, "ttft_s_tp2_over_tp1": 0.5, "decode_tok_per_s_tp2_over_tp1": 2.0}
        for n in (4096, 8192)]
    assert "bench_serving" not in record and "dp2_over_dp1" not in record


def test_dp_part_runs_bench_serving_on_two_replicas_then_on_one(
    fake: _FakeServers, tmp_path: Path,
) -> None:
    assert two_gpus.main(["--parts", "dp", "--out", str(tmp_path)]) == 0
    dp2, dp1 = fake.starts
    assert dp2["flags"] == [*dp1["flags"], "--dp-size", "2"]
    assert (dp2["visible"], dp1["visible"]) == (None, "0")
    context = int(dp1["flags"][dp1["flags"].index("--context-length") + 1])
    assert context >= 131072 + 256
    # round robin: one warm-up per replica
    assert fake.requests == [("dp2", WARMUP_TOKENS, 16)] * 2 + [("dp1", WARMUP_TOKENS, 16)]
    assert [(name, prompts, conc) for name, _, prompts, conc in fake.serving] == [
        ("dp2", 16, 8), ("dp2", 16, 0), ("dp1", 16, 8), ("dp1", 16, 0)]
    dataset = fake.serving[0][1]
    assert len({tuple(d) for _, d, _, _ in fake.serving}) == 1  # the same prompts on both
    assert dataset[dataset.index("--random-input-len") + 1] == "131072"
    assert dataset[dataset.index("--random-range-ratio") + 1] == "0.25"  # 32K-128K

    record = _record(tmp_path)
    assert record["tag"] == "two_gpus_dp" and "batch1" not in record
    assert [(r["server"], r["max_concurrency"]) for r in record["bench_serving"]] == [
        ("dp2", 8), ("dp2", 0), ("dp1", 8), ("dp1", 0)]
    assert record["dp2_over_dp1"] == [
        {"max_concurrency": c, "duration_dp2_over_dp1": 0.5,
         "output_throughput_dp2_over_dp1": 2.0} for c in (8, 0)]


def test_fewer_than_two_gpus_or_no_datasets_are_refused_before_a_server_starts(
    fake: _FakeServers, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert two_gpus.main(["--parts", "tp"]) == 2
    assert "1 CUDA GPUs visible" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(two_gpus.importlib.util, "find_spec", lambda name: None)
    assert two_gpus.main(["--parts", "tp", "dp"]) == 2
    assert "`datasets`" in capsys.readouterr().err
    assert fake.starts == []


def test_gpu_checks_turns_multicast_off_and_its_parts_parse() -> None:
    script = (ROOT / "scripts" / "gpu_checks.sh").read_text()
    exported = dict(re.findall(r"\b([A-Z_]+)=(\S+)",
                               " ".join(re.findall(r"^export (.*)$", script, re.M))))
    assert {k: exported.get(k) for k in NVLINK_MULTICAST_OFF} == NVLINK_MULTICAST_OFF
    for part, parts in (("two-gpus-bench-tp", ["tp"]), ("two-gpus-bench-dp", ["dp"])):
        line = re.search(rf"{part}\) run \"\$part\" python benchmarks/two_gpus.py (.*?);;",
                         script, re.S)
        args = two_gpus.parse_args(shlex.split(line.group(1).replace('"$out"', "out")
                                               .replace("\\\n", " ")))
        assert args.parts == parts
    module = re.search(r"^TWO_GPUS=(\S+)$", script, re.M).group(1)
    assert (ROOT / module).is_file()
    assert re.search(r"two-gpus\)(?:(?!;;).)*pytest_gpu \"\$TWO_GPUS\"", script, re.S)


def test_the_benchmarks_servers_pass_the_startup_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every server's flags through SGLang's parser with the plugin registered, as on a GPU
    machine (bench.served allows the 1M context above the config's)."""
    pytest.importorskip("sglang")
    import argparse

    import sglang.srt.server_args as sglang_server_args
    from sglang.srt.server_args import ServerArgs

    from sala_sglang import plugin
    from sala_sglang import server_args as ours

    plugin.register()
    monkeypatch.setattr(ours, "_gpu_visible", lambda: True)
    monkeypatch.setattr(sglang_server_args, "is_cuda", lambda: True)
    monkeypatch.setenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")
    shape = MODELS["sala"]
    model, tokenizer = prepare_model_dir(shape, tmp_path)
    args = two_gpus.parse_args([])
    for part, setups in PARTS.items():
        context = two_gpus.part_context(part, args)
        common = server_flags(shape, "minicpm_flashinfer", context, tokenizer, "")
        for setup in setups:
            parser = argparse.ArgumentParser()
            ServerArgs.add_cli_args(parser)
            cli = parser.parse_args(["--model-path", str(model), "--device", "cpu", *common,
                                     *setup.flags])
            server = ServerArgs.from_cli_args(cli)
            assert server.tp_size * server.dp_size == (2 if setup.name.endswith("2") else 1)
            assert server.context_length == context and server.page_size == 64
