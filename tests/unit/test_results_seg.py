"""The SEG builder: a label mask over a synthetic CT series becomes a valid binary DICOM
Segmentation whose frames, segments and references follow the model result.

The helpers at the top (a small CT study, an image result drawn to match a mask, a text
result) are shared with ``test_results_sr.py``.
"""

from __future__ import annotations

import copy
import datetime as dt
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from highdicom.seg import Segmentation
from pydicom import Dataset, dcmread

from gateway.results.codes import ABNORMAL_STRUCTURE, MANUFACTURER, ResultModel, tracking_uid
from gateway.results.seg import build_seg
from tests.ctstudy import write_ct_series
from tests.dicomvalidate import dciodvfy_report

SHAPE = (64, 64, 12)  # (columns, rows, slices)
SPACING = (0.8, 0.8, 2.5)
ORIGIN = (-175.0, -175.0, 0.0)
NOW = dt.datetime(2024, 3, 1, 10, 30, 15, tzinfo=dt.UTC)
NODULE = {"system": "SCT", "value": "786838002", "meaning": "Nodule of lung"}
# (label, centre voxel (i, j, k), in-plane radius in voxels, half-height in slices)
BLOBS = [(1, (20, 30, 5), 4, 1), (2, (45, 12, 8), 2, 0)]
STRAY_LABEL = 7  # in the mask but named by no finding: no segment


def write_study(folder: Path, **kwargs: Any) -> list[Dataset]:
    """A 64 x 64 x 12 CT series on disk; its headers (no pixel data) in slice order."""
    volume = np.full(SHAPE, -850.0)
    paths = write_ct_series(
        volume,
        SPACING,
        folder,
        patient_name="DOE^JANE",
        patient_id="PID123",
        accession="ACC456",
        origin=ORIGIN,
        **kwargs,
    )
    return [dcmread(p, stop_before_pixels=True) for p in paths]


def lung_mask() -> np.ndarray:
    """(X, Y, Z) labels: BLOBS as flat discs over 2h + 1 slices, and one stray voxel."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    ii, jj = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    for label, (ci, cj, ck), radius, half in BLOBS:
        disc = (ii - ci) ** 2 + (jj - cj) ** 2 <= radius**2
        for k in range(ck - half, ck + half + 1):
            mask[:, :, k][disc] = label
    mask[2, 3, 0] = STRAY_LABEL
    return mask


def mask_slices(mask: np.ndarray, label: int) -> set[int]:
    return {int(k) for k in np.nonzero((mask == label).any(axis=(0, 1)))[0]}


def image_result(
    headers: Sequence[Dataset],
    *,
    version: str = "0.1.0",
    probabilities: Sequence[float | None] = (0.93, None),
    present: bool = True,
) -> dict[str, Any]:
    """The runtime's image result for BLOBS on ``headers`` (slice order)."""
    findings = []
    for (label, (ci, cj, ck), radius, half), probability in zip(BLOBS, probabilities, strict=True):
        area = np.pi * (radius * SPACING[0]) ** 2
        findings.append(
            {
                "label": label,
                "finding": "lung nodule",
                "code": dict(NODULE),
                "centre_voxel": [float(ci), float(cj), float(ck)],
                "centre_mm": [
                    ORIGIN[0] + ci * SPACING[0],
                    ORIGIN[1] + cj * SPACING[1],
                    ORIGIN[2] + ck * SPACING[2],
                ],
                "diameter_mm": 2 * radius * SPACING[0],
                "volume_mm3": round(area * (2 * half + 1) * SPACING[2], 1),
                "probability": probability,
                "referenced_sop_instance_uid": str(headers[ck].SOPInstanceUID),
            }
        )
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    first = headers[0]
    return {
        "model": {
            "name": "lung-nodules",
            "bundle": "lung_nodules",
            "version": version,
            "weights_sha256": "0123456789abcdef" * 4,
        },
        "device": "cpu",
        "seconds": 1.5,
        "input": {
            "kind": "image",
            "study_uid": str(first.StudyInstanceUID),
            "series_uid": str(first.SeriesInstanceUID),
            "frame_of_reference_uid": str(first.FrameOfReferenceUID),
            "modality": "CT",
            "sop_instance_uids": [str(h.SOPInstanceUID) for h in headers],
            "shape": list(SHAPE),
            "spacing": list(SPACING),
            "affine": affine.tolist(),
        },
        "findings": findings,
        "classification": {
            "finding": "lung nodule present" if present else "no lung nodule",
            "code": dict(NODULE),
            "nodule_present": present,
            "probability": 0.93 if present else 0.08,
        },
    }


def text_result() -> dict[str, Any]:
    """The text runtime's result with one finding of each status."""
    return {
        "model": {
            "name": "report-findings",
            "bundle": "report_findings",
            "version": "0.1.0",
            "weights_sha256": "fedcba9876543210" * 4,
        },
        "device": "cpu",
        "seconds": 0.0,
        "input": {"kind": "text", "characters": 74},
        "classification": None,
        "findings": [
            {"finding": "pneumothorax", "status": "absent", "code": "36118008",
             "meaning": "Pneumothorax", "text": "pneumothorax", "sentence": 0,
             "text_span": [3, 15]},
            {"finding": "pleural_effusion", "status": "present", "code": "60046008",
             "meaning": "Pleural effusion", "text": "pleural effusion", "sentence": 1,
             "text_span": [29, 45]},
            {"finding": "consolidation", "status": "uncertain", "code": "95436008",
             "meaning": "Lung consolidation", "text": "consolidation", "sentence": 2,
             "text_span": [60, 73]},
        ],
    }  # fmt: skip


def shuffled(items: Sequence[Dataset]) -> list[Dataset]:
    out = list(items)
    random.Random(7).shuffle(out)
    return out


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return write_study(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    return lung_mask()


@pytest.fixture(scope="module")
def seg(headers: list[Dataset], mask: np.ndarray) -> Segmentation:
    built = build_seg(image_result(headers), mask, shuffled(headers), now=NOW)
    assert built is not None
    return built


def frames_by_slice(seg: Dataset, headers: Sequence[Dataset]) -> dict[tuple[int, int], int]:
    """(segment number, source slice k) -> 0-based frame index."""
    slice_of = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    out = {}
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ident = frame.get("SegmentIdentificationSequence") or shared
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        out[(int(ident[0].ReferencedSegmentNumber), slice_of[source.ReferencedSOPInstanceUID])] = (
            index
        )
    return out


# --- tests -----------------------------------------------------------------------------


def test_seg_passes_dciodvfy(seg: Segmentation, tmp_path: Path) -> None:
    """The SEG is a valid Segmentation IOD by dicom3tools (warnings are printed, not failed)."""
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_report(path)
    print("\n".join(warnings))
    assert errors == []


def test_seg_joins_source_study_and_references_source_series(
    seg: Segmentation, headers: list[Dataset]
) -> None:
    """Patient and study come from the source; the SEG references the source series and
    shares its frame of reference."""
    src = headers[0]
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate"):  # fmt: skip
        assert seg.get(keyword) == src.get(keyword), keyword
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence}
    assert referenced <= {h.SOPInstanceUID for h in headers}


def test_seg_has_frames_only_where_the_mask_has_foreground(
    seg: Segmentation, headers: list[Dataset], mask: np.ndarray
) -> None:
    """One frame per (segment, slice) with foreground, whose pixels are the mask's frame
    ``mask[:, :, k].T``; the stray label makes no frame, whatever the source order."""
    frames = frames_by_slice(seg, headers)
    expected = {(n, k) for n, (label, *_) in enumerate(BLOBS, 1) for k in mask_slices(mask, label)}
    assert set(frames) == expected
    assert seg.NumberOfFrames == len(expected)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    for (number, k), index in frames.items():
        label = BLOBS[number - 1][0]
        np.testing.assert_array_equal(
            pixels[index], np.equal(mask[:, :, k].T, label).astype(np.uint8)
        )


def test_segments_are_coded_from_the_findings(seg: Segmentation, headers: list[Dataset]) -> None:
    """One segment per finding label in the mask: type = the finding's code, category
    abnormal structure, AUTOMATIC by the model (AI family), tracking UID = the SR's."""
    model = ResultModel.from_result(image_result(headers))
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    for number, segment in enumerate(seg.SegmentSequence, 1):
        (kind,) = segment.SegmentedPropertyTypeCodeSequence
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (
            "786838002", "SCT", "Nodule of lung"
        )  # fmt: skip
        (category,) = segment.SegmentedPropertyCategoryCodeSequence
        assert category.CodeValue == ABNORMAL_STRUCTURE.value
        assert segment.SegmentLabel == "lung nodule"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "lung-nodules"
        assert algorithm.AlgorithmVersion == "0.1.0"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert segment.TrackingUID == tracking_uid(model, str(headers[0].StudyInstanceUID), number)
        assert segment.AnatomicRegionSequence[0].CodeValue == "39607008"  # Lung


def test_seg_names_the_model_as_equipment(seg: Segmentation) -> None:
    assert seg.Manufacturer == MANUFACTURER
    assert seg.ManufacturerModelName == "lung_nodules"
    assert seg.SoftwareVersions == "0.1.0"
    assert seg.DeviceSerialNumber == "0123456789abcdef"
    assert seg.SeriesDescription == "AI lung-nodules 0.1.0 segmentation"
    assert seg.ContentLabel == "LUNG_NODULES"
    assert (str(seg.ContentDate), str(seg.ContentTime)) == ("20240301", "103015")
    assert str(seg.InstanceCreationDate) == "20240301"
    ours = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == MANUFACTURER]
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"


def test_seg_uids_are_derived_from_study_model_and_version(
    seg: Segmentation, headers: list[Dataset], mask: np.ndarray
) -> None:
    """Building again gives the same UIDs; another model version gives other ones."""
    again = build_seg(image_result(headers), mask, headers, now=NOW)
    other = build_seg(image_result(headers, version="0.2.0"), mask, headers, now=NOW)
    assert again is not None and other is not None
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (
        seg.SOPInstanceUID, seg.SeriesInstanceUID
    )  # fmt: skip
    assert other.SOPInstanceUID != seg.SOPInstanceUID
    assert other.SeriesInstanceUID != seg.SeriesInstanceUID
    assert seg.SOPInstanceUID.startswith("2.25.")


def test_no_foreground_gives_no_seg(headers: list[Dataset], mask: np.ndarray) -> None:
    """An empty mask, or one whose labels no finding names, makes no SEG."""
    result = image_result(headers)
    assert build_seg(result, np.zeros(SHAPE, dtype=np.uint8), headers, now=NOW) is None
    only_stray = np.where(mask == STRAY_LABEL, mask, 0).astype(np.uint8)
    assert build_seg(result, only_stray, headers, now=NOW) is None


def test_mask_that_does_not_fit_the_series_is_refused(headers: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="does not match"):
        build_seg(image_result(headers), np.ones((64, 64, 11), np.uint8), headers, now=NOW)


def test_missing_source_instance_is_refused(headers: list[Dataset], mask: np.ndarray) -> None:
    with pytest.raises(ValueError, match="not in source"):
        build_seg(image_result(headers), mask, headers[1:], now=NOW)


def test_seg_without_now_is_stamped_from_made_at(headers: list[Dataset], mask: np.ndarray) -> None:
    """No clock: without ``now`` the stamp is the result's made_at."""
    result = copy.deepcopy(image_result(headers))
    result["made_at"] = NOW.timestamp()
    built = build_seg(result, mask, headers)
    assert built is not None
    assert (str(built.ContentDate), str(built.ContentTime)) == ("20240301", "103015")


def test_sources_with_empty_type2_attributes_still_give_a_valid_seg(
    headers: list[Dataset], mask: np.ndarray, tmp_path: Path
) -> None:
    """Sources without StudyID/AccessionNumber/PatientBirthDate and with an empty
    SliceThickness (all Type 2) give a valid SEG; the caller's headers stay as they were."""
    bare = copy.deepcopy(headers)
    for ds in bare:
        del ds.StudyID, ds.AccessionNumber, ds.PatientBirthDate
        ds.SliceThickness = None
    built = build_seg(image_result(headers), mask, bare, now=NOW)
    assert built is not None
    assert "StudyID" not in bare[0] and bare[0].SliceThickness is None
    measures = built.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == SPACING[2]
    path = tmp_path / "bare.dcm"
    built.save_as(path, enforce_file_format=True)
    assert dciodvfy_report(path)[0] == []
