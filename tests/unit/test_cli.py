"""`sala-sglang serve`: the SGLang command it builds, the tiny default, and no GPU in one line."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from sala_sglang.cli import main


def test_dry_run_builds_the_recommended_command_with_passthrough(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serve", "--model", str(tmp_path), "--dry-run", "--port", "31000"]) == 0
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[cmd.index("--model-path") + 1] == str(tmp_path)
    assert cmd[cmd.index("--attention-backend") + 1] == "minicpm_flashinfer"
    assert "--dense-as-sparse" in cmd and "--skip-server-warmup" in cmd
    assert cmd[-2:] == ["--port", "31000"]  # the user's flags come last and win


def test_no_dense_as_sparse_keeps_the_switch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["serve", "--model", str(tmp_path), "--dry-run", "--no-dense-as-sparse"])
    assert "--dense-as-sparse" not in capsys.readouterr().out


def test_without_a_model_the_tiny_checkpoint_is_written_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    main(["serve", "--dry-run"])
    tiny = tmp_path / "sala-sglang" / "tiny-seed0"
    assert (tiny / "config.json").is_file() and (tiny / "model.safetensors").is_file()
    stamp = (tiny / "model.safetensors").stat().st_mtime_ns
    main(["serve", "--dry-run"])
    assert (tiny / "model.safetensors").stat().st_mtime_ns == stamp
    assert str(tiny) in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_serve_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err


def test_other_commands_reject_unknown_flags() -> None:
    with pytest.raises(SystemExit):
        main(["make-tiny", "/tmp/x", "--port", "1"])


def test_check_runs_the_reference_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["check", "--cpu-only"]) == 0
    out = capsys.readouterr().out
    assert "300-token prompt" in out and "check: all good" in out
