"""Studies and reports through the running gateway into the models, as a hospital sends them.

The gateway runs as a subprocess with the reference bundles and one bundle that always
fails.  storescu sends a synthetic chest CT with nodules of known position and size; the
lung model's stored result (decrypted here from the spool) finds them in patient
coordinates.  An ORU's report text goes through the note model.  The failing model's job
is retried once and then dead-lettered with its reason, while the gateway keeps receiving.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

pytest.importorskip("torch")

from gateway.infer.masks import decode_mask
from gateway.security.crypto import KeyStore, Sealer
from gateway.store.spool import Spool
from models.lung_nodules.synth import make_case
from tests.ctstudy import write_ct_series
from tests.dicomgen import SeriesSpec, dcmtk_env, free_port, make_study, storescu_args
from tests.gatewayproc import REPO, GatewayProcess, wait_until, write_config
from tests.hl7msgs import oru_r01, send_mllp

pytestmark = pytest.mark.timeout(300)

PATIENT, PATIENT_ID = "NODULE^TEST^PATIENT", "PIDNOD777"
ORIGIN = (-175.0, -175.0, 0.0)  # write_ct_series' default
SPACING = (0.7, 0.7, 2.5)
NODULES = [((110.0, 150.0, 50.0), 14.0), ((240.0, 200.0, 90.0), 20.0)]  # volume frame mm


def boom_bundle(root: Path) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(b"x")
    (root / "configs" / "inference.json").write_text("{}")
    (root / "configs" / "metadata.json").write_text(
        json.dumps(
            {
                "name": "boom",
                "version": "9.9.9",
                "gateway": {
                    "input": "image",
                    "entrypoint": "infer.py:run",
                    "series_selection": {"Modality": "MR", "min_slices": 4},
                },
            }
        )
    )
    (root / "infer.py").write_text(
        textwrap.dedent(
            """
            def run(volume_hu, spacing, *, affine):
                if volume_hu.max() > -1000:  # the blank warm-up volume passes
                    raise RuntimeError("this model always fails on real data")
                return {"findings": []}
            """
        )
    )
    return root


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("infer")
    config = write_config(
        folder,
        dicom={"study_complete_after": 1},
        destinations={
            "ehr": {"hl7": {"host": "127.0.0.1", "port": free_port()}},
        },
        models={
            "lung-nodules": {"bundle": str(REPO / "models" / "lung_nodules"), "timeout": 120},
            "report-findings": {"bundle": str(REPO / "models" / "report_findings")},
            "boom": {"bundle": str(boom_bundle(folder / "boom"))},
        },
        routes=[
            {
                "name": "chest-ct",
                "when": {"dicom": {"Modality": "CT"}},
                "run": ["lung-nodules"],
                "send": ["ehr"],
            },
            {"name": "mr", "when": {"dicom": {"Modality": "MR"}}, "run": ["boom"]},
            {
                "name": "reports",
                "when": {"hl7": {"MSH-9": "ORU^R01"}},
                "run": ["report-findings"],
                "send": ["ehr"],
            },
        ],
    )
    gw = GatewayProcess(config, folder / "gateway.log").start(timeout=60)
    yield gw
    gw.stop()
    log = gw.log()
    assert PATIENT.split("^")[0] not in log and PATIENT_ID not in log, "PHI in the log"


def storescu(gw: GatewayProcess, paths: list[Path]) -> None:
    r = subprocess.run(
        storescu_args(paths, port=gw.dicom_port),
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def jobs(gw: GatewayProcess, stage: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{gw.data_dir / 'queue.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT subject, state, attempts, last_error, payload FROM jobs WHERE stage = ?",
            (stage,),
        ).fetchall()
    finally:
        db.close()
    return [
        {"subject": s, "state": st, "attempts": a, "error": e, "payload": json.loads(p)}
        for s, st, a, e, p in rows
    ]


def wait_for(what: str, check: Any, timeout: float = 120.0) -> Any:
    return wait_until(what, check, timeout)


def spool_of(gw: GatewayProcess) -> Spool:
    return Spool(gw.data_dir / "spool", Sealer(KeyStore.open(gw.key_file, create=False)))


def build_job(gw: GatewayProcess, model: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((j for j in jobs(gw, "build") if j["payload"]["model"] == model), None)

    job: dict[str, Any] = wait_for(f"the {model} result", find)
    return job


def test_the_lung_model_finds_the_nodules_of_a_sent_ct_study(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    case = make_case(np.random.default_rng(11), spacing=SPACING, nodules_mm=NODULES)
    paths = write_ct_series(
        case.volume, case.spacing, tmp_path / "ct", patient_name=PATIENT, patient_id=PATIENT_ID
    )
    storescu(gateway, paths)
    job = build_job(gateway, "lung-nodules")
    assert job["payload"]["send"] == ["ehr"] and job["payload"]["route"] == "chest-ct"

    spool = spool_of(gateway)
    result = json.loads(spool.get(job["payload"]["result"]))
    assert result["model"]["name"] == "lung-nodules"
    assert len(result["model"]["weights_sha256"]) == 64
    assert result["classification"]["nodule_present"] is True
    sop_uids = set(result["input"]["sop_instance_uids"])
    assert len(sop_uids) == len(paths)
    for nodule in case.nodules:
        expected = np.add(ORIGIN, nodule.centre_mm)  # axial: LPS = origin + volume frame
        near = [
            f
            for f in result["findings"]
            if np.linalg.norm(np.subtract(f["centre_mm"], expected)) < 3.0
        ]
        assert near, (nodule, result["findings"])
        assert near[0]["diameter_mm"] == pytest.approx(nodule.diameter_mm, rel=0.25)
        assert near[0]["referenced_sop_instance_uid"] in sop_uids
    mask = decode_mask(spool.get(job["payload"]["mask"]))
    assert mask.shape == case.volume.shape and mask.any()

    status = json.loads(gateway.cli("queue", "status", "--json").stdout)
    assert status["jobs:infer"].get("done", 0) >= 1


def test_the_note_model_reads_the_report_text_of_an_oru(gateway: GatewayProcess) -> None:
    text = "No pneumothorax. Small right pleural effusion. Possible RLL consolidation."
    (ack,) = send_mllp(gateway.hl7_port, [oru_r01(control_id="NOTE0001", text=text)])
    assert b"MSA|AA|NOTE0001" in ack
    job = build_job(gateway, "report-findings")
    result = json.loads(spool_of(gateway).get(job["payload"]["result"]))
    assert {f["finding"]: f["status"] for f in result["findings"]} == {
        "pneumothorax": "absent",
        "pleural_effusion": "present",
        "consolidation": "uncertain",
    }
    assert result["input"] == {"kind": "text", "characters": len(text)}


def test_a_failing_model_is_retried_once_then_dead_while_the_gateway_keeps_receiving(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    mr = make_study(tmp_path / "mr", series=[SeriesSpec("MR", count=6, rows=64, cols=64)])
    storescu(gateway, mr)

    def first_failure() -> dict[str, Any] | None:
        return next(
            (
                j
                for j in jobs(gateway, "infer")
                if j["payload"]["model"] == "boom" and j["attempts"] >= 1 and j["error"]
            ),
            None,
        )

    failed = wait_for("the first failure", first_failure)
    assert "this model always fails on real data" in failed["error"]
    # while the job waits for its retry, the gateway receives as usual
    more = make_study(tmp_path / "more", series=[SeriesSpec("US", count=2, rows=32, cols=32)])
    storescu(gateway, more)
    r = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "AI_GATEWAY", "127.0.0.1", str(gateway.dicom_port)],
        env=dcmtk_env(),
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0

    def dead() -> dict[str, Any] | None:
        return next(
            (
                j
                for j in jobs(gateway, "infer")
                if j["subject"] == failed["subject"] and j["state"] == "dead"
            ),
            None,
        )

    job = wait_for("the dead letter", dead, timeout=60)
    assert job["attempts"] == 2
    assert job["error"].startswith("gave up after 2 attempts: model 'boom' raised RuntimeError")
    listing = gateway.cli("queue", "dead")
    assert "this model always fails on real data" in listing.stdout
    assert gateway.get("/healthz")[0] == 200


def test_the_findings_store_compares_the_ct_result_with_its_final_report(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    """A CT study, then the radiologist's final report naming the same accession: both
    model runs are rows of the findings store (the study by its key, no patient data), and
    ``gateway findings stats`` counts the study as AI and report agreeing on a nodule."""
    case = make_case(np.random.default_rng(23), spacing=SPACING, nodules_mm=NODULES[:1])
    paths = write_ct_series(
        case.volume,
        case.spacing,
        tmp_path / "ct",
        patient_name=PATIENT,
        patient_id=PATIENT_ID,
        accession="ACCCONC1",
    )
    storescu(gateway, paths)

    def runs(model: str) -> list[dict[str, Any]]:
        out = gateway.cli("findings", "query", "--model", model, "--json").stdout
        return [json.loads(line) for line in out.splitlines()]

    before = {r["run_id"] for r in runs("lung-nodules")}
    mine = wait_for(
        "the CT's model run in the findings store",
        lambda: [r for r in runs("lung-nodules") if r["run_id"] not in before] or None,
    )
    study_key = mine[0]["study_key"]
    assert mine[0]["accession_ref"] and mine[0]["body_part"] == "CHEST"
    assert mine[0]["modality"] == "CT" and mine[0]["model_version"]
    assert len(mine[0]["weights_sha256"]) == 64
    assert mine[0]["status"] == "present" and mine[0]["concept"] == "lung-nodule"
    assert mine[0]["measurements"]["diameter_mm"][1] == "mm"
    assert mine[0]["received_at"] <= mine[0]["complete_at"] <= mine[0]["inferred_at"]

    report = (
        "FINDINGS: A 14 mm solid nodule in the right upper lobe. No pleural effusion.\n"
        "IMPRESSION: Right upper lobe pulmonary nodule."
    )
    (ack,) = send_mllp(
        gateway.hl7_port,
        [oru_r01(control_id="CONC0001", text=report, accession="ACCCONC1", mrn=PATIENT_ID)],
    )
    assert b"MSA|AA|CONC0001" in ack
    said = wait_for(
        "the report's model run",
        lambda: [r for r in runs("report-findings") if r["study_key"] == study_key] or None,
    )
    assert {r["report_status"] for r in said} == {"F"}  # OBX-11 F: a final report
    assert {(r["concept"], r["status"]) for r in said} >= {("lung-nodule", "present")}

    stats = json.loads(gateway.cli("findings", "stats", "--json").stdout)
    (nodules,) = [c for c in stats["concordance"] if c["image_model"] == "lung-nodules"]
    assert nodules["concept"] == "lung-nodule"
    assert nodules["true_positive"] >= 1 and nodules["false_negative"] == 0

    everything = gateway.cli("findings", "export", "--format", "csv", "-").stdout
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    for phi in (PATIENT_ID, "ACCCONC1", "NODULE", study_uid):
        assert phi not in everything

    # quality review: the study key back to the study, for the reason given, audited
    assert gateway.cli("findings", "reidentify", study_key[:12]).returncode != 0  # no reason
    shown = gateway.cli("findings", "reidentify", study_key[:12], "--reason", "QA review")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert study_uid in shown.stdout and "ACCCONC1" in shown.stdout
    (record,) = gateway.audit_records("re-identification")
    assert "QA review" in record["detail"] and study_key[:16] in record["detail"]
    assert {"type": "study", "id": study_uid} in record["objects"]
    narrowed = gateway.cli("findings", "query", "--study", study_key[:12], "--json").stdout
    assert {json.loads(line)["study_key"] for line in narrowed.splitlines()} == {study_key}
