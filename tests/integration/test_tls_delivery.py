"""The gateway's C-STORE SCU over TLS against dcmtk's `storescp +tls`: it presents its
client certificate, verifies the PACS's certificate, and refuses (retries, never sends in
clear) a PACS whose certificate its CA did not issue."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.certs import PKI, make_pki
from tests.dicomgen import (
    SeriesSpec,
    dcmtk_env,
    free_port,
    make_study,
    wait_for_port,
)
from tests.gatewayproc import GatewayProcess, wait_until, write_config

pytestmark = pytest.mark.timeout(120)


def storescp_tls(received: Path, port: int, server: PKI, trusted: PKI) -> subprocess.Popen[bytes]:
    """dcmtk storescp on TLS with *server*'s certificate, requiring a client certificate
    issued by *trusted*'s CA."""
    args = [
        "storescp",
        "+tls",
        str(server.server_key),
        str(server.server_cert),
        "+pw",
        "",
        "+cf",
        str(trusted.ca_cert),
        "-rc",
        "+xa",
        "-dhl",
        "-aet",
        "STORESCP",
        "-od",
        str(received),
        "+uf",
        str(port),
    ]
    return subprocess.Popen(
        args, env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return make_pki(tmp_path / "pki")


def gateway_to(folder: Path, port: int, pki: PKI) -> GatewayProcess:
    config = write_config(
        folder,
        dicom={"study_complete_after": 0.5},
        destinations={
            "pacs": {
                "dicom": {
                    "ae_title": "STORESCP",
                    "host": "127.0.0.1",
                    "port": port,
                    "tls": {
                        "ca": str(pki.ca_cert),
                        "cert": str(pki.client_cert),
                        "key": str(pki.client_key),
                    },
                },
                "retry": {"initial": 0.5, "max": 1, "give_up_after": 3600},
            }
        },
        routes=[{"name": "all", "when": {"dicom": {"Modality": "CT"}}, "forward": ["pacs"]}],
    )
    return GatewayProcess(config, folder / "gateway.log")


def deliver_jobs(gw: GatewayProcess) -> dict[str, Any]:
    jobs: dict[str, Any] = gw.queue_status().get("jobs:deliver", {})
    return jobs


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    return make_study(tmp_path / "ct", series=[SeriesSpec("CT", count=3, rows=32, cols=32)])


def test_a_study_reaches_a_tls_storescp_that_requires_our_certificate(
    tmp_path: Path, pki: PKI, study: list[Path]
) -> None:
    received = tmp_path / "pacs"
    received.mkdir()
    port = free_port()
    scp = storescp_tls(received, port, pki, pki)
    gw: GatewayProcess | None = None
    try:
        wait_for_port(port)
        gw = gateway_to(tmp_path, port, pki).start()
        gw.send_study(study)
        wait_until("the delivery", lambda: deliver_jobs(gw) == {"done": 1})
    finally:
        if gw is not None:
            gw.stop()
        scp.terminate()
        scp.wait(timeout=10)
    got = sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in received.iterdir())
    assert got == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in study)
    transferred = gw.audit_records("instances-transferred")
    assert transferred and transferred[-1]["outcome"] == "success"


def test_a_pacs_with_a_certificate_from_another_ca_gets_nothing(
    tmp_path: Path, pki: PKI, study: list[Path]
) -> None:
    impostor = make_pki(tmp_path / "impostor", prefix="impostor-")
    received = tmp_path / "pacs"
    received.mkdir()
    port = free_port()
    scp = storescp_tls(received, port, impostor, pki)  # trusts us, but we do not trust it
    gw: GatewayProcess | None = None
    try:
        wait_for_port(port)
        gw = gateway_to(tmp_path, port, pki).start()
        gw.send_study(study)
        wait_until("a retry naming TLS", lambda: "job.retry" in gw.log() and "TLS" in gw.log())
        assert deliver_jobs(gw).get("done") is None  # waiting to retry, not delivered
    finally:
        if gw is not None:
            gw.stop()
        scp.terminate()
        scp.wait(timeout=10)
    assert list(received.iterdir()) == []
