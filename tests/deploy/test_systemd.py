"""deploy/systemd: the units pass ``systemd-analyze verify`` without a word of complaint,
their hardening scores "OK" in ``systemd-analyze security --offline``, and they run the
gateway the way operations.md says: ``gateway run --role``, SIGHUP for reload, SIGTERM to
the supervisor alone with time to drain, a dedicated user, writable only its state."""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

import pytest

from gateway.config import read_config
from gateway.supervisor import DRAIN_TIMEOUT
from tests.deploy.tools import SYSTEMD, run, systemd_verify, tool

UNITS = ("gateway.service", "gateway@.service")


def copy_units(tmp_path: Path) -> Path:
    for unit in UNITS:
        shutil.copy(SYSTEMD / unit, tmp_path / unit)
    return tmp_path


def service(unit: str) -> dict[str, list[str]]:
    """The [Service] section, each directive with all its values (they repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (SYSTEMD / unit).read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    code, said = systemd_verify(copy_units(tmp_path), ["gateway.service", "gateway@worker.service"])
    assert code == 0 and said == "", said


def test_verify_fails_a_broken_unit(tmp_path: Path) -> None:
    folder = copy_units(tmp_path)
    unit = folder / "gateway.service"
    unit.write_text(unit.read_text().replace("PrivateTmp=yes", "PrivateTmp=perhaps"))
    _, said = systemd_verify(folder, ["gateway.service"])
    assert "Failed to parse boolean value" in said and "perhaps" in said


@pytest.mark.parametrize("instance", ["gateway.service", "gateway@worker.service"])
def test_the_hardening_scores_ok(tmp_path: Path, instance: str) -> None:
    """systemd's own exposure score (0 best, 10 worst); 'OK' is below 3.9.  The template's
    instance is analysed through its template file."""
    exe = tool("systemd-analyze", "apt-get install systemd")
    folder = copy_units(tmp_path)
    proc = run(
        [exe, "security", "--offline=yes", "--threshold=25", "--no-pager", f"./{instance}"],
        cwd=folder,
    )
    # --threshold=25: exit non-zero above an exposure of 2.5
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "Overall exposure level" in proc.stdout and "OK" in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize("unit", UNITS)
def test_the_units_run_the_gateway_as_operations_md_says(unit: str) -> None:
    s = service(unit)
    (start,) = s["ExecStart"]
    role = "%i" if unit.startswith("gateway@") else "all"
    assert start.startswith("/opt/gateway/bin/gateway run -c /etc/gateway/")
    assert start.endswith(f"--role {role}")
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["KillMode"] == ["mixed"], "SIGTERM to the supervisor only: it drains its processes"
    assert int(s["TimeoutStopSec"][0]) > DRAIN_TIMEOUT
    assert s["User"] == ["gateway"] and s["Group"] == ["gateway"]
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
    }.items():
        assert s[key] == [value], key
    sysusers = (SYSTEMD / "gateway.sysusers").read_text().split("\n")[1].split()
    assert sysusers[:2] == ["u", "gateway"]


def test_the_config_writes_only_where_the_unit_lets_it(tmp_path: Path) -> None:
    cfg = read_config(SYSTEMD / "gateway.yaml")
    s = service("gateway.service")
    writable = {Path(p) for line in s["ReadWritePaths"] for p in line.split()}
    state = {Path("/var/lib") / d for line in s["StateDirectory"] for d in line.split()}
    assert writable == state
    for path in (cfg.data_dir, cfg.spool_dir, cfg.key_file):
        assert any(path.is_relative_to(w) for w in writable), path
    # ports below 1024 would need a capability the unit does not give
    assert all(
        p is None or p >= 1024 for p in (cfg.dicom.port, cfg.hl7.port, cfg.gateway.http.port)
    )


def test_the_drop_ins_parse() -> None:
    for name in ("postgresql.conf", "gpu.conf"):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string((SYSTEMD / name).read_text())
        assert "Service" in parser
    credential = (SYSTEMD / "postgresql.conf").read_text()
    assert "LoadCredential=pg-password:/etc/gateway/credentials/pg-password" in credential
