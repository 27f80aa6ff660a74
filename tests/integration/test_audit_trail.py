"""The audit trail of a running gateway: who sent what, and where it went.

A gateway subprocess forwards CT to a dcmtk storescp and ORUs to an MLLP sink. After a
study, a report, a refused caller and a refused sender, its trail holds the matching
records with the identifiers an auditor may see (Study Instance UID, MSH-10), no patient
names, and `gateway audit verify` accepts it; editing one record makes verify fail at
that record.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from gateway.security.audit import trail_path
from tests.dicomgen import dcmtk_env, free_port, make_ct_series, storescp_args, storescu_args
from tests.gatewayproc import GatewayProcess, write_config
from tests.hl7msgs import oru_r01, send_mllp
from tests.mllpsink import MLLPSink

PATIENT, PATIENT_ID = "AUDIT^PATIENT^NAME", "PIDAUDIT9"


def wait_until(check: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def records(gw: GatewayProcess) -> list[dict[str, Any]]:
    path = trail_path(gw.data_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_trail_says_who_sent_what_and_where_it_went(tmp_path: Path) -> None:
    pacs_port = free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    with MLLPSink() as sink:
        config = write_config(
            tmp_path,
            dicom={"study_complete_after": 1},
            destinations={
                "pacs": {"dicom": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}},
                "ehr": {"hl7": {"host": "127.0.0.1", "port": sink.port}},
            },
            routes=[
                {"name": "ct", "when": {"dicom": {"Modality": "CT"}}, "forward": ["pacs"]},
                {"name": "oru", "when": {"hl7": {"MSH-9": "ORU^R01"}}, "forward": ["ehr"]},
            ],
        )
        pacs = subprocess.Popen(
            storescp_args(received, port=pacs_port),
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        gw = GatewayProcess(config, tmp_path / "gw.log").start()
        try:
            files = make_ct_series(
                tmp_path / "ct",
                count=4,
                rows=64,
                cols=64,
                patient_name=PATIENT,
                patient_id=PATIENT_ID,
            )
            study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            r = subprocess.run(
                storescu_args(files, port=gw.dicom_port),
                env=dcmtk_env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stdout + r.stderr
            send_mllp(gw.hl7_port, [oru_r01(control_id="AUDITMSG01", patient="AUDIT^PATIENT")])
            # refusals: an unknown calling AE, an unknown HL7 sender
            subprocess.run(
                [
                    "echoscu",
                    "-aet",
                    "INTRUDER",
                    "-aec",
                    "AI_GATEWAY",
                    "127.0.0.1",
                    str(gw.dicom_port),
                ],
                env=dcmtk_env(),
                capture_output=True,
                timeout=30,
            )
            send_mllp(gw.hl7_port, [oru_r01(control_id="AUDITMSG02", sender="LAB")])

            def complete() -> bool:
                events = {r["event"] for r in records(gw)}
                return {"instances-transferred", "message-transferred"} <= events

            wait_until(complete, what="both transfers in the audit trail")
        finally:
            gw.stop()
            pacs.terminate()
            pacs.wait(10)

    trail = records(gw)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for rec in trail:
        by_event.setdefault(rec["event"], []).append(rec)
    assert [r["detail"] for r in by_event["application-activity"]] == [
        "gateway started",
        "gateway stopped",
    ]

    assoc = [r for r in by_event["association"] if r["outcome"] == "success"]
    assert assoc[0]["actor"] == {"ae_title": "PACS", "host": "127.0.0.1"}

    (got,) = by_event["instances-received"]
    assert {"type": "study", "id": study_uid} in got["objects"]
    assert {"type": "sop-instance", "count": 4} in got["objects"]

    msg = next(r for r in by_event["message-received"])
    assert {"type": "message", "id": "AUDITMSG01"} in msg["objects"]
    assert msg["actor"]["application"] == "EHR"

    sent = by_event["instances-transferred"][0]
    assert sent["destination"]["node"] == "pacs" and sent["destination"]["ae_title"] == "STORESCP"
    assert {"type": "study", "id": study_uid} in sent["objects"]
    fwd = by_event["message-transferred"][0]
    assert fwd["destination"]["node"] == "ehr"
    assert {"type": "message", "id": "AUDITMSG01"} in fwd["objects"]

    alerts = by_event["security-alert"]
    assert any(a["actor"].get("ae_title") == "INTRUDER" for a in alerts)
    assert any(a["actor"].get("application") == "LAB" for a in alerts)

    text = trail_path(gw.data_dir).read_text()
    assert "AUDIT" not in text.replace("AUDITMSG", "") and PATIENT_ID not in text, "PHI in trail"

    ok = gw.cli("audit", "verify")
    assert ok.returncode == 0 and f"{len(trail)} records, hash chain intact" in ok.stdout

    # edit one record: verify fails at that record
    path = trail_path(gw.data_dir)
    lines = path.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if '"instances-received"' in line)
    lines[n] = lines[n].replace('"count":4', '"count":3')
    path.write_text("\n".join(lines) + "\n")
    bad = gw.cli("audit", "verify")
    assert bad.returncode == 1
    assert f"record {n + 1}: hash does not match its content (edited?)" in bad.stdout


def test_audit_records_are_copied_to_a_syslog_server_over_tls(tmp_path: Path) -> None:
    """gateway.audit.syslog: every record also goes to a syslog server as an RFC 5424
    message in RFC 5425 (octet-counted) framing over TLS, verified against its CA."""
    import socket
    import threading

    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    ctx = pki.server_context(require_client_cert=False)
    received = bytearray()
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(30)
            while b"gateway stopped" not in received:
                data = tls.recv(65536)
                if not data:
                    break
                received.extend(data)
        done.set()

    threading.Thread(target=serve, daemon=True).start()
    config = write_config(
        tmp_path,
        gateway={
            "audit": {
                "syslog": {"host": "127.0.0.1", "port": port, "tls": {"ca": str(pki.ca_cert)}}
            }
        },
    )
    gw = GatewayProcess(config, tmp_path / "gw.log").start()
    gw.stop()
    assert done.wait(30), gw.log()
    server.close()
    text = received.decode("utf-8", "replace")
    frames = [f for f in text.split("<") if "ai-gateway" in f]
    assert any("application-activity" in f and "gateway started" in f for f in frames), text
    # octet counting: each frame starts with its length and a space
    assert text.split(" ", 1)[0].isdigit(), text[:80]
    assert "<110>1 " in text  # facility 13 (log audit), severity 6 (info), RFC 5424 version 1


def test_a_refusal_repeated_within_the_window_is_written_once_then_counted(
    tmp_path: Path,
) -> None:
    """A modality retrying from an AE title that is not allowed: 15 refused associations
    in a few seconds (an 8 s window) are one record, then one more that counts the other
    14 (a slower machine may need two windows: every refusal is still accounted for); the
    next refusal after the window is written at once again."""
    config = write_config(tmp_path, gateway={"audit": {"repeat_window": 8}})
    gw = GatewayProcess(config, tmp_path / "gw.log").start()

    def intruder() -> None:
        r = subprocess.run(
            ["echoscu", "-aet", "INTRUDER", "-aec", "AI_GATEWAY", "127.0.0.1", str(gw.dicom_port)],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode != 0  # refused

    def alerts() -> list[dict[str, Any]]:
        return [
            r
            for r in records(gw)
            if r["event"] == "security-alert" and r["actor"].get("ae_title") == "INTRUDER"
        ]

    try:
        started = time.monotonic()
        for _ in range(15):
            intruder()
        took = time.monotonic() - started
        first = wait_until(alerts, what="the first refusal")
        if took < 7:  # all 15 inside the window (a loaded machine may take longer)
            assert len(first) == 1

        def accounted() -> int:
            """Refusals the trail accounts for: records written, plus the counts."""
            return sum(
                next((o["count"] for o in r["objects"] if o["type"] == "repeats"), 1)
                for r in alerts()
            )

        wait_until(lambda: accounted() == 15, 30, "the count of the repeats")
        counted = alerts()
        assert len(counted) < 15
        summaries = [r["detail"] for r in counted if "more like this within" in r["detail"]]
        assert summaries and all("DICOM association refused" in d for d in summaries)
        before = len(alerts())
        time.sleep(8.5)  # past any open window
        intruder()
        wait_until(lambda: len(alerts()) == before + 1, 30, "the next refusal, at once")
    finally:
        gw.stop()
    ok = gw.cli("audit", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
