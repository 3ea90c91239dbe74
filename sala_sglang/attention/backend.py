"""Factory for `--attention-backend minicpm_flashinfer` (alias `minicpm_flashattn`).

SGLang builds what the factory returns for the sparse layers and, because the plugin registers
MiniCPM-SALA as a linear-attention hybrid, wraps it in its `HybridLinearAttnBackend` together with
our `LightningBackend`, dispatching each layer by id.
"""

from __future__ import annotations

from typing import Any

from sala_sglang.config import MiniCPMSALAConfig


def create_minicpm_backend(runner: Any) -> Any:
    """Build the sparse-layer backend; SGLang pairs it with the lightning one."""
    config = runner.model_config.hf_config
    if not isinstance(config, MiniCPMSALAConfig):
        raise ValueError(
            f"--attention-backend minicpm_flashinfer serves MiniCPM-SALA only, but the model's "
            f"config is {type(config).__name__}; choose another attention backend"
        )
    from sala_sglang.attention.sparse_backend import SparseLayerBackend

    return SparseLayerBackend(runner)
