"""Models configured with ``deidentify: true`` see no patient, and their results still go
back to the right one.

The gateway runs as a subprocess with two test bundles that check, inside the model, what
they were given: an image model that walks every attribute of every dataset it receives
(no name, no ID, no date, no original UID) and a text model that looks for the patient's
name, ID and dates in the report text.  Both raise if they see any, so a leak turns into a
dead letter, not a result.  Their results go to a dcmtk storescp and an MLLP sink: the SR
and SEG must file under the original study and reference the original instances, the ORU
must name the original patient.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import numpy as np
import pydicom
import pytest

pytest.importorskip("torch")

from tests.ctstudy import write_ct_series
from tests.dicomgen import dcmtk_env, free_port, storescp_args, wait_for_port
from tests.gatewayproc import GatewayProcess, write_config
from tests.hl7msgs import oru_r01, send_mllp
from tests.integration.test_inference_pipeline import build_job, spool_of, wait_for
from tests.mllpsink import MLLPSink

pytestmark = pytest.mark.timeout(300)

PATIENT, PATIENT_ID, ACCESSION = "PRIVACY^PRUDENCE", "MRN4455667", "ACCPRIV99"
# what the generated CT carries besides (tests/ctstudy.py): birth date, study date and
# time, referring physician
PHI = [PATIENT, "PRIVACY", "PRUDENCE", PATIENT_ID, ACCESSION, "19600101", "20240301", "REFERRER"]
NODULE = {"system": "SCT", "value": "786838002", "meaning": "Nodule of lung"}


def write_bundle(root: Path, name: str, gateway_section: dict[str, Any], code: str) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(b"x")
    (root / "configs" / "inference.json").write_text("{}")
    (root / "configs" / "metadata.json").write_text(
        json.dumps({"name": name, "version": "1.0.0", "gateway": gateway_section})
    )
    (root / "infer.py").write_text(textwrap.dedent(code))
    return root


def peek_image_bundle(root: Path, seen: Path) -> Path:
    """An image model that fails if any dataset it gets names the patient or a date, and
    writes down the UIDs it saw."""
    code = f"""
        import json
        import numpy as np

        PHI = {PHI!r}
        SEEN = {str(seen)!r}

        def run(volume_hu, spacing, *, affine, datasets=None):
            if datasets is None:  # the warm-up: a blank volume, no datasets
                return {{"findings": []}}
            for ds in datasets:
                assert ds.PatientIdentityRemoved == "YES"
                for elem in ds.iterall():
                    if elem.tag.is_private:
                        raise AssertionError(f"private attribute {{elem.tag}} reached the model")
                    if elem.VR in ("SQ", "OB", "OW", "UN"):
                        continue
                    value = str(elem.value or "")
                    if elem.VR == "PN" and value:
                        raise AssertionError(f"{{elem.keyword}} reached the model")
                    if elem.VR in ("DA", "DT", "TM") and value and not value.startswith("1900"):
                        raise AssertionError(f"{{elem.keyword}} (a date) reached the model")
                    for secret in PHI:
                        if secret in value:
                            raise AssertionError(f"{{elem.keyword}} holds patient data")
            with open(SEEN, "w") as f:
                json.dump({{
                    "study_uids": sorted({{str(ds.StudyInstanceUID) for ds in datasets}}),
                    "series_uids": sorted({{str(ds.SeriesInstanceUID) for ds in datasets}}),
                    "sop_uids": [str(ds.SOPInstanceUID) for ds in datasets],
                    "patient_names": sorted(
                        {{str(ds.get("PatientName") or "") for ds in datasets}}
                    ),
                }}, f)
            nx, ny, nz = volume_hu.shape
            centre = [nx // 2, ny // 2, nz // 2]
            mask = np.zeros(volume_hu.shape, dtype=np.uint8)
            mask[centre[0] - 2 : centre[0] + 3, centre[1] - 2 : centre[1] + 3,
                 centre[2] - 1 : centre[2] + 2] = 1
            centre_mm = (np.asarray(affine) @ np.array([*centre, 1.0]))[:3]
            finding = {{
                "label": 1, "finding": "lung nodule", "code": {NODULE!r},
                "centre_voxel": [float(c) for c in centre],
                "centre_mm": [float(c) for c in centre_mm],
                "diameter_mm": 6.0, "volume_mm3": 113.0, "probability": 0.9,
            }}
            return {{
                "findings": [finding],
                "classification": {{"nodule_present": True, "probability": 0.9}},
                "mask": mask,
            }}
    """
    section = {
        "input": "image",
        "entrypoint": "infer.py:run",
        "series_selection": {"Modality": "CT", "min_slices": 4},
        "outputs": {
            "kind": "segmentation+findings",
            "labels": {"1": {"finding": "lung nodule", "code": NODULE}},
            "classification": {"finding": "lung nodule present", "code": NODULE},
        },
    }
    return write_bundle(root, "peek-image", section, code)


def peek_text_bundle(root: Path, seen: Path) -> Path:
    """A note model that fails if the report text names the patient or a date."""
    code = f"""
        import re

        SECRETS = ["Prudence", "Privacy", {PATIENT_ID!r}, {ACCESSION!r}, "1970", "2026"]
        SEEN = {str(seen)!r}

        def run(text):
            if text == "No acute abnormality.":  # the warm-up
                return []
            for secret in SECRETS:
                if secret.lower() in text.lower():
                    raise AssertionError("the report text names the patient")
            with open(SEEN, "w") as f:
                f.write(text)
            status = "absent" if re.search(r"no pneumothorax", text, re.I) else "present"
            return [{{"finding": "pneumothorax", "status": status, "code": "36118008",
                      "meaning": "Pneumothorax"}}]
    """
    return write_bundle(root, "peek-text", {"input": "text", "entrypoint": "infer.py:run"}, code)


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, Path, MLLPSink, Path]]:
    folder = tmp_path_factory.mktemp("deid")
    received = folder / "pacs"
    received.mkdir()
    pacs_port = free_port()
    scp = subprocess.Popen(
        storescp_args(received, port=pacs_port),
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(pacs_port)
    with MLLPSink() as sink:
        config = write_config(
            folder,
            dicom={"study_complete_after": 1},
            destinations={
                "pacs": {"dicom": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}},
                "ehr": {"hl7": {"host": "127.0.0.1", "port": sink.port}},
            },
            models={
                "peek-image": {
                    "bundle": str(peek_image_bundle(folder / "peek-image", folder / "seen.json")),
                    "deidentify": True,
                },
                "peek-text": {
                    "bundle": str(peek_text_bundle(folder / "peek-text", folder / "seen.txt")),
                    "deidentify": True,
                },
            },
            routes=[
                {
                    "name": "ct",
                    "when": {"dicom": {"Modality": "CT"}},
                    "run": ["peek-image"],
                    "send": ["pacs"],
                },
                {
                    "name": "reports",
                    "when": {"hl7": {"MSH-9": "ORU^R01"}},
                    "run": ["peek-text"],
                    "send": ["ehr"],
                },
            ],
        )
        gw = GatewayProcess(config, folder / "gateway.log").start(timeout=60)
        try:
            yield gw, received, sink, folder
        finally:
            gw.stop()
            scp.terminate()
            scp.wait(timeout=10)


def test_an_image_model_sees_no_patient_and_its_results_file_under_the_original_study(
    site: tuple[GatewayProcess, Path, MLLPSink, Path], tmp_path: Path
) -> None:
    gw, received, _, folder = site
    volume = np.full((32, 32, 8), -800.0, dtype=np.float32)
    paths = write_ct_series(
        volume,
        (1.0, 1.0, 2.0),
        tmp_path / "ct",
        patient_name=PATIENT,
        patient_id=PATIENT_ID,
        accession=ACCESSION,
    )
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    study_uid = str(source[0].StudyInstanceUID)
    source_uids = {str(ds.SOPInstanceUID) for ds in source}
    gw.send_study(paths)

    job = build_job(gw, "peek-image")
    seen = json.loads((folder / "seen.json").read_text())
    # the model saw pseudonyms: one consistent study, none of the original UIDs, no name
    assert len(seen["study_uids"]) == 1 and seen["study_uids"][0] != study_uid
    assert seen["study_uids"][0].startswith("2.25.")
    assert len(set(seen["sop_uids"])) == len(paths) and not set(seen["sop_uids"]) & source_uids
    assert seen["patient_names"] == [""]

    # the crosswalk back is stored apart from the result, encrypted
    crosswalk = json.loads(spool_of(gw).get(job["payload"]["crosswalk"]))
    assert crosswalk[seen["study_uids"][0]] == study_uid
    assert {crosswalk[u] for u in seen["sop_uids"]} == source_uids
    stored = json.loads(spool_of(gw).get(job["payload"]["result"]))
    assert stored["input"]["deidentified"].startswith("DICOM PS3.15")
    for path in (gw.data_dir / "spool").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert study_uid.encode() not in blob and seen["study_uids"][0].encode() not in blob

    # results: SEG and SR under the original study, pointing at the original instances
    def arrived() -> list[pydicom.Dataset] | None:
        files = [pydicom.dcmread(p) for p in received.iterdir()]
        return files if {str(ds.Modality) for ds in files} >= {"SR", "SEG"} else None

    results = wait_for("the SR and SEG at the PACS", arrived, timeout=60)
    pseudonyms = {seen["study_uids"][0], *seen["series_uids"], *seen["sop_uids"]}
    for ds in results:
        assert str(ds.StudyInstanceUID) == study_uid
        assert str(ds.PatientName) == PATIENT and str(ds.PatientID) == PATIENT_ID
        values = {str(e.value) for e in ds.iterall() if e.VR == "UI"}
        assert not values & pseudonyms, "a pseudonymous UID reached the PACS"
        referenced = {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
        assert referenced & source_uids, ds.Modality


def test_a_note_model_reads_scrubbed_text_and_the_oru_names_the_original_patient(
    site: tuple[GatewayProcess, Path, MLLPSink, Path],
) -> None:
    gw, _, sink, folder = site
    text = (
        f"Prudence Privacy, MRN {PATIENT_ID}, born 01/01/1970, scanned on 2026-11-24 "
        "(Dr. Watson). No pneumothorax."
    )
    message = oru_r01(
        control_id="DEID0001", patient=PATIENT, mrn=PATIENT_ID, accession=ACCESSION, text=text
    )
    (ack,) = send_mllp(gw.hl7_port, [message])
    assert b"MSA|AA|DEID0001" in ack
    deadline = time.monotonic() + 60
    while not sink.received and time.monotonic() < deadline:
        time.sleep(0.2)
    (oru,) = sink.wait_for(1, timeout=5)
    seen = (folder / "seen.txt").read_text()
    assert "No pneumothorax." in seen and "[NAME]" in seen and "[DATE]" in seen
    assert "Watson" not in seen
    parsed = hl7.parse(oru.decode().replace("\n", "\r"))
    assert str(parsed.segment("PID")[5]) == PATIENT and PATIENT_ID in str(parsed.segment("PID")[3])
    obx = [s for s in parsed if str(s[0]) == "OBX"]
    assert any("Pneumothorax" in str(s[3]) or "36118008" in str(s[5]) for s in obx), oru
