"""SGLang model package (`SGLANG_EXTERNAL_MODEL_PACKAGE=sala_sglang.models` works too)."""

from sala_sglang.plugin import register

register()
