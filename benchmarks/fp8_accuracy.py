"""How far SGLang's online FP8 weights (`--quantization fp8`) move the served model's answers.

The tiny checkpoint is served twice, in bf16 and with `--quantization fp8` (same flags
otherwise), and both are compared teacher-forced with the float64 reference on the same prompts
(sala_sglang.testing.compare.served_vs_reference, which excuses sparse-selection near-ties
exactly as the GPU
serving tests do). There is no FP8 reference, so this measures the error FP8 adds on top of bf16
rather than passing or failing it: max and mean logprob error, confident top-1 flips, and how
often the served greedy token equals the reference's argmax. Random weights, a 6-layer model:
it shows the size of the effect, not the released model's quality.

    python benchmarks/fp8_accuracy.py
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a file: `benchmarks` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, header, write_result
from sala_sglang.testing.compare import served_vs_reference  # noqa: E402
from sala_sglang.testing.server import Server  # noqa: E402
from sala_sglang.tiny import make_tiny  # noqa: E402

# bf16-sized noise on the reference's stage-1 inputs decides which misses are selection
# near-ties (tests/test_gpu_serving.py uses the same value for its bf16 mode).
Q_NOISE = 8e-3
FLAGS = ["--dtype", "bfloat16", "--chunked-prefill-size", "64", "--max-running-requests", "8"]
VARIANTS = {"bf16": [], "fp8": ["--quantization", "fp8"]}


def _prompt(length: int, vocab: int) -> list[int]:
    rng = random.Random(length)
    return [1] + [rng.randrange(5, vocab) for _ in range(length - 1)]


def _argmax_agreement(reference, prompt: list[int], result: dict) -> float:
    """Share of positions where the served top-1 token is the reference's argmax."""
    sequence = prompt + list(result["output_ids"])
    logits = reference.forward(sequence, reference.new_cache(prompt_len=len(prompt)))
    meta = result["meta_info"]
    served_top = [e[0][1] for e in [*meta["input_top_logprobs"][1:], *meta["output_top_logprobs"]]]
    ref_top = logits[: len(served_top)].argmax(-1).tolist()
    return sum(a == b for a, b in zip(served_top, ref_top)) / len(served_top)


def measure(lengths: list[int], new_tokens: int, work: Path) -> dict:
    from sala_sglang.reference.model import ReferenceModel

    tiny = make_tiny(work / "tiny")
    reference = ReferenceModel.from_pretrained(tiny, dtype=torch.float64).to("cuda")
    vocab = reference.config.vocab_size
    results: dict[str, list[dict]] = {}
    for name, extra in VARIANTS.items():
        server = Server(tiny, work / f"server_{name}.log", *FLAGS, *extra)
        try:
            server.wait_ready()
            rows = []
            for length in lengths:
                prompt = _prompt(length, vocab)
                served = server.generate(prompt, new_tokens)
                report = served_vs_reference(reference, prompt, served, q_noise=Q_NOISE)
                report["top1_agreement"] = round(_argmax_agreement(reference, prompt, served), 4)
                rows.append({"prompt_len": length, **report})
                print(f"[fp8] {name} {length}: max {report['max_logprob_err']:.4f} mean "
                      f"{report['mean_logprob_err']:.4f} flips {report['confident_flips']} "
                      f"top-1 {report['top1_agreement']:.3f}", flush=True)
            results[name] = rows
        finally:
            server.stop()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[40, 250, 700, 1000])
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_accuracy.py needs a CUDA GPU (FP8 GEMMs run on sm_89 and newer)")
    with tempfile.TemporaryDirectory(prefix="sala-fp8-") as work:
        variants = measure(args.lengths, args.new_tokens, Path(work))
    record = {**header("fp8_accuracy", "fp8_accuracy_tiny"), "server_flags": FLAGS,
              "q_noise": Q_NOISE, "variants": variants}
    write_result(record, "fp8_accuracy_tiny", args.out)


if __name__ == "__main__":
    main()
