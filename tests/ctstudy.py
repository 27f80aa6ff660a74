"""Write a synthetic CT volume (HU, numpy) as a DICOM CT Image Storage series.

Typical use, with the lung-nodule phantom::

    case = make_case(np.random.default_rng(5), nodules_mm=[((60.0, 70.0, 40.0), 12.0)])
    paths = write_ct_series(case.volume, case.spacing, tmp_path)

The volume is indexed ``[i, j, k]`` = (column, row, slice), the order MONAI ``LoadImage``
gives and :func:`gateway.infer.image.build_volume` returns: slice ``k`` is written with
pixel ``[row j, column i] = volume[i, j, k]``. Its position follows the orientation
(``ImageOrientationPatient``, row then column direction cosines) and ``origin`` (the
ImagePositionPatient of slice 0): slice ``k`` lies at ``origin + k * spacing[2] * n``
with ``n`` the cross product of the two directions. Stored values are
``round((hu - intercept) / slope)`` as int16 (uint16 when they only fit that), so the HU
round-trip to within ``slope / 2``. One file per slice, Explicit VR Little Endian.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["write_ct_series"]


def _stored_values(hu: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, int]:
    """Stored values and the PixelRepresentation (1: int16, 0: uint16)."""
    if slope == 0:
        raise ValueError("rescale slope must not be 0")
    stored = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    lo, hi = float(stored.min()), float(stored.max())
    if lo >= -32768 and hi <= 32767:
        return stored.astype(np.int16), 1
    if lo >= 0 and hi <= 65535:
        return stored.astype(np.uint16), 0
    raise ValueError(f"stored values {lo:g}..{hi:g} do not fit 16 bits; change the rescale")


def write_ct_series(
    case_volume_hu: np.ndarray,
    spacing: Sequence[float],
    folder: Path | str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str = "TEST^NODULE",
    patient_id: str = "PIDNOD1",
    accession: str = "ACCNOD1",
    series_description: str = "CHEST CT",
    body_part: str = "CHEST",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-175.0, -175.0, 0.0),
    shuffle_names: bool = False,
    rescale: tuple[float, float] = (1.0, -1024.0),
    series_number: int = 1,
) -> list[Path]:
    """Write ``case_volume_hu`` (X, Y, Z float HU) as one CT series; return the files in
    slice order (``k = 0`` first).

    ``spacing`` is (column mm, row mm, slice mm); ``rescale`` is (slope, intercept).
    ``shuffle_names`` gives the files names whose sorted order is not the slice order.
    """
    volume = np.asarray(case_volume_hu)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (X, Y, Z), got shape {volume.shape}")
    n_cols, n_rows, n_slices = volume.shape
    sx, sy, sz = (round(float(s), 6) for s in spacing)
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    origin_mm = np.asarray(origin, dtype=np.float64)
    slope, intercept = (float(v) for v in rescale)
    stored, pixel_representation = _stored_values(volume, slope, intercept)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240301"
    ds.StudyTime = "093000"
    ds.ReferringPhysicianName = "REFERRER^RITA"
    ds.StudyID = "1"
    ds.AccessionNumber = accession
    ds.StudyDescription = "CT CHEST"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "HFS"
    ds.SeriesDate = "20240301"
    ds.SeriesTime = "093000"
    # Frame of Reference, General Equipment
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "SYNTHETIC"
    ds.ManufacturerModelName = "ctstudy"
    # General Image, Image Plane
    ds.ContentDate = "20240301"
    ds.ContentTime = "093000"
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [round(float(v), 10) for v in iop]
    ds.PixelSpacing = [sy, sx]
    ds.SliceThickness = sz
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = n_rows
    ds.Columns = n_cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_representation
    # CT Image
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.RescaleType = "HU"
    ds.KVP = 120
    ds.ConvolutionKernel = "STANDARD"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500

    names = list(range(n_slices))
    if shuffle_names:
        names = [int(v) for v in np.random.default_rng(n_slices).permutation(n_slices)]
    dtype = "<i2" if pixel_representation else "<u2"
    paths: list[Path] = []
    for k in range(n_slices):
        position = origin_mm + k * sz * normal
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.SliceLocation = round(float(position @ normal), 6)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T, dtype=dtype).tobytes()
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationVersionName = "CTSTUDY_1"
        ds.file_meta = meta
        path = folder / f"ct{series_number:02d}_{names[k] + 1:04d}.dcm"
        dcmwrite(path, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
        paths.append(path)
    return paths
