"""The SR builder: image and text results become TID 1500 Measurement Reports (IHE AIR)
that dciodvfy and dsrdump accept, filed in the source study, coded and referenced right,
with UIDs that depend only on (study, model, version)."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from highdicom.seg import Segmentation
from highdicom.sr import Comprehensive3DSR, MeasurementReport, srread
from pydicom import Dataset
from pydicom.filewriter import dcmwrite

from gateway.results.codes import (
    MANUFACTURER,
    ResultModel,
    code,
    procedure_fallback,
    result_uid,
    status_value,
    tracking_uid,
)
from gateway.results.seg import build_seg
from gateway.results.sr import build_sr
from tests.dicomvalidate import dciodvfy_report, dsrdump_ok
from tests.unit.test_results_seg import (
    NOW,
    SPACING,
    image_result,
    lung_mask,
    shuffled,
    text_result,
    write_study,
)

# --- helpers ---------------------------------------------------------------------------


def items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item below ``ds``, depth first."""
    for item in ds.get("ContentSequence") or []:
        yield item
        yield from items(item)


def name(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def coded(seq: Sequence[Dataset]) -> tuple[str, str, str]:
    c = seq[0]
    return (str(c.CodeValue), str(c.CodingSchemeDesignator), str(c.CodeMeaning))


def groups(sr: Dataset) -> list[Dataset]:
    return [i for i in items(sr) if i.ValueType == "CONTAINER" and name(i) == "Measurement Group"]


def child(group: Dataset, concept: str) -> list[Dataset]:
    return [i for i in group.ContentSequence if name(i) == concept]


def num(group: Dataset, concept: str) -> tuple[float, tuple[str, str, str]]:
    (item,) = child(group, concept)
    value = item.MeasuredValueSequence[0]
    return float(value.NumericValue), coded(value.MeasurementUnitsCodeSequence)


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def assert_valid(sr: Dataset, path: Path) -> None:
    """dciodvfy reports no errors (warnings printed) and dsrdump reads it cleanly."""
    sr.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_report(path)
    print(f"{path.name}: dciodvfy warnings:", *warnings, sep="\n  ")
    assert errors == []
    ok, output = dsrdump_ok(path)
    assert ok, output


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return write_study(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def result(headers: list[Dataset]) -> dict[str, Any]:
    return image_result(headers)


@pytest.fixture(scope="module")
def seg(result: dict[str, Any], headers: list[Dataset]) -> Segmentation:
    built = build_seg(result, lung_mask(), headers, now=NOW)
    assert built is not None
    return built


@pytest.fixture(scope="module")
def sr_seg(result: dict[str, Any], headers: list[Dataset], seg: Segmentation) -> Comprehensive3DSR:
    return build_sr(result, shuffled(headers), seg=seg, now=NOW)


@pytest.fixture(scope="module")
def sr_plain(result: dict[str, Any], headers: list[Dataset]) -> Comprehensive3DSR:
    return build_sr(result, headers, now=NOW)


@pytest.fixture(scope="module")
def sr_text(headers: list[Dataset]) -> Comprehensive3DSR:
    return build_sr(text_result(), headers[:1], now=NOW)


# --- validity --------------------------------------------------------------------------


def test_sr_with_seg_passes_dciodvfy_and_dsrdump(sr_seg: Comprehensive3DSR, tmp_path: Path) -> None:
    assert_valid(sr_seg, tmp_path / "sr_seg.dcm")


def test_sr_without_seg_passes_dciodvfy_and_dsrdump(
    sr_plain: Comprehensive3DSR, tmp_path: Path
) -> None:
    assert_valid(sr_plain, tmp_path / "sr_plain.dcm")


def test_text_sr_passes_dciodvfy_and_dsrdump(sr_text: Comprehensive3DSR, tmp_path: Path) -> None:
    assert_valid(sr_text, tmp_path / "sr_text.dcm")


def test_sr_round_trips_as_tid_1500(sr_seg: Comprehensive3DSR) -> None:
    """highdicom reads the written document back as a Measurement Report."""
    back = srread(io.BytesIO(encode(sr_seg)))
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    report = back.content
    assert isinstance(report, MeasurementReport)
    assert len(report.get_volumetric_roi_measurement_groups()) == 2
    assert len(report.get_image_measurement_groups()) == 1


# --- header ----------------------------------------------------------------------------


def test_sr_joins_the_source_study_as_a_new_series(
    sr_seg: Comprehensive3DSR, headers: list[Dataset]
) -> None:
    src = headers[0]
    assert sr_seg.StudyInstanceUID == src.StudyInstanceUID
    assert sr_seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr_seg.Modality == "SR"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                    "ReferringPhysicianName"):  # fmt: skip
        assert sr_seg.get(keyword) == src.get(keyword), keyword
    assert sr_seg.SeriesDescription == "AI lung-nodules 0.1.0"
    assert (sr_seg.PreliminaryFlag, sr_seg.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
    assert (str(sr_seg.ContentDate), str(sr_seg.ContentTime)) == ("20240301", "103015")
    assert str(sr_seg.InstanceCreationDate) == "20240301"
    assert sr_seg.TimezoneOffsetFromUTC == "+0000"


def test_sr_names_the_model_as_equipment_and_device_observer(
    sr_seg: Comprehensive3DSR, headers: list[Dataset]
) -> None:
    """Manufacturer etc. name the model; Contributing Equipment holds it as Processing
    Equipment (DCM 109102); the observer context is a device with a derived UID."""
    assert sr_seg.Manufacturer == MANUFACTURER
    assert sr_seg.ManufacturerModelName == "lung_nodules"
    assert sr_seg.SoftwareVersions == "0.1.0"
    assert sr_seg.DeviceSerialNumber == "0123456789abcdef"
    (ours,) = [e for e in sr_seg.ContributingEquipmentSequence if e.Manufacturer == MANUFACTURER]
    assert coded(ours.PurposeOfReferenceCodeSequence) == ("109102", "DCM", "Processing Equipment")
    assert (ours.ManufacturerModelName, ours.SoftwareVersions) == ("lung_nodules", "0.1.0")
    assert str(ours.ContributionDateTime).startswith("20240301103015")
    top = {name(i): i for i in sr_seg.ContentSequence}
    assert coded(top["Observer Type"].ConceptCodeSequence)[0] == "121007"  # Device
    assert (
        result_uid("device", str(headers[0].StudyInstanceUID), "lung-nodules", "0.1.0")
        == top["Device Observer UID"].UID
    )
    assert top["Device Observer Name"].TextValue == "lung-nodules"
    assert top["Device Observer Manufacturer"].TextValue == MANUFACTURER
    assert top["Device Observer Model Name"].TextValue == "lung_nodules"
    assert top["Device Observer Serial Number"].TextValue == "0123456789abcdef"
    language = top["Language of Content Item and Descendants"]
    assert coded(language.ConceptCodeSequence) == ("en-US", "RFC5646", "English (United States)")


# --- procedure reported ----------------------------------------------------------------


def procedure(sr: Dataset) -> list[tuple[str, str, str]]:
    return [
        coded(i.ConceptCodeSequence) for i in sr.ContentSequence if name(i) == "Procedure reported"
    ]


def test_procedure_reported_falls_back_to_modality_and_body_part(
    sr_seg: Comprehensive3DSR, sr_text: Comprehensive3DSR
) -> None:
    """CT of the CHEST without a procedure code is reported as LOINC CT Chest."""
    assert procedure(sr_seg) == [("24627-2", "LN", "CT Chest")]
    assert procedure(sr_text) == [("24627-2", "LN", "CT Chest")]
    assert coded(sr_seg.PerformedProcedureCodeSequence)[0] == "24627-2"


@pytest.mark.parametrize(
    ("modality", "body_part", "value"),
    [
        ("CT", "CHEST", "24627-2"),
        ("ct", "chest ", "24627-2"),
        ("CT", "ABDOMEN", "25045-6"),
        ("MR", "BRAIN", "24590-2"),
        ("MR", "KNEE", "25056-3"),
        ("US", "", "16310003"),
        ("OT", "", "363679005"),
    ],
)
def test_procedure_fallback_table(modality: str, body_part: str, value: str) -> None:
    assert procedure_fallback(modality, body_part).value == value


def test_procedure_reported_comes_from_the_source_procedure_code(
    result: dict[str, Any], headers: list[Dataset]
) -> None:
    """ProcedureCodeSequence wins; without it, a RequestedProcedureCodeSequence inside
    RequestAttributesSequence."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
        "RPID16",
        "RADLEX",
        "CT Chest wo",
    )
    with_code = [copy.deepcopy(h) for h in headers]
    for h in with_code:
        h.ProcedureCodeSequence = [item]
    assert procedure(build_sr(result, with_code, now=NOW)) == [("RPID16", "RADLEX", "CT Chest wo")]

    request = Dataset()
    request.RequestedProcedureCodeSequence = [item]
    with_request = [copy.deepcopy(h) for h in headers]
    with_request[3].RequestAttributesSequence = [request]
    assert procedure(build_sr(result, with_request, now=NOW)) == [
        ("RPID16", "RADLEX", "CT Chest wo")
    ]


# --- content ---------------------------------------------------------------------------


def test_image_findings_are_coded_with_measurements_in_ucum(
    sr_plain: Comprehensive3DSR, result: dict[str, Any]
) -> None:
    """Each finding: tracking id, finding type = its code, site Lung, diameter (SCT
    81827009, mm), volume (SCT 118565006, mm3), probability (DCM 122157, "1") when known."""
    finding_groups = groups(sr_plain)[:2]
    for index, (group, finding) in enumerate(
        zip(finding_groups, result["findings"], strict=True), 1
    ):
        assert child(group, "Tracking Identifier")[0].TextValue == f"finding {index}"
        assert coded(child(group, "Finding")[0].ConceptCodeSequence) == (
            "786838002", "SCT", "Nodule of lung"
        )  # fmt: skip
        assert coded(child(group, "Finding Site")[0].ConceptCodeSequence)[0] == "39607008"
        value, unit = num(group, "Diameter")
        assert value == pytest.approx(finding["diameter_mm"])
        assert unit == ("mm", "UCUM", "millimeter")
        assert coded(child(group, "Diameter")[0].ConceptNameCodeSequence)[:2] == ("81827009", "SCT")
        value, unit = num(group, "Volume")
        assert value == pytest.approx(finding["volume_mm3"])
        assert unit == ("mm3", "UCUM", "cubic millimeter")
        assert coded(child(group, "Volume")[0].ConceptNameCodeSequence)[:2] == ("118565006", "SCT")
        assert coded(child(group, "Algorithm Family")[0].ConceptCodeSequence)[0] == "123110"
    value, unit = num(finding_groups[0], "Probability")
    assert value == pytest.approx(0.93)
    assert unit == ("1", "UCUM", "no units")
    assert child(finding_groups[1], "Probability") == []  # probability None: not reported


def test_without_seg_findings_point_at_their_source_slice(
    sr_plain: Comprehensive3DSR, result: dict[str, Any], headers: list[Dataset]
) -> None:
    """A planar ROI: a circle of the finding's diameter around its centre, on the source
    image the result names, which is listed as evidence."""
    for group, finding in zip(groups(sr_plain)[:2], result["findings"], strict=True):
        (region,) = child(group, "Image Region")
        assert region.GraphicType == "CIRCLE"
        centre, edge = np.reshape(region.GraphicData, (2, 2))
        i, j = finding["centre_voxel"][:2]
        assert tuple(centre) == pytest.approx((i + 0.5, j + 0.5))
        assert edge[0] - centre[0] == pytest.approx(finding["diameter_mm"] / 2 / SPACING[0])
        (source,) = region.ContentSequence
        ref = source.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == finding["referenced_sop_instance_uid"]
        assert ref.ReferencedSOPClassUID == headers[0].SOPClassUID
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr_plain.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert evidence == {str(h.SOPInstanceUID) for h in headers}


def test_with_seg_findings_reference_their_segments(
    sr_seg: Comprehensive3DSR, seg: Segmentation, headers: list[Dataset]
) -> None:
    """A volumetric ROI: the SEG instance and segment number, the source images of the
    segment's frames, and the same tracking UID as the segment."""
    source_uids = {str(h.SOPInstanceUID) for h in headers}
    for number, group in enumerate(groups(sr_seg)[:2], 1):
        (ref,) = child(group, "Referenced Segment")
        sop = ref.ReferencedSOPSequence[0]
        assert sop.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert sop.ReferencedSOPClassUID == seg.SOPClassUID
        assert int(sop.ReferencedSegmentNumber) == number
        sources = {
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in child(group, "Source Image for Segmentation")
        }
        assert sources and sources <= source_uids
        tracking = child(group, "Tracking Unique Identifier")[0].UID
        assert tracking == seg.SegmentSequence[number - 1].TrackingUID
    evidence = {
        (r.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
        for s in sr_seg.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) in evidence


@pytest.mark.parametrize("present", [True, False])
def test_classification_is_a_present_or_absent_evaluation_with_probability(
    headers: list[Dataset], present: bool
) -> None:
    sr = build_sr(image_result(headers, present=present), headers, now=NOW)
    group = groups(sr)[-1]
    assert child(group, "Tracking Identifier")[0].TextValue == "classification"
    (evaluation,) = child(group, "Nodule of lung")
    assert coded(evaluation.ConceptNameCodeSequence) == ("786838002", "SCT", "Nodule of lung")
    expected = ("52101004", "SCT", "Present") if present else ("272519000", "SCT", "Absent")
    assert coded(evaluation.ConceptCodeSequence) == expected
    value, _ = num(group, "Probability")
    assert value == pytest.approx(0.93 if present else 0.08)
    assert coded(child(group, "Probability")[0].ConceptNameCodeSequence) == (
        "122157", "DCM", "Probability"
    )  # fmt: skip


def test_text_findings_are_present_absent_or_undetermined(sr_text: Comprehensive3DSR) -> None:
    """Each text finding: a qualitative evaluation whose concept is its SNOMED CT code
    and whose value is Present, Absent or Undetermined (CID 240)."""
    found = []
    for group in groups(sr_text):
        (evaluation,) = [
            i for i in group.ContentSequence
            if i.ValueType == "CODE" and i.RelationshipType == "CONTAINS"
        ]  # fmt: skip
        found.append(
            (coded(evaluation.ConceptNameCodeSequence), coded(evaluation.ConceptCodeSequence))
        )
    assert found == [
        (("36118008", "SCT", "Pneumothorax"), ("272519000", "SCT", "Absent")),
        (("60046008", "SCT", "Pleural effusion"), ("52101004", "SCT", "Present")),
        (("95436008", "SCT", "Lung consolidation"), ("373068000", "SCT", "Undetermined")),
    ]


# --- identity --------------------------------------------------------------------------


def test_building_twice_gives_the_same_bytes(
    result: dict[str, Any], headers: list[Dataset], seg: Segmentation
) -> None:
    """Same input, same output: UIDs derived, times from ``now``, no clock inside."""
    first = build_sr(result, headers, seg=seg, now=NOW)
    second = build_sr(result, shuffled(headers), seg=seg, now=NOW)
    assert encode(first) == encode(second)


def test_uids_depend_on_study_model_and_version(
    sr_seg: Comprehensive3DSR, headers: list[Dataset]
) -> None:
    """Another model version gives another series, instance and tracking UIDs."""
    study = str(headers[0].StudyInstanceUID)
    assert sr_seg.SOPInstanceUID == result_uid("sr-instance", study, "lung-nodules", "0.1.0")
    assert sr_seg.SeriesInstanceUID == result_uid("sr-series", study, "lung-nodules", "0.1.0")
    other = build_sr(image_result(headers, version="0.2.0"), headers, now=NOW)
    assert other.SOPInstanceUID != sr_seg.SOPInstanceUID
    assert other.SeriesInstanceUID != sr_seg.SeriesInstanceUID
    model = ResultModel.from_result(image_result(headers))
    tracking = child(groups(sr_seg)[0], "Tracking Unique Identifier")[0].UID
    assert tracking == tracking_uid(model, study, 1)
    assert tracking != child(groups(other)[0], "Tracking Unique Identifier")[0].UID


def test_result_uid_is_a_deterministic_2_25_uid() -> None:
    uid = result_uid("sr-instance", "1.2.3", "m", "1")
    assert uid == result_uid("sr-instance", "1.2.3", "m", "1")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid[5:].isdigit()
    assert len({uid, result_uid("sr-series", "1.2.3", "m", "1"),
                result_uid("sr-instance", "1.2.3", "m", "2"),
                result_uid("sr-instance", "1.2.4", "m", "1")}) == 4  # fmt: skip
    with pytest.raises(ValueError):
        result_uid("sr-instance", "", "m", "1")


# --- inputs ----------------------------------------------------------------------------


def test_source_without_type2_study_attributes_still_builds(
    result: dict[str, Any], headers: list[Dataset], tmp_path: Path
) -> None:
    """A first source lacking StudyID/AccessionNumber gets them empty, not a crash, and
    the caller's header is left as it was."""
    bare = [copy.deepcopy(h) for h in headers]
    del bare[0].StudyID, bare[0].AccessionNumber
    sr = build_sr(result, bare, now=NOW)
    assert "StudyID" not in bare[0]
    assert (sr.StudyID, sr.AccessionNumber) == ("", "")
    assert_valid(sr, tmp_path / "bare.dcm")


def test_result_of_another_study_is_refused(result: dict[str, Any], headers: list[Dataset]) -> None:
    other = copy.deepcopy(result)
    other["input"]["study_uid"] = "1.2.3.4"
    with pytest.raises(ValueError, match="study"):
        build_sr(other, headers, now=NOW)


def test_finding_on_an_unknown_image_is_refused(
    result: dict[str, Any], headers: list[Dataset]
) -> None:
    bad = copy.deepcopy(result)
    bad["findings"][0]["referenced_sop_instance_uid"] = "1.2.3.4"
    with pytest.raises(ValueError, match="referenced_sop_instance_uid"):
        build_sr(bad, headers, now=NOW)


def test_code_helper_reads_dicts_tuples_and_scheme_aliases() -> None:
    assert (
        code({"system": "SNOMED", "value": "39607008", "meaning": "Lung"}).scheme_designator
        == "SCT"
    )
    assert code(("http://loinc.org", "24627-2", "CT Chest")).scheme_designator == "LN"
    with pytest.raises(ValueError, match="meaning"):
        code({"system": "SCT", "value": "1"})
    assert status_value("Uncertain").value == "373068000"
    with pytest.raises(ValueError, match="status"):
        status_value("maybe")
