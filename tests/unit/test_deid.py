"""The basic de-identification profile, the UID crosswalk and the report-text scrubber."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from gateway.infer.text import identifiers_from_hl7, report_text_from_hl7
from gateway.security.deid import (
    DeidentificationError,
    Pseudonymizer,
    deidentify_dataset,
    deidentify_text,
    reidentify,
)
from tests.ctstudy import write_ct_series
from tests.hl7msgs import oru_r01

NAME, PID, ACCESSION = "PRIVACY^PRUDENCE", "MRN4455667", "ACCPRIV99"
UID_RE = r"^2\.25\.[1-9]\d*$"


def a_ct_slice(tmp_path: object) -> Dataset:
    from pathlib import Path

    (path,) = write_ct_series(
        np.full((8, 8, 1), -500.0, dtype=np.float32),
        (1.0, 1.0, 2.0),
        Path(str(tmp_path)) / "ct",
        patient_name=NAME,
        patient_id=PID,
        accession=ACCESSION,
    )
    ds = pydicom.dcmread(path)
    ds.InstitutionName = "ST ELSEWHERE HOSPITAL"
    ds.OperatorsName = "TECH^TOM"
    ds.OtherPatientIDs = "OTHER778899"
    ds.PatientAge = "064Y"
    ds.AcquisitionDateTime = "20240301093012"
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.ReferencedImageSequence = Sequence([ref])
    person = Dataset()
    person.PersonName = "NESTED^NAME"
    person.ObservationDateTime = "20240301"
    ds.RequestAttributesSequence = Sequence([person])
    block = ds.private_block(0x0011, "ACME PRIVATE", create=True)
    block.add_new(0x01, "LO", f"secret {PID}")
    return ds


def every_value(ds: Dataset) -> list[str]:
    values = []
    for elem in ds.iterall():
        if elem.VR not in ("SQ", "OB", "OW", "UN"):
            values.append(str(elem.value))
    return values


def test_the_basic_profile_leaves_no_name_id_or_date_and_keeps_the_image(tmp_path: object) -> None:
    ds = a_ct_slice(tmp_path)
    original = {k: str(ds.data_element(k).value) for k in ("StudyInstanceUID", "SOPInstanceUID")}
    pixels = ds.PixelData
    p = Pseudonymizer()
    deidentify_dataset(ds, p)

    text = "\n".join(every_value(ds))
    for secret in (NAME, "PRIVACY", PID, ACCESSION, "OTHER778899", "ELSEWHERE", "TOM", "NESTED"):
        assert secret not in text, secret
    # no date of any kind (UIDs left out: a random pseudonym's digits may hold "2024")
    dated = "\n".join(
        str(e.value) for e in ds.iterall() if e.VR not in ("SQ", "OB", "OW", "UN", "UI")
    )
    assert "2024" not in dated and "1960" not in dated
    assert not ds.get("PatientName") and not ds.get("PatientID")
    assert "PatientBirthDate" not in ds or not ds.PatientBirthDate
    assert "PatientAge" not in ds and not ds.get("InstitutionName")
    assert all(not elem.tag.is_private for elem in ds.iterall())
    for elem in ds.iterall():
        if elem.VR in ("DA", "DT", "TM"):
            assert not elem.value or str(elem.value).startswith("1900"), elem
    # what the model needs to build a volume is kept
    assert ds.PixelData == pixels and ds.Modality == "CT" and ds.RescaleSlope == 1
    assert ds.ImagePositionPatient and ds.PixelSpacing and ds.SOPClassUID
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    # UIDs: replaced, valid, consistent within the dataset and with the file meta
    assert ds.StudyInstanceUID != original["StudyInstanceUID"]
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    import re

    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert re.match(UID_RE, uid) and len(uid) <= 64
    assert p.crosswalk[ds.SOPInstanceUID] == original["SOPInstanceUID"]
    # and the result still writes and reads as DICOM
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert pydicom.dcmread(BytesIO(out.getvalue())).SOPInstanceUID == ds.SOPInstanceUID


def test_one_run_maps_a_study_consistently_and_another_run_differently(tmp_path: object) -> None:
    first = Pseudonymizer()
    study = generate_uid()
    assert first.uid(study) == first.uid(study)
    assert Pseudonymizer().uid(study) != first.uid(study)  # runs cannot be linked


def test_burned_in_annotation_is_refused(tmp_path: object) -> None:
    ds = a_ct_slice(tmp_path)
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationError, match="burned-in annotation"):
        deidentify_dataset(ds, Pseudonymizer())


def test_reidentify_puts_every_original_uid_back_and_leaves_the_rest() -> None:
    p = Pseudonymizer()
    study, sop = generate_uid(), generate_uid()
    result = {
        "input": {"study_uid": p.uid(study), "sop_instance_uids": [p.uid(sop)], "shape": [1, 2]},
        "findings": [{"referenced_sop_instance_uid": p.uid(sop), "finding": "nodule"}],
    }
    back = reidentify(result, p.crosswalk)
    assert back["input"] == {"study_uid": study, "sop_instance_uids": [sop], "shape": [1, 2]}
    assert back["findings"][0] == {"referenced_sop_instance_uid": sop, "finding": "nodule"}


def test_report_text_is_scrubbed_of_what_the_message_and_its_shape_give_away() -> None:
    text = (
        "Patient Prudence Privacy (MRN4455667), born 01/01/1970, seen 2026-11-24 "
        "and on March 3, 2025, by Dr. Watson; call 555-123-4567 or pp@example.org. "
        f"Accession {ACCESSION}. No pneumothorax. Small right pleural effusion."
    )
    message = oru_r01(patient=NAME, mrn=PID, accession=ACCESSION, text=text)
    scrubbed = deidentify_text(report_text_from_hl7(message), identifiers_from_hl7(message))
    for secret in ("Prudence", "Privacy", PID, "1970", "2026", "2025", "Watson", "555", "pp@"):
        assert secret not in scrubbed, (secret, scrubbed)
    assert ACCESSION not in scrubbed
    assert "No pneumothorax. Small right pleural effusion." in scrubbed
    assert "[NAME]" in scrubbed and "[ID]" in scrubbed and "[DATE]" in scrubbed


def test_identifiers_come_from_the_fields_that_hold_them() -> None:
    message = oru_r01(patient=NAME, mrn=PID, accession=ACCESSION)
    found = identifiers_from_hl7(message)
    assert ("[NAME]", "PRIVACY") in found and ("[NAME]", "PRUDENCE") in found
    assert ("[ID]", PID) in found and ("[ID]", ACCESSION) in found
    assert ("[DATE]", "1970-01-01") in found
    # assigning authorities and ID type codes are not identifiers
    assert all(v not in ("HOSP", "MR") for _, v in found)


def test_a_deidentified_ct_slice_is_still_a_valid_ct_image(tmp_path: object) -> None:
    """Dummy and empty values keep the IOD valid, so a bundle that reads the datasets
    with a strict library (highdicom, say) still can."""
    from tests.dicomvalidate import dciodvfy_errors

    ds = a_ct_slice(tmp_path)
    del ds.RequestAttributesSequence  # the test's own additions, not CT attributes
    del ds.ReferencedImageSequence
    assert dciodvfy_errors(deidentify_dataset(ds, Pseudonymizer())) == []
