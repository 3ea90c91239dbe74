"""SGLang model package; `SGLANG_EXTERNAL_MODEL_PACKAGE=sala_sglang.models` works too.

That way in loads no plugins, so importing the package registers what the model needs besides
its class (config, backends, hooks); SGLang finds the class itself by `EntryClass`.
"""

from sala_sglang.registration import register_with_sglang

register_with_sglang()
