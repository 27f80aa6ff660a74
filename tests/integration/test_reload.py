"""SIGHUP reloads the config without dropping associations; a bad file changes nothing."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import yaml
from pynetdicom import AE

from tests.dicomgen import dcmtk_env
from tests.gatewayproc import GatewayProcess, write_config
from tests.hl7msgs import oru_r01, send_mllp


def echo(port: int, aet: str) -> int:
    return subprocess.run(
        ["echoscu", "-aet", aet, "-aec", "AI_GATEWAY", "127.0.0.1", str(port)],
        capture_output=True, env=dcmtk_env(), timeout=30,
    ).returncode


def hangup_and_wait(gw: GatewayProcess, event: str, timeout: float = 10.0) -> None:
    assert gw.proc is not None
    before = gw.log().count(event)
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while gw.log().count(event) == before:
        assert time.monotonic() < deadline, f"no {event} after SIGHUP:\n{gw.log()[-2000:]}"
        time.sleep(0.1)


def test_sighup_applies_a_new_allow_list_without_dropping_an_open_association(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)
    gw = GatewayProcess(config, tmp_path / "gw.log").start()
    try:
        assert echo(gw.dicom_port, "NEWPACS") != 0
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", gw.dicom_port, ae_title="AI_GATEWAY")
        assert held.is_established

        cfg = yaml.safe_load(config.read_text())
        cfg["dicom"]["allowed_callers"].append({"ae_title": "NEWPACS", "hosts": ["127.0.0.1"]})
        cfg["hl7"]["allowed_senders"].append({"application": "LAB", "hosts": ["127.0.0.1"]})
        config.write_text(yaml.safe_dump(cfg))
        hangup_and_wait(gw, "config.reloaded")

        assert echo(gw.dicom_port, "NEWPACS") == 0
        lab = oru_r01(control_id="LAB0001", sender="LAB", facility="LABFAC")
        assert b"MSA|AA|LAB0001" in send_mllp(gw.hl7_port, [lab])[0]
        assert held.is_established and held.send_c_echo().Status == 0x0000  # not dropped
        held.release()
    finally:
        gw.stop()


def test_an_invalid_config_on_sighup_is_rejected_and_the_old_one_kept(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    gw = GatewayProcess(config, tmp_path / "gw.log").start()
    try:
        good = config.read_text()
        config.write_text(good.replace("study_complete_after: 2", "study_complete_aftr: 2"))
        hangup_and_wait(gw, "config.reload_rejected")
        assert "study_complete_aftr: unknown key" in gw.log()
        assert echo(gw.dicom_port, "ECHOSCU") == 0  # still serving on the old config
    finally:
        gw.stop()


def test_sighup_says_which_changed_settings_need_a_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    gw = GatewayProcess(config, tmp_path / "gw.log").start()
    try:
        cfg = yaml.safe_load(config.read_text())
        cfg["dicom"]["ae_title"] = "OTHER_AE"
        config.write_text(yaml.safe_dump(cfg))
        hangup_and_wait(gw, "config.reloaded")
        assert "dicom.ae_title" in gw.log() and "config.reload_needs_restart" in gw.log()
        assert echo(gw.dicom_port, "ECHOSCU") == 0  # still AI_GATEWAY until a restart
    finally:
        gw.stop()
