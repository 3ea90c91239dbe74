"""Two GPUs against one (issue 19): MiniCPM-SALA's real config with random weights, served as
`sala-sglang bench` serves it, on two GPUs and then on one GPU of the same machine, in one
result file with the two-GPU / one-GPU ratios.

`--parts tp`: a server at `--tp-size 2`, then one at TP 1 on GPU 0 alone
(CUDA_VISIBLE_DEVICES=0), both started for the longest length: batch-1 TTFT and decode rate at
128K, 256K and 1M tokens (the same prompts on both), and `tp2_over_tp1` per length.
`--parts dp`: a server at `--dp-size 2` (two replicas, SGLang's round robin in front), then one
replica on GPU 0 alone: `sglang.bench_serving` at concurrency 8 and unlimited on 16 random-id
prompts of 32K-128K tokens (the same prompts on both), and `dp2_over_dp1` per concurrency.

A ratio is the two-GPU server's value over the one-GPU server's: below 1 is faster for TTFT and
durations, above 1 for rates. The two-GPU server runs first, so that a run cut short keeps its
points (the result is written after each one). NVLink multicast stays off in every process this
starts (NVLINK_MULTICAST_OFF).

    python benchmarks/two_gpus.py --parts tp
    python benchmarks/two_gpus.py --parts dp
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a file: `benchmarks` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS  # noqa: E402
from sala_sglang.bench import (  # noqa: E402
    MODELS,
    WARMUP_TOKENS,
    _log,
    _model_record,
    bench_serving,
    prepare_model_dir,
    random_ids,
    random_ids_dataset,
    recorded,
    result_path,
    served,
    server_flags,
    server_state,
    stream_one,
)
from sala_sglang.server_args import BACKEND_NAMES  # noqa: E402
from sala_sglang.testing.server import Server  # noqa: E402
from sala_sglang.tiny import TINY_VOCAB_SIZE  # noqa: E402

# NVLink multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM: on the shared GPU hosts a
# program using it can take the host's GPUs out of service. At TP > 1 SGLang 0.5.16 puts its
# custom all-reduce and its logits all-gather on PyTorch's symmetric memory, which uses
# multicast wherever the driver offers it unless told not to.
NVLINK_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
TP_LENGTHS = [131072, 262144, 1048576]
TP_METRICS = ("ttft_s", "decode_tok_per_s")
DP_METRICS = ("duration", "request_throughput", "input_throughput", "output_throughput",
              "mean_ttft_ms", "mean_tpot_ms")


@dataclass(frozen=True)
class Setup:
    """One server of a part: its name, the flags it adds to the part's, the GPUs it may see
    (CUDA_VISIBLE_DEVICES; None: those this process sees) and its data-parallel replicas."""

    name: str
    flags: tuple[str, ...]
    visible_gpus: str | None
    replicas: int = 1


# Each part's servers, in the order they run: the two-GPU one first.
PARTS = {
    "tp": (Setup("tp2", ("--tp-size", "2"), None), Setup("tp1", (), "0")),
    "dp": (Setup("dp2", ("--dp-size", "2"), None, replicas=2), Setup("dp1", (), "0")),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=["tp", "dp"],
                   help="tp: --tp-size 2 against TP 1, batch-1 TTFT and decode; dp: --dp-size 2 "
                        "against one replica, bench_serving")
    p.add_argument("--lengths", type=int, nargs="+", default=TP_LENGTHS,
                   help="tp: batch-1 input lengths")
    p.add_argument("--decode-tokens", type=int, default=256,
                   help="tp: tokens generated per batch-1 request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 0],
                   help="dp: bench_serving runs, max concurrency each (0: unlimited)")
    p.add_argument("--serving-input-len", type=int, default=131072)
    p.add_argument("--serving-range", type=float, default=0.25,
                   help="dp: bench_serving inputs are uniform in [len * range, len]")
    p.add_argument("--serving-output-len", type=int, default=256)
    p.add_argument("--serving-prompts", type=int, default=16)
    p.add_argument("--server-args", default="",
                   help="extra flags for every server of the run (sglang.launch_server)")
    p.add_argument("--tag", default=None,
                   help="what the result file is named by (default two_gpus_<parts>)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep-log", action="store_true", help="keep the server log tails in the JSON")
    args = p.parse_args(argv)
    args.tag = args.tag or "two_gpus_" + "_".join(args.parts)
    return args


def part_context(part: str, args: argparse.Namespace) -> int:
    """--context-length of a part's servers: its longest request, output included."""
    if part == "tp":
        return max(args.lengths) + args.decode_tokens + 64
    return args.serving_input_len + args.serving_output_len + 64


def ratios(rows: list[dict], key: str, metrics: tuple[str, ...], top: str,
           bottom: str) -> list[dict]:
    """Per value of `key` (a length, a concurrency) that both servers measured: each metric's
    `top` / `bottom` ratio, as `<metric>_<top>_over_<bottom>`, where both rows have it."""
    out = []
    for row in rows:
        base = next((r for r in rows if r["server"] == bottom and r.get(key) == row.get(key)),
                    None)
        if row["server"] != top or base is None:
            continue
        pair = {f"{m}_{top}_over_{bottom}": round(row[m] / base[m], 3) for m in metrics
                if row.get(m) and base.get(m)}
        if pair:
            out.append({key: row[key], **pair})
    return out


@contextlib.contextmanager
def gpus_visible(devices: str | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES=devices for the processes started in the block (None: unchanged)."""
    if devices is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


@dataclass
class Results:
    """A run's arguments, its record, where it works (the tokenizer both servers and
    bench_serving read), and save(), which writes the record (`sala_sglang.bench.recorded`)."""

    args: argparse.Namespace
    record: dict
    work: Path
    tokenizer: Path
    save: Callable[[], Path]


def measure_batch1(server: Server, setup: Setup, results: Results) -> None:
    """The tp part on one server: one streamed request per length (prompt fixed by length)."""
    args, rows = results.args, results.record["batch1"]
    for n in args.lengths:
        print(f"[bench] {setup.name}: {n} input tokens, {args.decode_tokens} output", flush=True)
        row = {"server": setup.name, "input_tokens": n,
               **stream_one(server.url, random_ids(n, TINY_VOCAB_SIZE, n), args.decode_tokens)}
        _log(row)
        rows.append(row)
        results.record["tp2_over_tp1"] = ratios(rows, "input_tokens", TP_METRICS, "tp2", "tp1")
        results.save()
        if "error" in row and not server.alive():
            break


def measure_serving(server: Server, setup: Setup, results: Results) -> None:
    """The dp part on one server: bench_serving at each concurrency (its seed fixes the
    prompts)."""
    args, rows = results.args, results.record["bench_serving"]
    dataset = random_ids_dataset(args.serving_input_len, args.serving_range,
                                 args.serving_output_len)
    for conc in args.concurrency:
        if not server.alive():
            break
        print(f"[bench] {setup.name}: bench_serving, concurrency {conc or 'unlimited'}",
              flush=True)
        res = bench_serving(server.url, results.tokenizer, dataset, args.serving_prompts, conc,
                            results.work)
        _log({"server": setup.name, **{k: v for k, v in res.items() if k != "command"}})
        rows.append({"server": setup.name, "max_concurrency": conc, **res})
        results.record["dp2_over_dp1"] = ratios(rows, "max_concurrency", DP_METRICS, "dp2",
                                                "dp1")
        results.save()


MEASURE = {"tp": measure_batch1, "dp": measure_serving}


def run(args: argparse.Namespace) -> Path:
    """Each part's servers one after the other, measured as the part says; one record."""
    import torch

    shape, backend = MODELS["sala"], BACKEND_NAMES[0]
    work = Path(tempfile.mkdtemp(prefix="sala-two-gpus-"))
    model_dir, tok_dir = prepare_model_dir(shape, work)
    record = {
        **_model_record("two_gpus", args.tag, shape, backend),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "nvlink_multicast_off": NVLINK_MULTICAST_OFF,
        "servers": {},
    }
    if "tp" in args.parts:
        record.update(decode_tokens=args.decode_tokens, batch1=[], tp2_over_tp1=[])
    if "dp" in args.parts:
        record.update(serving={"input_len": args.serving_input_len, "range": args.serving_range,
                               "output_len": args.serving_output_len,
                               "prompts": args.serving_prompts},
                      bench_serving=[], dp2_over_dp1=[])
    with recorded(record, args.tag, args.out, work) as save:
        results = Results(args, record, work, tok_dir, save)
        for part in args.parts:
            context = part_context(part, args)
            common = server_flags(shape, backend, context, tok_dir, args.server_args)
            for setup in PARTS[part]:
                flags = [*common, *setup.flags]
                info = record["servers"][setup.name] = {
                    "flags": flags, "cuda_visible_devices": setup.visible_gpus}
                print(f"[bench] starting SGLang ({setup.name}), context {context}", flush=True)
                with gpus_visible(setup.visible_gpus), served(
                        model_dir, work / f"server_{setup.name}.log", flags, info,
                        args.keep_log) as server:
                    info.update(server_state(server.url, "tp_size", "dp_size"))
                    # Kernel JIT and autotuning before anything is measured; SGLang's round
                    # robin sends each replica one of these.
                    for _ in range(setup.replicas):
                        stream_one(server.url, random_ids(WARMUP_TOKENS, TINY_VOCAB_SIZE, 0), 16)
                    MEASURE[part](server, setup, results)
                results.save()  # with what served() added once the server stopped
    return result_path(record, args.tag, args.out)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if torch.cuda.device_count() < 2:
        print(f"two_gpus: {torch.cuda.device_count()} CUDA GPUs visible; this benchmark compares "
              "two GPUs with one", file=sys.stderr)
        return 2
    if "dp" in args.parts and importlib.util.find_spec("datasets") is None:
        # sglang.bench_serving imports it at startup: found missing only after a server's
        # minutes of startup otherwise.
        print("two_gpus: sglang.bench_serving (the dp part) needs the `datasets` package: "
              "pip install datasets", file=sys.stderr)
        return 2
    os.environ.update(NVLINK_MULTICAST_OFF)  # every server and client started from here on
    # A SIGTERM (e.g. from `timeout`) must still stop the server through run()'s finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
