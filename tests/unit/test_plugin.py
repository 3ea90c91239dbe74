"""Registration against the real, pip-installed SGLang (CPU only: nothing here needs a GPU)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("sglang")

from sala_sglang import (  # noqa: E402
    plugin,
    registration,
    server_args,  # noqa: E402
)
from sala_sglang.config import MiniCPMSALAConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sala_sglang.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def registered() -> None:
    plugin.register()


def _run_python(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter (so only SGLang's own loading registers us)."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _server_args(model_dir: Path, *extra: str):
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", str(model_dir), "--device", "cpu", *extra])
    return ServerArgs.from_cli_args(args)


def test_sglang_load_plugins_finds_our_entry_point(tiny_dir: Path) -> None:
    # A fresh interpreter: load_plugins() runs once per process, and only there is nothing but
    # the entry point registering us.
    result = _run_python(
        f"""
        import argparse, json
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        from sglang.srt.server_args import ServerArgs
        from sglang.srt.utils.hf_transformers.common import _CONFIG_REGISTRY
        from sglang.srt.utils.hf_transformers.config import get_config
        from sglang.srt.models.registry import ModelRegistry
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        args = parser.parse_args(["--model-path", {str(tiny_dir)!r},
                                  "--attention-backend", "minicpm_flashinfer", "--dense-as-sparse"])
        cls, arch = ModelRegistry.resolve_model_cls(["MiniCPMSALAForCausalLM"])
        print(json.dumps({{
            "backends": sorted(n for n in ATTENTION_BACKENDS if n.startswith("minicpm")),
            "config": _CONFIG_REGISTRY["minicpm_sala"].__module__,
            "loaded": type(get_config({str(tiny_dir)!r}, trust_remote_code=False)).__name__,
            "backend": args.attention_backend,
            "dense_as_sparse": args.dense_as_sparse,
            "model": cls.__module__ + "." + cls.__name__,
        }}))
        """
    )
    assert result == {
        "backends": ["minicpm_flashattn", "minicpm_flashinfer"],
        "config": "sala_sglang.config",
        "loaded": "MiniCPMSALAConfig",
        "backend": "minicpm_flashinfer",
        "dense_as_sparse": True,
        "model": "sala_sglang.models.minicpm_sala.MiniCPMSALAForCausalLM",
    }


def test_external_model_package_registers_without_plugins(tiny_dir: Path) -> None:
    # A fresh interpreter: SGLang reads SGLANG_EXTERNAL_MODEL_PACKAGE once, when its model
    # registry module is first imported.
    result = _run_python(
        f"""
        import json
        from sglang.srt.models.registry import ModelRegistry
        from sglang.srt.utils.hf_transformers.config import get_config
        cls, arch = ModelRegistry.resolve_model_cls(["MiniCPMSALAForCausalLM"])
        print(json.dumps({{
            "model": cls.__name__,
            "loaded": type(get_config({str(tiny_dir)!r}, trust_remote_code=False)).__name__,
        }}))
        """,
        SGLANG_EXTERNAL_MODEL_PACKAGE="sala_sglang.models",
        SGLANG_PLUGINS="no-such-plugin",  # keep the entry point out of this process
    )
    assert result == {"model": "MiniCPMSALAForCausalLM", "loaded": "MiniCPMSALAConfig"}


def test_register_is_idempotent(registered: None) -> None:
    from sglang.srt import server_args

    plugin.register()
    plugin.register()
    for name in ("minicpm_flashinfer", "minicpm_flashattn"):
        assert server_args.ATTENTION_BACKEND_CHOICES.count(name) == 1


def test_both_backend_names_parse_and_dense_as_sparse_defaults_off(
    registered: None, tiny_dir: Path
) -> None:
    for name in ("minicpm_flashinfer", "minicpm_flashattn"):
        args = _server_args(tiny_dir, "--attention-backend", name)
        assert args.attention_backend == name
        assert server_args.dense_as_sparse(args) is False


def test_dense_as_sparse_survives_pickling_to_the_scheduler(
    registered: None, tiny_dir: Path
) -> None:
    args = _server_args(tiny_dir, "--attention-backend", "minicpm_flashinfer", "--dense-as-sparse")
    assert server_args.dense_as_sparse(pickle.loads(pickle.dumps(args))) is True


def test_config_loader_returns_our_class(registered: None, tiny_dir: Path) -> None:
    from sglang.srt.utils.hf_transformers.config import get_config

    config = get_config(str(tiny_dir), trust_remote_code=False)
    assert isinstance(config, MiniCPMSALAConfig)
    assert config.sparse_layer_ids[0] == 0
    assert config.sparse_layer_ids[-1] == config.num_hidden_layers - 1


def test_model_registry_resolves_our_class(registered: None) -> None:
    from sglang.srt.models.registry import ModelRegistry

    from sala_sglang.models.minicpm_sala import MiniCPMSALAForCausalLM

    cls, arch = ModelRegistry.resolve_model_cls(["MiniCPMSALAForCausalLM"])
    assert cls is MiniCPMSALAForCausalLM and arch == "MiniCPMSALAForCausalLM"


def test_registration_failure_is_loud(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise ImportError("no module named sglang.srt.somewhere")

    monkeypatch.setattr(registration, "_registered", False)
    monkeypatch.setattr(registration, "_register_config", broken)
    with pytest.raises(registration.RegistrationError, match="supports SGLang 0.5.16"):
        plugin.register()
    assert registration._registered is False
