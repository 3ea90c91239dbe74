"""The `sglang.srt.plugins` entry point: SGLang calls `register()` in every process it starts
(launcher, scheduler, workers).

A leaf: nothing in the package imports this module. What the other way in
(`SGLANG_EXTERNAL_MODEL_PACKAGE=sala_sglang.models`) needs too lives in `registration`.
"""

from __future__ import annotations

from sala_sglang.registration import register_with_sglang, registration_error
from sala_sglang.server_args import ARCHITECTURE


def register() -> None:
    """Register MiniCPM-SALA with SGLang; safe to call any number of times."""
    register_with_sglang()
    try:
        _register_model()
    except Exception as exc:
        raise registration_error(exc) from exc


def _register_model() -> None:
    from sglang.srt.models.registry import ModelRegistry

    from sala_sglang.models.minicpm_sala import MiniCPMSALAForCausalLM

    ModelRegistry.models[ARCHITECTURE] = MiniCPMSALAForCausalLM
