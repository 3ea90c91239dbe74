"""`sala-sglang check`: the reference model on the tiny checkpoint (CPU), and, where a GPU is
visible, SGLang serving the same checkpoint compared with it teacher-forced (SPEC section 4)."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

from sala_sglang.reference.model import ReferenceModel

PROMPT_LENGTHS = (40, 300)  # below and above the tiny model's dense_len (256)
SPLIT = 97  # an awkward chunk boundary for the chunked-prefill check (taken modulo the length)
NEW_TOKENS = 8


def _prompt(length: int, vocab: int) -> list[int]:
    rng = random.Random(length)
    return [1] + [rng.randrange(5, vocab) for _ in range(length - 1)]


def check_reference(model_dir: Path) -> list[str]:
    """Problems found running the reference on the CPU (empty: all good); prints progress."""
    problems = []
    model = ReferenceModel.from_pretrained(model_dir, dtype=torch.float64)
    vocab = model.config.vocab_size
    for length in PROMPT_LENGTHS:
        prompt = _prompt(length, vocab)
        one_shot = model.forward(prompt)
        cache, split = model.new_cache(prompt_len=length), SPLIT % length or 1
        chunked = torch.cat(
            [model.forward(prompt[:split], cache), model.forward(prompt[split:], cache)]
        )
        tokens = model.generate(prompt, NEW_TOKENS)
        full = model.forward(prompt + tokens, model.new_cache(prompt_len=length))
        greedy_ok = tokens == full[length - 1 : -1].argmax(-1).tolist()
        diff = float((one_shot - chunked).abs().max())
        print(f"reference, {length}-token prompt: chunked-vs-one-shot max |dlogit| {diff:.2e}, "
              f"greedy {tokens}, incremental == full forward: {greedy_ok}")
        if diff > 1e-9:
            problems.append(f"chunked prefill off by {diff:.2e} ({length} tokens)")
        if not greedy_ok:
            problems.append(f"incremental decode disagrees with a full forward at {length} tokens")
    return problems


def check_served(model_dir: Path) -> list[str]:
    """Problems found comparing a served run (float16, small chunks) with the reference."""
    from sala_sglang.testing.compare import LOGPROB_TOL, served_vs_reference
    from sala_sglang.testing.server import Server

    reference = ReferenceModel.from_pretrained(model_dir, dtype=torch.float64)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(model_dir, Path(tmp) / "server.log", "--dtype", "float16",
                        "--chunked-prefill-size", "64")
        try:
            server.wait_ready()
            for length in PROMPT_LENGTHS:
                prompt = _prompt(length, reference.config.vocab_size)
                result = server.generate(prompt, NEW_TOKENS)
                report = served_vs_reference(reference, prompt, result)
                print(f"served vs reference, {length}-token prompt: {report}")
                if report["max_logprob_err"] > LOGPROB_TOL or report["confident_flips"]:
                    problems.append(f"served run differs from the reference at {length} tokens")
        finally:
            server.stop()
    return problems
