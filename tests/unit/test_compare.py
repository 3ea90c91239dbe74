"""The served-vs-reference comparison itself, on a fake SGLang /generate answer built from the
reference: it must pass an exact answer (including SGLang's clipped last-vocabulary id), catch a
wrong logprob and a confident token flip, and refuse entries that do not line up."""

from __future__ import annotations

import pytest
import torch

from sala_sglang.testing.compare import LOGPROB_TOL, served_vs_reference


def _fake_answer(reference, prompt: list[int], new_tokens: int) -> dict:
    """What SGLang 0.5.16 returns for a greedy run with logprob_start_len 0, top_logprobs_num 2."""
    sequence = list(prompt)
    for _ in range(new_tokens):
        logits = reference.forward(sequence, reference.new_cache(prompt_len=len(prompt)))
        sequence.append(int(logits[-1].argmax()))
    logits = reference.forward(sequence, reference.new_cache(prompt_len=len(prompt))).double()
    logprobs = torch.log_softmax(logits, dim=-1)
    clip = reference.config.vocab_size - 1
    entries, tops = [], []
    for j in range(1, len(sequence)):
        token = sequence[j]
        shown = 0 if (token >= clip and j < len(prompt)) else token
        entries.append([float(logprobs[j - 1, token]), shown, None])
        values, ids = logprobs[j - 1].topk(2)
        tops.append([[float(v), int(i), None] for v, i in zip(values, ids)])
    n_in = len(prompt) - 1
    return {
        "output_ids": sequence[len(prompt):],
        "meta_info": {
            "input_token_logprobs": [[None, prompt[0], None]] + entries[:n_in],
            "input_top_logprobs": [None] + tops[:n_in],
            "output_token_logprobs": entries[n_in:],
            "output_top_logprobs": tops[n_in:],
        },
    }


@pytest.fixture(scope="module")
def setup(request):
    from sala_sglang.reference import ReferenceModel
    from tests.conftest import random_state_dict, tiny_config

    config = tiny_config()
    reference = ReferenceModel.from_state_dict(config, random_state_dict(config, 3),
                                               dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(5, config.vocab_size, (40,), generator=gen).tolist()
    prompt[17] = config.vocab_size - 1  # SGLang reports this prompt id as 0
    return reference, prompt, _fake_answer(reference, prompt, 4)


def test_an_exact_answer_passes(setup) -> None:
    reference, prompt, answer = setup
    report = served_vs_reference(reference, prompt, answer)
    assert report["max_logprob_err"] < 1e-9
    assert report["confident_flips"] == 0 and report["selection_excused"] == 0
    assert report["positions"] == len(prompt) + 3


@pytest.mark.parametrize("start", [1, 16, 40])
def test_an_answer_scoring_the_prompt_from_a_later_start_passes(setup, start: int) -> None:
    # as SGLang answers logprob_start_len = start (a prefix-cache hit needs start > 0): the
    # prompt's entries from position start on, the first without a logprob
    reference, prompt, answer = setup
    meta = answer["meta_info"]
    later = {**answer, "meta_info": {
        **meta,
        "input_token_logprobs": [[None, prompt[start], None]]
        + meta["input_token_logprobs"][start + 1:],
        "input_top_logprobs": [None] + meta["input_top_logprobs"][start + 1:],
    }}
    report = served_vs_reference(reference, prompt, later)
    assert report["max_logprob_err"] < 1e-9
    assert report["positions"] == len(prompt) - 1 - start + 4


def test_a_wrong_logprob_is_reported(setup) -> None:
    reference, prompt, answer = setup
    bad = {**answer, "meta_info": {**answer["meta_info"]}}
    entries = [list(e) for e in bad["meta_info"]["input_token_logprobs"]]
    entries[10][0] += 3 * LOGPROB_TOL
    bad["meta_info"]["input_token_logprobs"] = entries
    report = served_vs_reference(reference, prompt, bad, trials=2, max_trials=2)
    assert report["max_logprob_err"] == pytest.approx(3 * LOGPROB_TOL, rel=1e-6)
    assert report["worst_rows"][0][0] == 9  # entry 10 scores token 10: reference row 9


def test_a_confident_flip_is_counted(setup) -> None:
    reference, prompt, answer = setup
    logits = reference.forward(prompt, reference.new_cache(prompt_len=len(prompt))).double()
    top2 = logits.topk(2, dim=-1)
    row = int(((top2.values[:, 0] - top2.values[:, 1]) >= 0.1).nonzero()[0])
    bad = {**answer, "meta_info": {**answer["meta_info"]}}
    tops = [None if t is None else [list(x) for x in t]
            for t in bad["meta_info"]["input_top_logprobs"]]
    tops[row + 1][0][1] = int(top2.indices[row, 1])
    bad["meta_info"]["input_top_logprobs"] = tops
    report = served_vs_reference(reference, prompt, bad, trials=2, max_trials=2)
    assert report["confident_flips"] == 1


def test_entries_that_do_not_line_up_are_refused(setup) -> None:
    reference, prompt, answer = setup
    short = {**answer, "meta_info": {**answer["meta_info"]}}
    short["meta_info"]["input_token_logprobs"] = answer["meta_info"]["input_token_logprobs"][:-1]
    with pytest.raises(AssertionError, match="do not line up"):
        served_vs_reference(reference, prompt, short)


def _noisy_answer(reference, prompt: list[int], answer: dict, q_noise: float, seed: int) -> dict:
    """`answer` as the reference gives it under stage-1 noise (seed)."""
    from sala_sglang.testing.compare import _noisy_stage1

    return _answer_from(reference, prompt, answer, _noisy_stage1(q_noise, seed))


def _answer_from(reference, prompt: list[int], answer: dict, stage1) -> dict:
    """`answer` with every logprob taken from the reference with its block scoring passed
    through `stage1`."""
    from sala_sglang.testing.compare import _reference_logprobs

    sequence = prompt + answer["output_ids"]
    _, logprobs = _reference_logprobs(reference, sequence, len(prompt), stage1)
    noisy = {**answer, "meta_info": {**answer["meta_info"]}}
    # entry j (of the whole sequence) scores token j given tokens < j: reference row j - 1
    for key, first in (("input_token_logprobs", 0), ("output_token_logprobs", len(prompt))):
        noisy["meta_info"][key] = [
            e if e[0] is None else [float(logprobs[j - 1, sequence[j]]), *e[1:]]
            for j, e in enumerate(answer["meta_info"][key], start=first)
        ]
    return noisy


@pytest.fixture(scope="module")
def sparse_setup(setup):
    reference = setup[0]
    gen = torch.Generator().manual_seed(1)
    prompt = [1] + torch.randint(5, reference.config.vocab_size, (300,), generator=gen).tolist()
    return reference, prompt, _fake_answer(reference, prompt, 4)


def test_rounding_sized_selection_misses_are_excused_within_the_noise_count(sparse_setup) -> None:
    # An answer that is one of the check's own noise trials: each of its misses is a position
    # the noise moves, and there are no more of them than the worst trial has.
    reference, prompt, answer = sparse_setup
    noise = 3e-2
    report = served_vs_reference(reference, prompt, _noisy_answer(reference, prompt, answer,
                                                                  noise, seed=2),
                                 q_noise=noise, trials=4)
    assert report["noisy_reference_misses"] > 0, report
    assert 0 < report["selection_excused"] <= report["noisy_reference_misses"], report


def test_misses_that_only_a_later_noise_trial_makes_are_excused_by_the_extra_trials(
        sparse_setup) -> None:
    # The answer is noise trial 2 of the check; trial 0 alone leaves one of its misses
    # unexplained, so the check goes on (up to max_trials) until trial 2 explains it.
    reference, prompt, answer = sparse_setup
    noise = 3e-2
    noisy = _noisy_answer(reference, prompt, answer, noise, seed=2)
    short = served_vs_reference(reference, prompt, noisy, q_noise=noise, trials=1, max_trials=1)
    assert short["max_logprob_err"] > LOGPROB_TOL and short["noise_trials"] == 1, short
    full = served_vs_reference(reference, prompt, noisy, q_noise=noise, trials=1, max_trials=16)
    assert full["max_logprob_err"] <= LOGPROB_TOL and full["noise_trials"] == 3, full
    assert 0 < full["selection_excused"] <= full["noisy_reference_misses"], full


def test_a_spread_as_wide_as_the_noisy_references_passes_the_fp16_distribution_bounds(
        sparse_setup) -> None:
    # Noise this large spreads the reference itself past SPEC section 4's fp16 mean and p99 on
    # this sequence; an answer that is one of its trials is held to the noisy spread instead.
    from sala_sglang.testing.compare import (
        FP16_MEAN_LOGPROB_ERR,
        FP16_P99_LOGPROB_ERR,
        TestPositions,
        _assert_within_tolerances,
        _served_vs_reference,
    )

    reference, prompt, answer = sparse_setup
    noise = 0.2
    noisy = _noisy_answer(reference, prompt, answer, noise, seed=2)
    report, errors = _served_vs_reference(reference, prompt, noisy, noise, 4, 64, None)
    assert report["all_mean_err"] > FP16_MEAN_LOGPROB_ERR, report
    assert report["all_p99_err"] > FP16_P99_LOGPROB_ERR, report
    _assert_within_tolerances(report, bf16=False)
    positions = TestPositions()
    positions.add(errors, report["noisy_mean_err"], report["noisy_p99_err"])
    positions.check()


def test_a_small_bias_at_every_position_fails_the_fp16_mean(sparse_setup) -> None:
    # Every logprob 0.02 off: within LOGPROB_TOL at each position, but SPEC section 4's fp16
    # mean is 0.01, and no rounding-sized noise explains a bias: alone, and within a test whose
    # third request is exact.
    from sala_sglang.testing.compare import check_served, one_test

    reference, prompt, answer = sparse_setup
    meta = answer["meta_info"]
    shifted = {**answer, "meta_info": {**meta, **{
        key: [e if e[0] is None else [e[0] - 0.02, *e[1:]] for e in meta[key]]
        for key in ("input_token_logprobs", "output_token_logprobs")}}}
    report = served_vs_reference(reference, prompt, shifted)
    assert report["max_logprob_err"] <= LOGPROB_TOL and report["confident_flips"] == 0, report
    assert report["all_mean_err"] == pytest.approx(0.02, abs=2e-3), report
    with pytest.raises(AssertionError, match="all_mean_err"):
        with one_test():
            check_served(reference, prompt, shifted, mode="biased")
    with pytest.raises(AssertionError, match="all_mean_err"):
        with one_test():
            check_served(reference, prompt, answer, mode="exact")
            for _ in range(2):
                check_served(reference, prompt, shifted, mode="biased")


def test_the_fp16_distribution_is_held_over_a_test_s_positions_not_each_request_s() -> None:
    # A prefix-cache hit's request scores a dozen positions (measured on an H100: 12 at mean
    # 0.0146, max 0.033); beside its first request's 711 they are within SPEC section 4's
    # mean, alone they are not. Every request still meets the per-position rules itself.
    import torch

    from sala_sglang.testing.compare import FP16_MEAN_LOGPROB_ERR, TestPositions

    hit = torch.full((12,), 0.0146, dtype=torch.float64)
    alone = TestPositions()
    alone.add(hit, 0.0, 0.0)
    with pytest.raises(AssertionError, match="all_mean_err"):
        alone.check()
    both = TestPositions()
    both.add(torch.full((711,), 0.004, dtype=torch.float64), 0.0, 0.0)
    both.add(hit, 0.0, 0.0)
    summary = both.check()
    assert summary["positions"] == 723 and summary["all_mean_err"] < FP16_MEAN_LOGPROB_ERR
    # the widest noisy-reference spread of any request is the test's bound
    wide = TestPositions()
    wide.add(hit, 0.02, 0.0)
    wide.check()


def test_a_miss_that_one_near_tie_taken_the_other_way_explains_is_excused(sparse_setup) -> None:
    # At position 184 of this prompt the reference picks block 3 over block 4 at an exact tie
    # (they share their best window); taking it the other way moves that row's logprob past
    # LOGPROB_TOL. An answer computed that way is what a kernel that rounds the tie the other
    # way serves: excused, and the pair named. Off by more, the same row is reported.
    from sala_sglang.testing.compare import _near_tie_swaps, _swapped_stage1

    reference, prompt, answer = sparse_setup
    sequence = prompt + answer["output_ids"]
    swap = (184, 0, 0, 3, 4, 0.0)
    assert swap in _near_tie_swaps(reference, sequence, len(prompt), [184], rel=0.0)
    swapped = _answer_from(reference, prompt, answer, _swapped_stage1(*swap[:5]))
    entry = swapped["meta_info"]["input_token_logprobs"][185]
    assert abs(entry[0] - answer["meta_info"]["input_token_logprobs"][185][0]) > LOGPROB_TOL

    # q_noise this small moves nothing, so only the near-tie search can excuse the row
    report = served_vs_reference(reference, prompt, swapped, q_noise=1e-9, trials=1,
                                 max_trials=1, tie_rel=1e-3)
    assert report["tie_excused"] == 1 and report["near_ties"] == [swap], report
    assert report["max_logprob_err"] <= LOGPROB_TOL and report["selection_excused"] == 0, report

    entries = [list(e) for e in swapped["meta_info"]["input_token_logprobs"]]
    entries[185][0] += 3 * LOGPROB_TOL
    off = {**swapped, "meta_info": {**swapped["meta_info"], "input_token_logprobs": entries}}
    report = served_vs_reference(reference, prompt, off, q_noise=1e-9, trials=1, max_trials=1,
                                 tie_rel=1e-3)
    assert report["tie_excused"] == 0 and report["worst_rows"][0][0] == 184, report
    assert report["max_logprob_err"] > 2 * LOGPROB_TOL, report


def test_a_failed_check_writes_the_served_answer_where_asked(setup, tmp_path, monkeypatch) -> None:
    import json

    from sala_sglang.testing.compare import FAILED_DUMP_ENV, check_served

    reference, prompt, answer = setup
    monkeypatch.setenv(FAILED_DUMP_ENV, str(tmp_path))
    check_served(reference, prompt, answer, mode="exact")
    assert not list(tmp_path.iterdir())
    wrong = {**answer, "meta_info": {**answer["meta_info"]}}
    entries = [list(e) for e in answer["meta_info"]["output_token_logprobs"]]
    entries[1][0] -= 0.2
    wrong["meta_info"]["output_token_logprobs"] = entries
    with pytest.raises(AssertionError):
        check_served(reference, prompt, wrong, mode="wrong")
    [dumped] = tmp_path.iterdir()
    saved = json.loads(dumped.read_text())
    assert saved["label"] == {"mode": "wrong"} and saved["prompt"] == prompt
    assert saved["result"]["output_ids"] == answer["output_ids"]
