"""Per-request input checks that SGLang 0.5.16 leaves out for prompts given as token ids.

A token id outside [0, vocab_size) reaches the embedding lookup on the GPU, where it is a device
side assert that takes the whole scheduler down (seen on an H100 with the tiny checkpoint).
SGLang has a vocabulary check for input ids but never calls it; this hook rejects such requests
in the tokenizer manager instead, where a ValueError becomes an HTTP 400 with its message.
"""

from __future__ import annotations

from typing import Any

from sala_sglang.config import MiniCPMSALAConfig


def reject_out_of_vocab_ids(manager: Any, obj: Any, input_ids: Any, *args: Any,
                            **kwargs: Any) -> None:
    """Before `TokenizerManager._validate_one_request`: every prompt id must index the vocab."""
    config = manager.model_config.hf_config
    if not isinstance(config, MiniCPMSALAConfig) or not input_ids:
        return None
    vocab = config.vocab_size
    bad = next((t for t in input_ids if not isinstance(t, int) or t < 0 or t >= vocab), None)
    if bad is not None:
        raise ValueError(
            f"input_ids contains the token id {bad!r}; this model's vocabulary is [0, {vocab})"
        )
    return None
