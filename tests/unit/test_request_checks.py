"""Prompt token ids outside the vocabulary are refused (HTTP 400) before they reach the GPU,
through SGLang's own TokenizerManager._validate_one_request, which the plugin hooks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from sala_sglang import plugin  # noqa: E402
from sala_sglang.hooks import reject_out_of_vocab_ids  # noqa: E402


def _manager(hf_config) -> SimpleNamespace:
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config))


@pytest.mark.parametrize("bad", [-1, 256, 10**6, "7"])
def test_out_of_vocab_ids_are_refused(make_tiny_config, bad) -> None:
    manager = _manager(make_tiny_config())
    with pytest.raises(ValueError, match=r"vocabulary is \[0, 256\)"):
        reject_out_of_vocab_ids(manager, object(), [1, 5, bad])


def test_valid_ids_and_other_models_pass(make_tiny_config) -> None:
    assert reject_out_of_vocab_ids(_manager(make_tiny_config()), object(), [0, 1, 255]) is None
    assert reject_out_of_vocab_ids(_manager(make_tiny_config()), object(), []) is None
    # another model served next to the plugin: not ours to judge
    assert reject_out_of_vocab_ids(_manager(SimpleNamespace(vocab_size=10)), object(), [99]) is None


def test_the_hook_runs_inside_sglangs_validation(make_tiny_config) -> None:
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    plugin.register()
    manager = SimpleNamespace(model_config=SimpleNamespace(hf_config=make_tiny_config()))
    with pytest.raises(ValueError, match="token id 5000"):
        TokenizerManager._validate_one_request(manager, object(), [1, 5000])
