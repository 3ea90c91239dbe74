"""docker/Dockerfile's essentials, read as text (no Docker needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.*)$", DOCKERFILE, re.M)


def test_base_image_is_cuda_13_devel_ubuntu_24_04() -> None:
    assert _instructions("FROM") == ["${CUDA_IMAGE}"]
    base = r"^ARG CUDA_IMAGE=nvidia/cuda:13\.0\.\d+-devel-ubuntu24\.04$"
    assert re.search(base, DOCKERFILE, re.M)


def test_installs_with_the_install_script() -> None:
    assert any(run.startswith("./install_minicpm_sala.sh ") for run in _instructions("RUN"))


def test_serves_on_port_30000_with_sala_sglang_serve() -> None:
    assert _instructions("EXPOSE") == ["30000"]
    (entrypoint,) = _instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == [
        "sala-sglang", "serve", "--host", "0.0.0.0", "--port", "30000"
    ]


def test_dockerignore_keeps_the_kit_and_venvs_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".device-kit", ".venv", "build", "*.egg-info"} <= set(ignored)
