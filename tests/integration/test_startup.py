"""Starting up: clear refusals instead of tracebacks or silent damage."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.gatewayproc import REPO, GatewayProcess, write_config


def run_gateway(config: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def test_port_in_use_is_a_clear_error_and_exit_1(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    port = yaml.safe_load(config.read_text())["dicom"]["port"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        r = run_gateway(config)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (dicom): Address already in use" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_missing_key_file_with_existing_data_refuses_to_start(tmp_path: Path) -> None:
    gw = GatewayProcess(write_config(tmp_path), tmp_path / "gateway.log").start()
    gw.stop()
    gw.key_file.rename(tmp_path / "keys.json.bak")
    r = run_gateway(gw.config)
    assert r.returncode == 1
    assert "is missing but" in r.stderr and "restore the key file from backup" in r.stderr
    assert not gw.key_file.exists()  # no new key was made


def test_key_file_readable_by_others_refuses_to_start(tmp_path: Path) -> None:
    gw = GatewayProcess(write_config(tmp_path), tmp_path / "gateway.log").start()
    gw.stop()
    gw.key_file.chmod(0o644)
    r = run_gateway(gw.config)
    assert r.returncode == 1
    assert "chmod 600" in r.stderr


def test_invalid_config_is_reported_with_file_and_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    text = config.read_text().replace("study_complete_after: 2", "study_complete_after: -1")
    config.write_text(text)
    r = run_gateway(config)
    assert r.returncode == 1
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "study_complete_after" in t)
    assert f"{config}:{line}: dicom.study_complete_after: Input should be greater than 0" in (
        r.stderr
    )
