"""install_minicpm_sala.sh without installing anything: syntax, help, dry runs, early failures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "install_minicpm_sala.sh"
MIRROR = "https://mirror.example/simple"


def _fake_cuda(tmp_path: Path) -> Path:
    """A CUDA_HOME whose nvcc reports CUDA 13.0, so dry runs do not need a real toolkit."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").touch()
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    return home


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), "--python", sys.executable, "--no-uv", *args],
        cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )


def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    out = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_min_python_matches_pyproject() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f'MIN_PYTHON="{meta["project"]["requires-python"].removeprefix(">=")}"' in (
        SCRIPT.read_text()
    )


def test_help_explains_every_option(tmp_path: Path) -> None:
    out = _run(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--venv", "--python", "--editable", "--no-cuda-build", "--index-url",
                   "--extra-index-url", "--no-uv", "--dry-run", "--help"):
        assert option in out.stdout


def test_unknown_option_fails_with_a_message(tmp_path: Path) -> None:
    out = _run(tmp_path, "--frobnicate")
    assert out.returncode != 0
    assert "unknown option '--frobnicate'" in out.stderr


def test_dry_run_shows_checks_venv_and_pip_commands_with_the_mirror(tmp_path: Path) -> None:
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        pytest.skip("this Python has no headers; the CUDA-build dry run would stop on them")
    cuda_home = _fake_cuda(tmp_path)
    out = _run(tmp_path, "--dry-run", "--index-url", MIRROR, "--extra-index-url", MIRROR + "2",
               CUDA_HOME=str(cuda_home))
    assert out.returncode == 0, out.stderr
    assert f"nvcc: {cuda_home}/bin/nvcc (CUDA 13.0)" in out.stdout
    assert f"-m venv {tmp_path}/.venv" in out.stdout
    pip_lines = [line for line in out.stdout.splitlines() if " -m pip install " in line]
    assert len(pip_lines) == 2  # the dependencies, then the project
    for line in pip_lines:
        assert f"--index-url {MIRROR} --extra-index-url {MIRROR}2" in line
    assert "torch==2.11.0" in pip_lines[0] and "sglang==0.5.16" in pip_lines[0]
    assert re.search(rf"SALA_SGLANG_CUDA=1 .* --no-build-isolation {ROOT}$", pip_lines[1])
    assert "MiniCPMSALAForCausalLM" in out.stdout
    assert not (tmp_path / ".venv").exists()


def test_dry_run_reuses_a_venv_and_can_skip_the_cuda_build(tmp_path: Path) -> None:
    venv_python = tmp_path / "env" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    out = _run(tmp_path, "--dry-run", "--no-cuda-build", "--editable", "--venv", "env",
               CUDA_HOME=str(tmp_path / "no-cuda"))
    assert out.returncode == 0, out.stderr
    assert f"reusing the virtual environment {tmp_path}/env" in out.stdout
    assert "-m venv" not in out.stdout and "nvcc:" not in out.stdout
    assert re.search(rf"SALA_SGLANG_CUDA=0 .* --no-build-isolation -e {ROOT}$", out.stdout, re.M)


def test_missing_nvcc_fails_clearly_before_installing(tmp_path: Path) -> None:
    path = os.pathsep.join(
        d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvcc").exists()
    )
    # An unreachable index: should the check ever let the install start, it fails at once.
    out = _run(tmp_path, "--index-url", "http://127.0.0.1:9/simple",
               PATH=path, CUDA_HOME=str(tmp_path / "no-cuda"))
    assert out.returncode != 0
    assert "nvcc (the CUDA compiler) not found" in out.stderr
    assert "--no-cuda-build" in out.stderr and "nothing was installed" in out.stderr
    assert not (tmp_path / ".venv").exists()


def test_nvcc_without_toolkit_headers_asks_for_cuda_home(tmp_path: Path) -> None:
    cuda_home = _fake_cuda(tmp_path)
    (cuda_home / "include" / "cuda_runtime.h").unlink()
    out = _run(tmp_path, "--dry-run", CUDA_HOME=str(cuda_home))
    assert out.returncode != 0
    assert f"no CUDA headers in {cuda_home}/include" in out.stderr
    assert "set CUDA_HOME to the toolkit root" in out.stderr
