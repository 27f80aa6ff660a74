"""Image input of the model runtime: series selection, volume building, coordinates."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from gateway.infer.image import (
    NoSeriesMatch,
    SeriesRules,
    VolumeError,
    build_volume,
    dataset_from_bytes,
    nearest_slice,
    patient_to_voxel,
    read_datasets,
    read_folder,
    select_series,
    voxel_to_patient,
)
from models.lung_nodules.synth import SynthParams, make_case
from tests.ctstudy import write_ct_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    """Rodrigues' rotation matrix."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    out: np.ndarray = np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)
    return out


def oblique(axis: Sequence[float] = (1.0, 0.3, 0.2), degrees: float = 30.0) -> tuple[float, ...]:
    r = rotation(axis, degrees)
    return (*r[:, 0], *r[:, 1])


def make_slices(
    values: np.ndarray,
    spacing: Sequence[float] = (0.8, 0.6, 2.5),
    *,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-10.0, 20.0, 30.0),
    rescale: tuple[float, float] = (1.0, 0.0),
    modality: str = "CT",
    series_uid: str | None = None,
) -> list[Dataset]:
    """In-memory slices of ``values`` (X, Y, Z stored values), slice k = values[:, :, k]."""
    n_cols, n_rows, n_slices = values.shape
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    out = []
    for k in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = "1.2.3.4"
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = list(np.asarray(origin) + k * spacing[2] * normal)
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.Rows, ds.Columns = n_rows, n_cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.PixelData = np.ascontiguousarray(values[:, :, k].T, dtype="<i2").tobytes()
        out.append(ds)
    return out


def shuffled(items: list[Dataset], seed: int = 1) -> list[Dataset]:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[int(i)] for i in order]


def ramp(shape: tuple[int, int, int] = (7, 5, 6)) -> np.ndarray:
    return np.arange(math.prod(shape), dtype=np.int16).reshape(shape)


def header(
    series_uid: str,
    number: int,
    *,
    modality: str = "CT",
    body_part: str = "CHEST",
    description: str = "CHEST 1mm",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    instance: int = 1,
) -> Dataset:
    ds = Dataset()
    ds.PatientName = "SECRET^PATIENT"
    ds.PatientID = "MRN-SECRET-1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.InstanceNumber = instance
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.SeriesDescription = description
    ds.ImageType = list(image_type)
    ds.Rows = ds.Columns = 16
    return ds


def study(*series: tuple[str, int, int, dict[str, Any]]) -> list[Dataset]:
    """Headers for series given as (uid, SeriesNumber, slice count, attribute overrides)."""
    out = []
    for uid, number, count, attrs in series:
        for i in range(count):
            out.append(header(uid, number, instance=i + 1, **attrs))
    return out


# --- series selection ------------------------------------------------------------------


def test_rules_from_dict() -> None:
    rules = SeriesRules.from_dict(
        {
            "Modality": "CT",
            "BodyPartExamined": ["CHEST", "LUNG"],
            "SeriesDescription": {"regex": "(?i)lung|chest"},
            "min_slices": 20,
        }
    )
    assert rules.min_slices == 20
    assert [c.keyword for c in rules.conditions] == [
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
    ]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"Modalty": "CT"}, "unknown key 'Modalty'.*did you mean 'Modality'"),
        ({"min_slices": 0}, "min_slices"),
        ({"min_slices": "20"}, "min_slices"),
        ({"SeriesDescription": {"regex": "("}}, "bad regex"),
        ({"SeriesDescription": {"pattern": "x"}}, "regex"),
        ({"BodyPartExamined": []}, "empty"),
        ({"Modality": None}, "Modality must be"),
        ({"ReferencedImageSequence": "x"}, "sequence"),
    ],
)
def test_bad_rules_are_refused(rules: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SeriesRules.from_dict(rules)


def test_modality_list_and_regex_conditions() -> None:
    headers = study(
        ("1.1", 1, 30, {"modality": "MR"}),
        ("1.2", 2, 30, {"body_part": "ABDOMEN"}),
        ("1.3", 3, 30, {"description": "SCOUT"}),
        ("1.4", 4, 25, {"body_part": " LUNG ", "description": " Lung 1mm "}),
    )
    rules = SeriesRules.from_dict(
        {
            "Modality": "ct",
            "BodyPartExamined": ["CHEST", "lung"],
            "SeriesDescription": {"regex": "(?i)lung|chest"},
        }
    )
    selection = select_series(headers, rules)
    assert selection.series_uid == "1.4"
    assert len(selection.instances) == 25
    assert selection.reasons == {
        "1.1": "Modality is MR, not ct",
        "1.2": "BodyPartExamined is ABDOMEN, not one of CHEST, lung",
        "1.3": "SeriesDescription 'SCOUT' does not match /(?i)lung|chest/",
    }


def test_min_slices_and_most_slices_wins() -> None:
    headers = study(
        ("1.1", 1, 12, {}),
        ("1.2", 2, 40, {}),
        ("1.3", 3, 60, {}),
    )
    selection = select_series(shuffled(headers), SeriesRules.from_dict({"min_slices": 20}))
    assert selection.series_uid == "1.3"
    assert selection.reasons["1.1"] == "12 slices, fewer than 20"
    assert "fewer slices (40 < 60)" in selection.reasons["1.2"]


def test_tie_goes_to_the_lowest_series_number_then_uid() -> None:
    headers = study(("1.9", 2, 5, {}), ("1.8", 7, 5, {}), ("1.7", 7, 5, {}))
    selection = select_series(headers, SeriesRules())
    assert selection.series_uid == "1.9"
    assert "higher SeriesNumber" in selection.reasons["1.8"]
    headers = study(("1.8", 7, 5, {}), ("1.7", 7, 5, {}))
    assert select_series(headers, SeriesRules()).series_uid == "1.7"


def test_non_image_instances_do_not_count() -> None:
    headers = study(("1.1", 1, 3, {}))
    for _ in range(5):
        sr = Dataset()
        sr.SeriesInstanceUID = "1.1"
        sr.Modality = "CT"
        headers.append(sr)
    with pytest.raises(NoSeriesMatch, match="3 slices, fewer than 4"):
        select_series(headers, SeriesRules.from_dict({"min_slices": 4}))
    assert len(select_series(headers, SeriesRules()).instances) == 3


def test_multivalued_and_numeric_attributes() -> None:
    headers = study(("1.1", 3, 4, {"image_type": ("DERIVED", "SECONDARY", "LOCALIZER")}))
    headers += study(("1.2", 5, 3, {}))
    rules = SeriesRules.from_dict({"ImageType": "axial", "SeriesNumber": [5, 6]})
    selection = select_series(headers, rules)
    assert selection.series_uid == "1.2"
    assert selection.reasons["1.1"] == (
        "ImageType is DERIVED\\SECONDARY\\LOCALIZER, not axial; SeriesNumber is 3, not one of 5, 6"
    )
    assert select_series(headers, SeriesRules.from_dict({"ImageType": {"regex": "^LOCALIZER$"}}))
    first = headers[4]  # the conditions are checked on InstanceNumber 1, wherever it is
    assert first.SeriesInstanceUID == "1.2" and first.InstanceNumber == 1
    rules = SeriesRules.from_dict({"BodyPartExamined": "CHEST"})
    del first.BodyPartExamined
    with pytest.raises(NoSeriesMatch, match="BodyPartExamined is missing"):
        select_series(reversed(headers[4:]), rules)
    first.BodyPartExamined = ""
    with pytest.raises(NoSeriesMatch, match="BodyPartExamined is missing"):
        select_series(headers[4:], rules)


def test_no_match_message_lists_reasons_without_phi() -> None:
    headers = study(
        ("1.1", 1, 30, {"modality": "MR", "description": "T1 AX"}),
        ("1.2", 2, 12, {}),
    )
    headers.append(Dataset())  # no SeriesInstanceUID
    rules = SeriesRules.from_dict({"Modality": "CT", "PatientName": "NOBODY", "min_slices": 20})
    with pytest.raises(NoSeriesMatch) as info:
        select_series(headers, rules)
    message = str(info.value)
    assert "series 1 (MR 'T1 AX', 30 image instances): Modality is MR, not CT" in message
    assert "series 2 (CT 'CHEST 1mm', 12 image instances)" in message
    assert "12 slices, fewer than 20" in message
    assert "PatientName does not match the rule" in message
    assert "without a SeriesInstanceUID" in message
    assert "SECRET" not in message and "MRN" not in message and "NOBODY" not in message
    assert isinstance(info.value, ValueError)
    assert (
        info.value.reasons["1.1"] == "Modality is MR, not CT; PatientName does not match the rule"
    )


def test_empty_study_does_not_match() -> None:
    with pytest.raises(NoSeriesMatch, match="no instances"):
        select_series([], SeriesRules())


# --- volume ----------------------------------------------------------------------------


def test_shuffled_axial_slices_are_sorted_by_position() -> None:
    values = ramp()
    slices = make_slices(values)
    for ds in slices:  # InstanceNumber runs against the position: it must not matter
        ds.InstanceNumber = 100 - ds.InstanceNumber
    volume = build_volume(shuffled(slices))
    assert volume.array.dtype == np.float32
    assert volume.array.shape == (7, 5, 6)
    np.testing.assert_array_equal(volume.array, values)
    assert volume.sop_instance_uids == [ds.SOPInstanceUID for ds in slices]
    assert volume.spacing == pytest.approx((0.8, 0.6, 2.5))
    expected = np.array(
        [[0.8, 0, 0, -10.0], [0, 0.6, 0, 20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]],
    )
    np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
    assert volume.series_uid == slices[0].SeriesInstanceUID
    assert volume.study_uid == "1.2.3.4"
    assert volume.frame_of_reference_uid == slices[0].FrameOfReferenceUID
    assert volume.modality == "CT"


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), oblique(), oblique((0.0, 0.0, 1.0), -30.0)],
    ids=["axial", "sagittal", "oblique", "rotated-z"],
)
def test_bright_voxel_maps_to_its_patient_position(orientation: tuple[float, ...]) -> None:
    spacing, origin = (0.7, 0.9, 3.0), (12.5, -40.0, 101.0)
    values = np.zeros((9, 8, 7), dtype=np.int16)
    ijk = (6, 2, 4)
    values[ijk] = 1000
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    lps = (
        np.asarray(origin)
        + ijk[0] * spacing[0] * row
        + ijk[1] * spacing[1] * col
        + ijk[2] * spacing[2] * normal
    )
    slices = make_slices(values, spacing, orientation=orientation, origin=origin)
    volume = build_volume(shuffled(slices, seed=3))
    found = np.unravel_index(int(np.argmax(volume.array)), volume.array.shape)
    assert tuple(int(v) for v in found) == ijk
    np.testing.assert_allclose(voxel_to_patient(volume.affine, found), lps, atol=1e-3)
    along = [np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal) for ds in slices]
    by_uid = {ds.SOPInstanceUID: a for ds, a in zip(slices, along, strict=True)}
    ordered = [by_uid[uid] for uid in volume.sop_instance_uids]
    assert all(b > a for a, b in itertools.pairwise(ordered))
    assert np.linalg.det(volume.affine[:3, :3]) > 0


def test_slices_given_in_reverse_direction_are_flipped() -> None:
    """Slices written head to feet come out with k increasing along the normal."""
    values = ramp((4, 3, 5))
    slices = make_slices(values, origin=(0.0, 0.0, 50.0))
    for ds in slices:  # move slice k to z = 50 - 2.5k: k order is reversed
        ds.ImagePositionPatient[2] = 100.0 - float(ds.ImagePositionPatient[2])
    volume = build_volume(slices)
    np.testing.assert_array_equal(volume.array, values[:, :, ::-1])
    assert volume.affine[2, 3] == pytest.approx(40.0)
    assert volume.affine[2, 2] == pytest.approx(2.5)


def test_rescale_slope_and_intercept_are_applied() -> None:
    values = ramp((4, 4, 3))
    slices = make_slices(values, rescale=(2.0, -1024.0))
    slices[1].RescaleSlope, slices[1].RescaleIntercept = 1.0, 0.0  # per slice
    del slices[2].RescaleSlope  # default 1
    volume = build_volume(slices)
    np.testing.assert_array_equal(volume.array[:, :, 0], values[:, :, 0] * 2.0 - 1024.0)
    np.testing.assert_array_equal(volume.array[:, :, 1], values[:, :, 1])
    np.testing.assert_array_equal(volume.array[:, :, 2], values[:, :, 2] - 1024.0)


def test_patient_to_voxel_inverts_voxel_to_patient() -> None:
    volume = build_volume(make_slices(ramp(), orientation=oblique()))
    ijk = np.array([[0.0, 0.0, 0.0], [6.0, 4.0, 5.0], [1.5, 2.25, 3.75]])
    xyz = voxel_to_patient(volume.affine, ijk)
    assert xyz.shape == (3, 3)
    np.testing.assert_allclose(patient_to_voxel(volume.affine, xyz), ijk, atol=1e-9)
    one = patient_to_voxel(volume.affine, xyz[2])
    assert one.shape == (3,)
    np.testing.assert_allclose(one, ijk[2], atol=1e-9)


def test_nearest_slice() -> None:
    slices = make_slices(ramp())
    volume = build_volume(shuffled(slices))
    uids = [ds.SOPInstanceUID for ds in slices]
    assert nearest_slice(volume, 2.0) == uids[2]
    assert nearest_slice(volume, 2.4) == uids[2]
    assert nearest_slice(volume, 2.6) == uids[3]
    assert nearest_slice(volume, -3.0) == uids[0]
    assert nearest_slice(volume, 99.0) == uids[-1]
    with pytest.raises(ValueError):
        nearest_slice(volume, float("nan"))


def _break(what: str, slices: list[Dataset]) -> None:
    if what == "one slice":
        del slices[1:]
    elif what == "multi-frame":
        slices[2].NumberOfFrames = 3
    elif what == "no position":
        del slices[3].ImagePositionPatient
    elif what == "no orientation":
        del slices[0].ImageOrientationPatient
    elif what == "orientation":
        slices[4].ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9999, 0.0141]
    elif what == "size":
        slices[1].Rows = 6
    elif what == "pixel spacing":
        slices[2].PixelSpacing = [0.6, 0.81]
    elif what == "same position":
        slices[4].ImagePositionPatient = slices[1].ImagePositionPatient
    elif what == "missing slice":
        del slices[3]
    elif what == "uneven":
        slices[5].ImagePositionPatient[2] += 0.4
    elif what == "tilt":
        for k, ds in enumerate(slices):
            ds.ImagePositionPatient[1] += 0.5 * k
    elif what == "series":
        slices[0].SeriesInstanceUID = "9.9.9"
    elif what == "headers only":
        del slices[2].PixelData
    elif what == "codec":
        slices[2].file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    elif what == "color":
        slices[2].SamplesPerPixel = 3
    else:
        raise AssertionError(what)


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("one slice", "at least 2 slices, got 1"),
        ("multi-frame", "multi-frame \\(enhanced\\) images are not supported yet"),
        ("no position", "instance 4 has no ImagePositionPatient"),
        ("no orientation", "has no ImageOrientationPatient"),
        ("orientation", "different orientations"),
        ("size", "different Rows/Columns"),
        ("pixel spacing", "different PixelSpacing"),
        ("same position", "instance 2 and instance 5 share a slice position"),
        ("missing slice", "not evenly spaced: a gap of 5.000 mm .* median gap is 2.500 mm"),
        ("uneven", "not evenly spaced"),
        ("tilt", "gantry tilt"),
        ("series", "2 different series"),
        ("headers only", "instance 3 has no pixel data"),
        ("codec", "JPEG Baseline"),
        ("color", "pixel data"),
    ],
)
def test_volume_errors(what: str, message: str) -> None:
    slices = make_slices(ramp())
    _break(what, slices)
    with pytest.raises(VolumeError, match=message):
        build_volume(slices)


def test_compressed_slices_are_decoded() -> None:
    values = ramp((8, 6, 3))
    slices = make_slices(values, rescale=(1.0, -1024.0))
    for ds in slices:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    volume = build_volume(shuffled(slices))
    np.testing.assert_array_equal(volume.array, values - 1024.0)


def test_small_position_rounding_is_accepted() -> None:
    slices = make_slices(ramp((3, 3, 8)), (1.0, 1.0, 0.625))
    for ds in slices:
        ds.ImagePositionPatient[2] = round(float(ds.ImagePositionPatient[2]), 2)
    volume = build_volume(slices)
    assert volume.spacing[2] == pytest.approx(0.625, abs=1e-3)


# --- reading ---------------------------------------------------------------------------


def part10(ds: Dataset) -> bytes:
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_dataset_from_bytes() -> None:
    slices = make_slices(ramp())
    blobs = [part10(ds) for ds in slices]
    headers = [dataset_from_bytes(b, headers_only=True) for b in blobs]
    assert all("PixelData" not in ds for ds in headers)
    selection = select_series(headers, SeriesRules.from_dict({"Modality": "CT"}))
    assert len(selection.instances) == 6
    volume = build_volume([dataset_from_bytes(b) for b in blobs])
    np.testing.assert_array_equal(volume.array, ramp())


def test_dataset_from_bytes_without_preamble() -> None:
    slices = make_slices(ramp())
    blobs = []
    for ds in slices:
        del ds.file_meta
        buffer = BytesIO()
        dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
        blobs.append(buffer.getvalue())
    datasets = [dataset_from_bytes(b) for b in blobs]
    assert datasets[0].file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    np.testing.assert_array_equal(build_volume(datasets).array, ramp())
    with pytest.raises(ValueError, match="not a DICOM dataset"):
        dataset_from_bytes(b"hello, this is not DICOM at all" * 10)


def test_truncated_part10_bytes_are_refused() -> None:
    blob = part10(make_slices(ramp())[0])
    with pytest.raises(ValueError, match="DICOM dataset"):
        dataset_from_bytes(blob[:140])


def test_read_folder_then_read_datasets(tmp_path: Path) -> None:
    values = ramp((6, 5, 4)).astype(np.float32) - 1000.0
    paths = write_ct_series(values, (0.8, 0.6, 2.5), tmp_path / "a" / "b", shuffle_names=True)
    assert sorted(paths) != paths
    write_ct_series(values[:, :, :2], (0.8, 0.6, 2.5), tmp_path / "a", series_number=2)
    (tmp_path / "notes.txt").write_text("not DICOM")
    (tmp_path / "a" / "empty.dcm").write_bytes(b"")
    scan = read_folder(tmp_path)
    assert len(scan.datasets) == 6
    assert sorted(p.name for p in scan.skipped) == ["empty.dcm", "notes.txt"]
    assert all("PixelData" not in ds for ds in scan.datasets)
    selection = select_series(scan.datasets, SeriesRules.from_dict({"min_slices": 3}))
    assert len(selection.instances) == 4
    volume = build_volume(read_datasets(selection.instances))
    np.testing.assert_array_equal(volume.array, values)
    assert read_datasets(paths[:1])[0].SOPInstanceUID == volume.sop_instance_uids[0]
    with pytest.raises(VolumeError, match="without a filename"):
        read_datasets([Dataset()])
    with pytest.raises(NotADirectoryError):
        read_folder(tmp_path / "notes.txt")


def test_write_ct_series_round_trip(tmp_path: Path) -> None:
    case = make_case(
        np.random.default_rng(5),
        SynthParams(matrix=48, z_extent_mm=(30.0, 30.0)),
        spacing=(0.75, 0.8, 2.0),
        nodules_mm=[((18.0, 20.0, 14.0), 12.0)],
    )
    origin = (-175.0, -160.0, -40.0)
    paths = write_ct_series(case.volume, case.spacing, tmp_path, origin=origin)
    volume = build_volume(read_datasets(shuffled(read_folder(tmp_path).datasets)))
    np.testing.assert_array_equal(volume.array, np.rint(case.volume))
    assert volume.spacing == pytest.approx(case.spacing)
    assert volume.modality == "CT"
    assert len(paths) == case.volume.shape[2]
    nodule = case.nodules[0]
    np.testing.assert_allclose(
        voxel_to_patient(volume.affine, nodule.centre_voxel),
        np.asarray(origin) + np.asarray(nodule.centre_mm),
        atol=1e-3,
    )


def test_write_ct_series_oblique_with_slope(tmp_path: Path) -> None:
    hu = np.random.default_rng(0).uniform(-1000.0, 1500.0, size=(10, 9, 5))
    orientation = oblique((0.2, 1.0, 0.1), 25.0)
    write_ct_series(hu, (0.5, 0.7, 1.25), tmp_path, orientation=orientation, rescale=(2.0, -2048.0))
    volume = build_volume(read_datasets(read_folder(tmp_path).datasets))
    assert np.abs(volume.array - hu).max() <= 1.0 + 1e-3
    np.testing.assert_allclose(volume.affine[:3, 0], np.asarray(orientation[:3]) * 0.5, atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 1], np.asarray(orientation[3:]) * 0.7, atol=1e-6)
    normal = np.cross(orientation[:3], orientation[3:])
    np.testing.assert_allclose(volume.affine[:3, 2], normal * 1.25, atol=1e-5)
