"""Compare what a server served with the reference model, teacher-forced (SPEC section 4).

Used by the GPU tests, the benchmarks and `sala-sglang check`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sala_sglang.reference.model import Stage1

LOGPROB_TOL = 5e-2
# A directory: every served generation that fails `check_served` is written there as JSON
# (label, prompt, result), so a miss seen on the GPU machine can be studied on a CPU.
FAILED_DUMP_ENV = "SALA_SGLANG_FAILED_SERVED_DIR"


def _reference_logprobs(reference: Any, sequence: list[int], prompt_len: int,
                        stage1: Stage1 | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference logits and log-probabilities [len, vocab], with every sparse layer's block
    scoring done by `stage1` when given (see `ReferenceModel.forward`)."""
    import torch

    with torch.no_grad():
        logits = reference.forward(sequence, reference.new_cache(prompt_len=prompt_len),
                                   stage1=stage1)
    logits = logits.double().cpu()
    return logits, torch.log_softmax(logits, dim=-1)


def _noisy_stage1(q_noise: float, seed: int) -> Stage1:
    """Scales the stage-1 queries and compressed keys by (1 + q_noise * N(0, 1)), to see how
    rounding-sized changes move block selection (the tie structure of shared windows is kept)."""
    import torch

    from sala_sglang.reference.sparse import block_scores

    gen = torch.Generator().manual_seed(seed)

    def noisy(layer, q, k1, positions, cfg):
        q = q * (1 + q_noise * torch.randn(q.shape, generator=gen, dtype=q.dtype).to(q.device))
        k1 = k1 * (1 + q_noise * torch.randn(k1.shape, generator=gen, dtype=k1.dtype).to(k1.device))
        return block_scores(q, k1, positions, cfg)

    return noisy


def _near_tie_swaps(reference: Any, sequence: list[int], prompt_len: int, rows: list[int],
                    rel: float) -> list[tuple[int, int, int, int, int, float]]:
    """Every (row, sparse layer, kv head, chosen block, passed-over block, relative gap) where
    the reference, at query position `row`, chose a block over another whose score is within
    `rel` (relative) of it: a pair that rounding may order the other way."""
    from sala_sglang.reference.sparse import block_scores, select_blocks

    swaps = []

    def find(layer, q, k1, positions, cfg):
        scores = block_scores(q, k1, positions, cfg)
        chosen = select_blocks(scores, cfg.num_selected_blocks)
        for row in rows:
            at = (positions == row).nonzero()
            if not len(at):
                continue
            i = int(at[0])
            for g in range(scores.shape[1]):
                s = scores[i, g].tolist()
                picked = {b for b in chosen[i, g].tolist() if b >= 0 and math.isfinite(s[b])}
                passed = [b for b, v in enumerate(s) if math.isfinite(v) and b not in picked]
                swaps.extend((row, layer, g, a, u, (s[a] - s[u]) / s[a])
                             for a in picked for u in passed if s[a] - s[u] <= rel * s[a])
        return scores

    _reference_logprobs(reference, sequence, prompt_len, find)
    return swaps


def _swapped_stage1(row: int, layer: int, group: int, chosen: int, passed: int) -> Stage1:
    """Block scoring with one near tie taken the other way: in sparse layer `layer` at query
    position `row`, `chosen` scores just below `passed`."""
    from sala_sglang.reference.sparse import block_scores

    def swapped(index, q, k1, positions, cfg):
        scores = block_scores(q, k1, positions, cfg)
        if index == layer:
            i = int((positions == row).nonzero()[0])
            scores[i, group, chosen] = scores[i, group, passed] * (1 - 1e-9)
        return scores

    return swapped


# Noisy-reference trials run when a position misses, and the most run while one is unexplained
# (see served_vs_reference).
NOISE_TRIALS, MAX_NOISE_TRIALS = 16, 64
# At most this many missed positions are searched for selection near ties: each candidate pair
# costs one reference forward pass, and more misses than this are not rounding.
MAX_TIE_ROWS = 8


def served_vs_reference(reference: Any, prompt: list[int], result: dict,
                        q_noise: float = 1e-3, trials: int = NOISE_TRIALS,
                        max_trials: int = MAX_NOISE_TRIALS, tie_rel: float | None = None) -> dict:
    """Compare one served greedy generation with the reference, teacher-forced (SPEC section 4).

    Block selection is discrete (SPEC section 4 tests it with a score tolerance), so near ties
    between blocks can select differently under fp16/bf16 rounding. A position that misses
    LOGPROB_TOL (or flips a confident token) is excused in two ways, both counted and left out
    of the maxima:
    - "selection_excused": the reference itself moves by more than LOGPROB_TOL / 2 there when its
      stage-1 queries and compressed keys get rounding-sized noise (q_noise), in one of `trials`
      trials, or of up to `max_trials` while a missed position is still unexplained (a flip that
      one trial in ten makes is missed by 16 trials one time in five). How many positions the
      noisy reference misses LOGPROB_TOL at, in its worst trial, is reported as
      "noisy_reference_misses": the number of excuses that rounding alone accounts for, and the
      trials run as "noise_trials". The worst trial's mean and 99th percentile of |dlogprob|
      against the reference over every position are "noisy_mean_err" and "noisy_p99_err" (0
      where no trial ran), beside the served run's own, excused positions included
      ("all_mean_err", "all_p99_err").
    - "tie_excused": at that position the reference chose one block over another scoring within
      tie_rel (relative; default 2 * q_noise), and the reference with that one pair taken the
      other way agrees with the served logprob within LOGPROB_TOL, with no confident flip. Noise
      trials rarely hit a gap of a few 1e-4, which rounding still decides. The pairs are listed
      in "near_ties" as (row, sparse layer, kv head, chosen block, served block, relative gap),
      the sparse layer counted among the sparse layers (0 = the first).
    The prompt's entries may start anywhere (`logprob_start_len` > 0, as a prefix-cache hit
    needs): they are the prompt's last ones, and an entry without a logprob (the first, which
    scores nothing) is skipped. Rows are reported as reference rows: row r scores token r + 1.
    Returns the worst and mean logprob errors, the number of confident token flips (reference
    top-1/top-2 margin >= 0.1 but a different served choice), and the count of positions.
    """
    return _served_vs_reference(reference, prompt, result, q_noise, trials, max_trials,
                                tie_rel)[0]


def _served_vs_reference(reference: Any, prompt: list[int], result: dict,
                         q_noise: float = 1e-3, trials: int = NOISE_TRIALS,
                         max_trials: int = MAX_NOISE_TRIALS,
                         tie_rel: float | None = None) -> tuple[dict, torch.Tensor]:
    """served_vs_reference's report, and every position's |dlogprob| (excused ones included)."""
    import torch

    meta = result["meta_info"]
    sequence = prompt + list(result["output_ids"])
    logits, logprobs = _reference_logprobs(reference, sequence, len(prompt))
    inputs, input_tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
    first = len(prompt) - len(inputs)  # the position the first prompt entry scores
    kept_inputs = [i for i, e in enumerate(inputs) if e[0] is not None]
    served = [inputs[i] for i in kept_inputs] + list(meta["output_token_logprobs"])
    served_top = [input_tops[i] for i in kept_inputs] + list(meta["output_top_logprobs"])
    # the entry for position p scores token p given tokens < p: reference row p - 1
    positions = [first + i for i in kept_inputs] + [
        len(prompt) + j for j in range(len(meta["output_token_logprobs"]))]
    rows = torch.tensor(positions) - 1
    tokens = torch.tensor([sequence[p] if 0 < p < len(sequence) else -1 for p in positions])
    served_tokens = [e[1] for e in served]
    # SGLang 0.5.16 reports prompt token ids >= vocab_size - 1 as 0 (it clips image-hash
    # padding), so the last vocabulary id reads back as 0 in the prompt part.
    clip = reference.config.vocab_size - 1
    expected = [0 if (t >= clip and p < len(prompt)) else t
                for p, t in zip(positions, tokens.tolist())]
    if served_tokens != expected or first < 0:
        bad_at = next((int(r) for r, a, b in zip(rows, served_tokens, expected) if a != b),
                      len(sequence) - 1)
        raise AssertionError(
            f"served logprob entries do not line up with the sequence: {len(served_tokens)} "
            f"entries for {len(sequence) - 1} positions, first difference at row {bad_at}"
        )
    served_lp = torch.tensor([e[0] for e in served], dtype=torch.float64)
    served_choice = torch.tensor([t[0][1] for t in served_top])

    def misses(ref_logits, ref_logprobs):
        top2 = ref_logits.topk(2, dim=-1).values
        confident = (top2[rows, 0] - top2[rows, 1]) >= 0.1
        flip = confident & (served_choice != ref_logits[rows].argmax(-1))
        return (served_lp - ref_logprobs[rows, tokens]).abs(), flip

    err, flip = misses(logits, logprobs)
    bad = (err > LOGPROB_TOL) | flip
    excused = torch.zeros_like(bad)
    tie_excused = torch.zeros_like(bad)
    near_ties = []
    noisy_misses = 0
    noisy_mean = noisy_p99 = 0.0
    seed = 0
    if bad.any():
        spread = torch.zeros_like(err)
        while seed < trials or (seed < max_trials and (bad & ~excused).any()):
            _, noisy = _reference_logprobs(reference, sequence, len(prompt),
                                           _noisy_stage1(q_noise, seed))
            moved = (noisy[rows, tokens] - logprobs[rows, tokens]).abs()
            spread = torch.maximum(spread, moved)
            noisy_misses = max(noisy_misses, int((moved > LOGPROB_TOL).sum()))
            noisy_mean = max(noisy_mean, float(moved.mean()))
            noisy_p99 = max(noisy_p99, float(moved.quantile(0.99)))
            excused = bad & (spread > LOGPROB_TOL / 2)
            seed += 1
    left = (bad & ~excused).nonzero().flatten().tolist()
    if 0 < len(left) <= MAX_TIE_ROWS:
        rel = 2 * q_noise if tie_rel is None else tie_rel
        entry_of = {int(rows[i]): i for i in left}
        for row, layer, group, chosen, passed, gap in _near_tie_swaps(
                reference, sequence, len(prompt), list(entry_of), rel):
            i = entry_of[row]
            if tie_excused[i]:
                continue
            alt_err, alt_flip = misses(*_reference_logprobs(
                reference, sequence, len(prompt),
                _swapped_stage1(row, layer, group, chosen, passed)))
            if alt_err[i] <= LOGPROB_TOL and not alt_flip[i]:
                tie_excused[i] = True
                near_ties.append((row, layer, group, chosen, passed, round(gap, 6)))
    kept = ~(excused | tie_excused)
    worst = (err * kept).topk(min(3, len(served))).indices.tolist()
    return {
        "worst_rows": [(int(rows[i]), round(float(err[i]), 4), int(rows[i]) >= len(prompt) - 1)
                       for i in worst],
        "max_logprob_err": float(err[kept].max()),
        "mean_logprob_err": float(err[kept].mean()),
        "confident_flips": int((flip & kept).sum()),
        "positions": len(served),
        "selection_excused": int(excused.sum()),
        "noisy_reference_misses": noisy_misses,
        "noise_trials": seed,
        "all_mean_err": float(err.mean()),
        "all_p99_err": float(err.quantile(0.99)),
        "noisy_mean_err": noisy_mean,
        "noisy_p99_err": noisy_p99,
        "excused_worst_err": float(err[excused].max()) if excused.any() else 0.0,
        "tie_excused": int(tie_excused.sum()),
        "near_ties": near_ties,
    }, err


# SPEC section 4 for the served test modes. In bf16 the logits themselves are rounded to bf16
# (spacing 0.03 at |logit| 4-8), which alone moves some logprobs past LOGPROB_TOL (measured up to
# 0.076, with no token flips); the exactness modes therefore serve in float16, and bf16 is held
# to BF16_MAX_LOGPROB_ERR per position and BF16_MEAN_LOGPROB_ERR on average.
BF16_MAX_LOGPROB_ERR = 0.15
BF16_MEAN_LOGPROB_ERR = 0.02
# SPEC section 4's fp16 distribution over each test's positions, excused ones included (measured
# on the group-16, block-64 geometry). Where the noisy reference itself is spread wider on the
# same sequences (the tiny checkpoint's 16-token blocks, 4 of them selected: over a 2199-position
# decode, noise alone gave mean 0.010-0.018 and p99 0.14-0.22), its worst trial is the bound. The
# 99th percentile is held only over P99_MIN_POSITIONS or more positions (below, it is the
# maximum, which the per-position rule already holds). A test gathers its requests' positions in
# `one_test()`; a request checked outside one is a test of its own.
FP16_MEAN_LOGPROB_ERR = 0.01
FP16_P99_LOGPROB_ERR = 0.08
P99_MIN_POSITIONS = 100
# Relative noise on the reference's stage-1 queries that stands for the served model's rounding
# when deciding whether a missed position is a selection near tie (see served_vs_reference).
FP16_Q_NOISE = 1e-3
BF16_Q_NOISE = 8e-3


class TestPositions:
    """The fp16 |dlogprob| of every position one test checked, with the widest noisy-reference
    spread seen on its requests: a prefix-cache hit's request may score a dozen positions, too
    few for a mean on their own."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self._errors: list[torch.Tensor] = []
        self.noisy_mean_err = 0.0
        self.noisy_p99_err = 0.0

    def add(self, errors: torch.Tensor, noisy_mean_err: float, noisy_p99_err: float) -> None:
        self._errors.append(errors)
        self.noisy_mean_err = max(self.noisy_mean_err, noisy_mean_err)
        self.noisy_p99_err = max(self.noisy_p99_err, noisy_p99_err)

    def check(self) -> dict:
        """Assert SPEC section 4's fp16 mean and p99 over every position added; returns them."""
        if not self._errors:
            return {"positions": 0}
        import torch

        err = torch.cat(self._errors)
        summary = {"positions": len(err), "all_mean_err": float(err.mean()),
                   "all_p99_err": float(err.quantile(0.99)),
                   "noisy_mean_err": self.noisy_mean_err, "noisy_p99_err": self.noisy_p99_err}
        assert summary["all_mean_err"] <= max(FP16_MEAN_LOGPROB_ERR, self.noisy_mean_err), summary
        if len(err) >= P99_MIN_POSITIONS:
            assert summary["all_p99_err"] <= max(FP16_P99_LOGPROB_ERR, self.noisy_p99_err), summary
        return summary


_open_tests: list[TestPositions] = []


def begin_test() -> TestPositions:
    """Open a test: the positions of every fp16 `check_served` until `end_test` join it."""
    positions = TestPositions()
    _open_tests.append(positions)
    return positions


def end_test(positions: TestPositions) -> None:
    _open_tests.remove(positions)


@contextmanager
def one_test() -> Iterator[TestPositions]:
    """A test around the block: SPEC section 4's distribution is held over every position
    checked inside it on leaving (not after an exception)."""
    positions = begin_test()
    try:
        yield positions
    finally:
        end_test(positions)
    print(json.dumps({"test_positions": positions.check()}))


def check_served(reference: Any, prompt: list[int], result: dict, bf16: bool = False,
                 **label: Any) -> dict:
    """Assert one served greedy generation agrees with the reference (SPEC section 4, the
    tolerances above); prints the report as one JSON line with `label`, and returns it. In fp16
    its positions join the innermost open `one_test()`, else the distribution is held over this
    request alone."""
    try:
        report, errors = _served_vs_reference(
            reference, prompt, result, q_noise=BF16_Q_NOISE if bf16 else FP16_Q_NOISE)
    except Exception as exc:
        print(json.dumps({**label, "prompt_len": len(prompt), "error": repr(exc),
                          "meta_keys": sorted(result.get("meta_info", {}))}))
        raise
    print(json.dumps({**label, "prompt_len": len(prompt), **report}))
    try:
        _assert_within_tolerances(report, bf16)
        if not bf16:
            positions = _open_tests[-1] if _open_tests else TestPositions()
            positions.add(errors, report["noisy_mean_err"], report["noisy_p99_err"])
            if not _open_tests:
                positions.check()
    except AssertionError:
        _dump_failed(label, prompt, result)
        raise
    return report


def _assert_within_tolerances(report: dict, bf16: bool) -> None:
    """The per-position rules (and bf16's mean): what every request must meet on its own."""
    assert report["confident_flips"] == 0, report
    # A selection bug shows as more near-tie misses than rounding-sized noise on the reference's
    # stage-1 inputs causes by itself, so that count is the cap: a fixed 10% sat below what
    # bf16-sized noise alone causes (see benchmarks/NOTES.md, fifth session).
    assert report["selection_excused"] <= report["noisy_reference_misses"], report
    if bf16:
        assert report["max_logprob_err"] <= BF16_MAX_LOGPROB_ERR, report
        assert report["mean_logprob_err"] <= BF16_MEAN_LOGPROB_ERR, report
    else:
        assert report["max_logprob_err"] <= LOGPROB_TOL, report


def _dump_failed(label: dict, prompt: list[int], result: dict) -> None:
    folder = os.environ.get(FAILED_DUMP_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"failed-{uuid.uuid4().hex[:8]}.json")
        with open(path, "w") as f:
            json.dump({"label": label, "prompt": prompt, "result": result}, f)


def first_confident_divergence(reference: Any, prompt: list[int], ours: list[int],
                               theirs: list[int], margin: float = 0.1) -> int | None:
    """Where two greedy generations for `prompt` first differ although the reference's top-1 /
    top-2 margin there (teacher-forced on `ours`) is at least `margin`. None if they agree, or
    first differ where the margin is smaller (rounding may decide there); positions after that
    are not compared, since the two continue from different tokens."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if at is None:
        return None if len(ours) == len(theirs) else min(len(ours), len(theirs))
    logits, _ = _reference_logprobs(reference, prompt + ours[:at], len(prompt))
    top2 = logits[-1].topk(2).values
    return at if float(top2[0] - top2[1]) >= margin else None
