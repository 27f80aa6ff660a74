"""Structured results end to end, from outside, as a hospital would see them.

The gateway runs as a subprocess on the shipped config (ports, data paths and bundle paths
localised) with two destinations added: Orthanc as the PACS and an MLLP sink as the EHR,
and the shipped routes told to send there.  storescu sends a synthetic chest CT with
nodules: an SR and a SEG arrive in Orthanc, filed under the same study (read back over
its REST API), and an ORU^R01 arrives at the sink.  python-hl7 sends a report: its ORU
comes back with the right present/absent findings.  Sending the study again makes the
results again, with the same SOP Instance UIDs: replaced, not duplicated.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import numpy as np
import pytest
import yaml
from pydicom import dcmread

pytest.importorskip("torch")

from gateway.results.oru import validate
from models.lung_nodules.synth import make_case
from tests.ctstudy import write_ct_series
from tests.dicomgen import dcmtk_env, free_port, storescu_args
from tests.dicomvalidate import dciodvfy_errors, dsrdump_ok
from tests.gatewayproc import REPO, GatewayProcess, wait_until
from tests.hl7msgs import oru_r01, send_mllp
from tests.mllpsink import MLLPSink
from tests.orthanc import Orthanc

pytestmark = pytest.mark.timeout(300)

SHIPPED = REPO / "config" / "gateway.yaml"
NODULES = [((110.0, 150.0, 50.0), 14.0), ((240.0, 200.0, 90.0), 20.0)]


def site_config(folder: Path, orthanc: Orthanc, sink: MLLPSink) -> Path:
    cfg = yaml.safe_load(SHIPPED.read_text())
    cfg["gateway"]["data_dir"] = str(folder / "var")
    cfg["gateway"]["encryption_key_file"] = str(folder / "var" / "keys.json")
    cfg["gateway"]["min_free_mb"] = 16  # not the shipped 1 GB: CI disks can be nearly full
    cfg["gateway"]["http"]["port"] = free_port()
    cfg["dicom"]["port"] = free_port()
    cfg["dicom"]["study_complete_after"] = 1
    cfg["hl7"]["port"] = free_port()
    for model in cfg["models"].values():
        model["bundle"] = str((SHIPPED.parent / model["bundle"]).resolve())
    fast = {"initial": 0.5, "max": 2, "give_up_after": 120}
    cfg["destinations"] = {
        "pacs": {
            "dicom": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
            "retry": fast,
        },
        "ehr": {"hl7": {"host": "127.0.0.1", "port": sink.port}, "retry": fast},
    }
    routes = {r["name"]: r for r in cfg["routes"]}
    routes["chest-ct"]["send"] = ["pacs", "ehr"]
    routes["radiology-reports"]["send"] = ["ehr", "pacs"]
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, Orthanc, MLLPSink]]:
    folder = tmp_path_factory.mktemp("site")
    pacs = Orthanc(folder / "orthanc").start()
    with MLLPSink() as sink:
        gw = GatewayProcess(site_config(folder, pacs, sink), folder / "gateway.log").start(60)
        try:
            yield gw, pacs, sink
        finally:
            gw.stop()
            pacs.stop()


def instances_by_modality(pacs: Orthanc) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for orthanc_id in pacs.get("/instances"):
        tags = pacs.get(f"/instances/{orthanc_id}/simplified-tags")
        found.setdefault(str(tags.get("Modality")), []).append(tags)
    return found


def oru_messages(sink: MLLPSink) -> list[hl7.Message]:
    return [hl7.parse(m.decode("utf-8", "replace")) for m in sink.received]


def test_a_chest_ct_comes_back_as_sr_seg_and_oru(
    site: tuple[GatewayProcess, Orthanc, MLLPSink], tmp_path: Path
) -> None:
    gw, pacs, sink = site
    case = make_case(np.random.default_rng(11), spacing=(0.7, 0.7, 2.5), nodules_mm=NODULES)
    paths = write_ct_series(case.volume, case.spacing, tmp_path / "ct", accession="ACCE2E1")
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    r = subprocess.run(
        storescu_args(paths, port=gw.dicom_port, aet="STORESCU"),
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr

    got = wait_until(
        "an SR and a SEG in Orthanc",
        lambda: (m := instances_by_modality(pacs)).get("SR") and m.get("SEG") and m,
        120,
    )
    (sr_tags,), (seg_tags,) = got["SR"], got["SEG"]
    assert sr_tags["StudyInstanceUID"] == seg_tags["StudyInstanceUID"] == study_uid
    studies = pacs.get("/studies")
    assert len(studies) == 1, "filed under the source study, not a new one"
    sr_path, seg_path = tmp_path / "sr.dcm", tmp_path / "seg.dcm"
    sr_path.write_bytes(pacs.instance_file(sr_tags["SOPInstanceUID"]))
    seg_path.write_bytes(pacs.instance_file(seg_tags["SOPInstanceUID"]))
    # what the PACS holds is valid: the DICOM validator and dcmtk's SR reader agree
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(seg_path) == []
    ok, dump = dsrdump_ok(sr_path)
    assert ok, dump
    sr = dcmread(sr_path)
    assert sr.PatientID == "PIDNOD1" and sr.AccessionNumber == "ACCE2E1"
    text = str(sr.ContentSequence)
    assert "786838002" in text  # the nodule finding code

    (oru,) = wait_until("an ORU at the EHR", lambda: oru_messages(sink), 120)
    validate(sink.received[0].decode("utf-8"))  # hl7apy STRICT, as it arrived
    assert str(oru.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    obx = list(oru.segments("OBX"))
    assert any("786838002" in str(o[3]) for o in obx), str(oru)
    assert all(str(o[11]) == "P" for o in obx)
    assert str(oru.segment("OBR")[3]).startswith("ACCE2E1")
    first_sr_uid = sr_tags["SOPInstanceUID"]

    # the PACS sends the study again: it is processed again, and the results come out
    # with the same UIDs, so the PACS replaces them
    r = subprocess.run(
        storescu_args(paths, port=gw.dicom_port, aet="STORESCU"),
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    wait_until("the second ORU", lambda: len(sink.received) >= 2, 120)
    wait_until(
        "every delivery done",
        lambda: set(gw.queue_status().get("jobs:deliver", {})) == {"done"},
        120,
    )
    assert gw.queue_status()["jobs:deliver"]["done"] == 4  # SEG+SR to pacs, ORU to ehr, twice
    found = instances_by_modality(pacs)
    assert [t["SOPInstanceUID"] for t in found["SR"]] == [first_sr_uid], "replaced, not added"
    assert len(found["SEG"]) == 1
    msh10 = [str(m.segment("MSH")[10]) for m in oru_messages(sink)]
    assert msh10[0] == msh10[1], "the same result identity"

    # the audit trail says where each result went: the SR and SEG to the PACS under the
    # study's UID, the ORU to the EHR by its MSH-10; and the chain verifies
    to_pacs = [
        r
        for r in gw.audit_records("instances-transferred")
        if {"type": "study", "id": study_uid} in r["objects"]
    ]
    assert len(to_pacs) == 2 and all(r["outcome"] == "success" for r in to_pacs)
    to_ehr = gw.audit_records("message-transferred")
    assert {"type": "message", "id": msh10[0]} in to_ehr[0]["objects"]
    assert gw.cli("audit", "verify").returncode == 0


def test_a_report_comes_back_as_an_oru_with_its_findings(
    site: tuple[GatewayProcess, Orthanc, MLLPSink],
) -> None:
    gw, pacs, sink = site
    before = len(sink.received)
    text = "No pneumothorax. Small right pleural effusion. Possible RLL consolidation."
    # the report of the CT sent above: same accession number
    report = oru_r01(control_id="E2EREP01", text=text, accession="ACCE2E1")
    (ack,) = send_mllp(gw.hl7_port, [report])
    assert b"MSA|AA|E2EREP01" in ack
    wait_until("the report's ORU", lambda: len(sink.received) > before, 120)
    oru = oru_messages(sink)[-1]
    values = {
        str(o[3]).split("^")[0]: str(o[5]).split("^")[0]
        for o in oru.segments("OBX")
        if str(o[2]) == "CE"
    }
    assert values["36118008"] == "272519000"  # pneumothorax: absent
    assert values["60046008"] == "52101004"  # pleural effusion: present
    assert values["95436008"] == "373068000"  # consolidation: undetermined
    assert str(oru.segment("PID")[5]) == "DOE^JANE"  # copied from the report

    # the report names a stored study by accession: its findings go to the PACS as an SR
    # filed under that study
    def report_sr() -> list[dict[str, Any]]:
        return [
            t
            for t in instances_by_modality(pacs).get("SR", [])
            if "report-findings" in str(t.get("SeriesDescription", ""))
        ]

    (tags,) = wait_until("the report's SR in Orthanc", report_sr, 120)
    assert len(pacs.get("/studies")) == 1
    sr = dcmread(io.BytesIO(pacs.instance_file(tags["SOPInstanceUID"])))
    assert sr.AccessionNumber == "ACCE2E1"
    assert "36118008" in str(sr.ContentSequence) and "272519000" in str(sr.ContentSequence)
