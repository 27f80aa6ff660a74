"""Routing and delivery end to end: storescu -> gateway -> Orthanc, EHR -> gateway -> EHR
sink, with the destination going down, refusing, and the gateway killed mid-delivery."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread

from tests.dicomgen import (
    SeriesSpec,
    dataset_bytes,
    dcmtk_env,
    free_port,
    make_study,
    storescp_args,
    storescu_args,
)
from tests.gatewayproc import GatewayProcess, write_config
from tests.hl7msgs import oru_r01, send_mllp
from tests.mllpsink import MLLPSink
from tests.orthanc import Orthanc

FAST_RETRY = {"initial": 0.2, "max": 1, "give_up_after": 60}


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or check}")


def routed_config(tmp_path: Path, orthanc: Orthanc, sink: MLLPSink, **extra: Any) -> Path:
    return write_config(
        tmp_path,
        dicom={"study_complete_after": 1},
        destinations={
            "pacs": {"dicom": {"ae_title": orthanc.aet, "host": "127.0.0.1",
                               "port": orthanc.dicom_port}, "retry": FAST_RETRY},
            "ehr": {"hl7": {"host": "127.0.0.1", "port": sink.port, "ack_timeout": 2},
                    "retry": FAST_RETRY},
        },
        routes=[
            {"name": "ct-archive", "when": {"dicom": {"Modality": "CT"}}, "forward": ["pacs"]},
            {"name": "reports", "when": {"hl7": {"MSH-9": {"regex": "^(ORU|ADT)"}}},
             "forward": ["ehr"]},
        ],
        **extra,
    )


def pacs_is_storescp(config: Path, tmp_path: Path) -> tuple[int, Path]:
    """Point the 'pacs' destination at a storescp (port, output folder) instead of Orthanc:
    with unique file names it deduplicates nothing, so a resent instance would show."""
    port = free_port()
    cfg = yaml.safe_load(config.read_text())
    cfg["destinations"]["pacs"]["dicom"].update(ae_title="STORESCP", port=port)
    config.write_text(yaml.safe_dump(cfg))
    received = tmp_path / "storescp"
    received.mkdir()
    return port, received


def start_storescp(received: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*storescp_args(received, port=port), "+uf"], env=dcmtk_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


@pytest.fixture
def sink() -> Iterator[MLLPSink]:
    with MLLPSink() as s:
        yield s


def store(files: list[Path], port: int) -> None:
    r = subprocess.run(storescu_args(files, port=port, aet="STORESCU"), capture_output=True,
                       text=True, env=dcmtk_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_forwarded_study_arrives_in_orthanc_unchanged(
    tmp_path: Path, orthanc: Orthanc, sink: MLLPSink
) -> None:
    gw = GatewayProcess(routed_config(tmp_path, orthanc, sink), tmp_path / "gw.log").start()
    try:
        files = make_study(tmp_path / "s")  # five series, five transfer syntaxes, all CT/MR
        cts = [f for f in files if dcmread(f, stop_before_pixels=True).Modality == "CT"]
        store(files, gw.dicom_port)
        wait_until(lambda: len(orthanc.get("/instances")) == len(files), what="all in Orthanc")
    finally:
        gw.stop()
    assert cts  # the study has CT, so the whole study (MR too) is forwarded
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    assert sorted(orthanc.sop_instance_uids()) == sorted(sent)  # each exactly once
    for uid, f in sent.items():
        arrived = dcmread(__import__("io").BytesIO(orthanc.instance_file(uid)))
        original = dcmread(f)
        assert arrived.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert arrived.PixelData == original.PixelData, f.name


def test_hl7_report_is_forwarded_with_the_same_msh10(
    tmp_path: Path, orthanc: Orthanc, sink: MLLPSink
) -> None:
    gw = GatewayProcess(routed_config(tmp_path, orthanc, sink), tmp_path / "gw.log").start()
    try:
        message = oru_r01(control_id="FWD0001")
        assert b"MSA|AA|FWD0001" in send_mllp(gw.hl7_port, [message])[0]
        assert sink.wait_for(1) == [message]
    finally:
        gw.stop()


def test_destination_down_then_up_gets_everything_exactly_once(
    tmp_path: Path, orthanc: Orthanc, sink: MLLPSink
) -> None:
    """The receivers deduplicate nothing here (storescp with unique file names, the sink
    records every message), so a duplicate delivery would show."""
    sink.stop()
    config = routed_config(tmp_path, orthanc, sink)
    scp_port, received = pacs_is_storescp(config, tmp_path)
    gw = GatewayProcess(config, tmp_path / "gw.log").start()
    scp: subprocess.Popen[bytes] | None = None
    try:
        files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=6, rows=64, cols=64)])
        store(files, gw.dicom_port)
        messages = [oru_r01(control_id=f"DOWN{i:03d}") for i in range(5)]
        assert all(b"MSA|AA|" in a for a in send_mllp(gw.hl7_port, messages))
        time.sleep(3)  # both destinations are down: deliveries fail and are retried
        status = json.loads(gw.cli("queue", "status", "--json").stdout)
        assert status["jobs:deliver"].get("done", 0) == 0
        assert "job.retry" in gw.log()
        scp = start_storescp(received, scp_port)
        sink.start()
        wait_until(lambda: len(list(received.iterdir())) >= len(files), what="storescp")
        wait_until(lambda: len(sink.received) >= len(messages), what="the EHR sink")
        time.sleep(2)  # room for any duplicate to show up
    finally:
        gw.stop()
        if scp is not None:
            scp.terminate()
            scp.wait(timeout=10)
    got = sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                 for f in received.iterdir())
    assert got == sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    assert sorted(sink.received) == sorted(messages)  # each MSH-10 once


@pytest.mark.parametrize(("reply", "state"), [("AR", "dead"), ("AE", "ready")])
def test_ehr_refusal_is_a_dead_letter_and_an_error_is_retried(
    tmp_path: Path, orthanc: Orthanc, sink: MLLPSink, reply: str, state: str
) -> None:
    sink.reply = reply  # type: ignore[assignment]
    gw = GatewayProcess(routed_config(tmp_path, orthanc, sink), tmp_path / "gw.log").start()
    try:
        assert b"MSA|AA|" in send_mllp(gw.hl7_port, [oru_r01(control_id="REF0001")])[0]
        sink.wait_for(1)
        time.sleep(1.5)
        status = json.loads(gw.cli("queue", "status", "--json").stdout)
        if state == "dead":
            assert status["jobs:deliver"] == {"dead": 1}
            dead = json.loads(gw.cli("queue", "dead", "--json").stdout)
            assert "AR" in dead[0]["last_error"] and "Sink says no" in dead[0]["last_error"]
            # the operator fixes the EHR side and replays the dead letter
            sink.reply = "AA"
            assert gw.cli("queue", "retry", "--all").returncode == 0
            wait_until(lambda: json.loads(gw.cli("queue", "status", "--json").stdout)
                       ["jobs:deliver"] == {"done": 1}, what="replayed delivery")
        else:
            assert len(sink.received) >= 2  # retried, the same message each time
            assert set(sink.received) == {oru_r01(control_id="REF0001")}
            assert status["jobs:deliver"].get("dead", 0) == 0
    finally:
        gw.stop()


def test_a_down_destination_does_not_delay_another(
    tmp_path: Path, orthanc: Orthanc, sink: MLLPSink
) -> None:
    sink.reply = "NONE"  # the EHR hangs: every delivery there times out
    gw = GatewayProcess(routed_config(tmp_path, orthanc, sink), tmp_path / "gw.log").start()
    try:
        send_mllp(gw.hl7_port, [oru_r01(control_id="HANG0001")])
        files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=3, rows=64, cols=64)])
        store(files, gw.dicom_port)
        wait_until(lambda: len(orthanc.get("/instances")) == 3, timeout=15, what="Orthanc")
        # meanwhile the silent EHR's delivery timed out (ack_timeout 2 s) and is retried
        wait_until(lambda: "job.retry" in gw.log() and "no ACK" in gw.log(), timeout=15,
                   what="the EHR delivery to time out and be retried")
        status = json.loads(gw.cli("queue", "status", "--json").stdout)
        assert status["jobs:deliver"].get("dead", 0) == 0
    finally:
        gw.stop()


@pytest.mark.slow
def test_kill9_during_deliveries_loses_nothing(
    tmp_path: Path, orthanc: Orthanc, sink: MLLPSink
) -> None:
    config = routed_config(tmp_path, orthanc, sink)
    gw = GatewayProcess(config, tmp_path / "gw.log").start()
    files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=150, rows=256, cols=256)])
    messages = [oru_r01(control_id=f"K9{i:04d}") for i in range(40)]
    store(files, gw.dicom_port)
    sender = threading.Thread(target=send_mllp, args=(gw.hl7_port, messages))
    sender.start()
    sender.join()
    wait_until(lambda: len(orthanc.sop_instance_uids()) > 0 or len(sink.received) > 0,
               what="deliveries under way")
    gw.kill9()
    gw.start()
    try:
        wait_until(lambda: len(orthanc.get("/instances")) == len(files), timeout=60,
                   what="every instance in Orthanc")
        wait_until(lambda: set(sink.received) == set(messages), timeout=30,
                   what="every message at the EHR")
    finally:
        gw.stop()
    uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert set(orthanc.sop_instance_uids()) == uids
    # at-least-once: an instance in flight at the kill may arrive twice, and Orthanc keeps one
    for uid in list(uids)[:5]:
        assert dataset_bytes(orthanc.instance_file(uid))


def test_a_study_that_grows_after_delivery_is_rerouted_and_only_the_new_instance_sent(
    tmp_path: Path, orthanc: Orthanc, sink: MLLPSink
) -> None:
    config = routed_config(tmp_path, orthanc, sink)
    scp_port, received = pacs_is_storescp(config, tmp_path)
    scp = start_storescp(received, scp_port)
    gw = GatewayProcess(config, tmp_path / "gw.log").start()
    try:
        files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=3, rows=64, cols=64)])
        store(files[:2], gw.dicom_port)
        wait_until(lambda: len(list(received.iterdir())) == 2, what="the first two")
        store(files[2:], gw.dicom_port)  # a late instance: the study reopens
        wait_until(lambda: len(list(received.iterdir())) >= 3, what="the late instance")
        time.sleep(1.5)  # room for a needless resend to show
    finally:
        gw.stop()
        scp.terminate()
        scp.wait(timeout=10)
    got = sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                 for f in received.iterdir())
    assert got == sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)


def test_a_reloaded_destination_address_takes_effect_for_the_next_delivery(
    tmp_path: Path, orthanc: Orthanc, sink: MLLPSink
) -> None:
    import signal

    config = routed_config(tmp_path, orthanc, sink)
    gw = GatewayProcess(config, tmp_path / "gw.log").start()
    try:
        send_mllp(gw.hl7_port, [oru_r01(control_id="OLD0001")])
        sink.wait_for(1)
        with MLLPSink() as moved:
            cfg = yaml.safe_load(config.read_text())
            cfg["destinations"]["ehr"]["hl7"]["port"] = moved.port
            config.write_text(yaml.safe_dump(cfg))
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "config.reloaded" in gw.log(), what="the reload")
            send_mllp(gw.hl7_port, [oru_r01(control_id="NEW0001")])
            assert moved.wait_for(1) == [oru_r01(control_id="NEW0001")]
        assert sink.received == [oru_r01(control_id="OLD0001")]
    finally:
        gw.stop()
