"""Image input of the model runtime: from DICOM instances to a model-ready CT/MR volume.

The flow, from the files (or the Part-10 bytes the gateway store holds) to a volume::

    scan = read_folder(folder)                       # headers only (stop_before_pixels)
    selection = select_series(scan.datasets, SeriesRules.from_dict(rules))
    volume = build_volume(read_datasets(selection.instances))   # full reads, then pixels

    headers = [dataset_from_bytes(b, headers_only=True) for b in blobs]   # or from bytes
    selection = select_series(headers, rules)
    ...  # fetch the bytes of selection.instances again, dataset_from_bytes(b), build_volume

**Series selection** (:class:`SeriesRules`, :func:`select_series`) follows the
MONAI-Deploy idea of matching series attributes against a bundle's rules: every key of
the rules is a DICOM keyword whose value must match on the series' first instance (the
image instance with the lowest InstanceNumber), plus ``min_slices``. Among the matching
series the one with the most image instances wins (tie: lowest SeriesNumber, then
SeriesInstanceUID). Reasons and error messages never carry patient identifiers.

**Array and coordinate conventions** (those of MONAI ``LoadImage`` / ITK):

* ``Volume.array`` is float32 shaped ``(X, Y, Z)`` = (columns, rows, slices):
  ``array[i, j, k]`` is the pixel in column ``i``, row ``j`` of slice ``k``, i.e.
  ``pixel_array[j, i]`` of the k-th slice after sorting. Values are modality values
  (``stored * RescaleSlope + RescaleIntercept``; Hounsfield units for CT).
* ``Volume.affine`` (4x4, float64) maps ``[i, j, k, 1]`` to patient coordinates in mm in
  the DICOM patient system, LPS (x to the patient's left, y posterior, z head). Column
  ``i`` moves along the row direction cosines ``IOP[0:3]`` by ``PixelSpacing[1]``, row
  ``j`` along the column direction cosines ``IOP[3:6]`` by ``PixelSpacing[0]``, slice
  ``k`` along the normal ``n = IOP[0:3] x IOP[3:6]`` by the slice spacing. The origin is
  the ImagePositionPatient of slice ``k = 0``: the centre of its first transmitted pixel.
  This is LPS, not the RAS that NIfTI and MONAI's ``affine`` meta use: negate the first
  two rows to convert.
* Slices are sorted by the position of ImagePositionPatient along ``n`` (ascending), never
  by InstanceNumber or SliceLocation, so shuffled input and oblique stacks come out right.

**Slice spacing and regularity.** A stack is accepted only when it is evenly spaced:
every gap between successive slices (along ``n``) must be within ``10 % + 0.01 mm`` of the
median gap (:data:`GAP_TOLERANCE`, :data:`GAP_TOLERANCE_MM`), so a missing slice (a gap
twice the others) fails while positions rounded to a few decimals pass. The slice spacing
is then the mean gap, ``(last - first) / (count - 1)``: equal to the median for an evenly
spaced stack, but it does not accumulate the rounding of one gap over hundreds of slices.
Every slice must also lie within the same tolerance (of that spacing) of where the
evenly spaced stack puts it, so slowly growing gaps fail too. Slice positions off the
normal (gantry tilt: a sheared stack, which an affine cannot describe) fail as well.
Failures raise :class:`VolumeError` with a message saying why.

**Pixel data** is decoded by pydicom (``pydicom.pixels.pixel_array``: the decoder behind
``Dataset.pixel_array``, without caching a decoded copy on each dataset), including the
compressed transfer syntaxes for which a decoder plugin is installed; the volume is
preallocated and filled slice by slice. Multi-frame (enhanced) instances are not
supported yet.

Everything here is a pure function of its input except :func:`read_folder` and
:func:`read_datasets`, which read files.  Files and bytes are read by the gateway's one
DICOM reader, :func:`gateway.dicom.header.read_dataset`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from gateway.dicom.header import read_dataset
from gateway.dicom.part10 import is_part10
from gateway.errors import MalformedInput

__all__ = [
    "GAP_TOLERANCE",
    "GAP_TOLERANCE_MM",
    "Condition",
    "FolderScan",
    "NoSeriesMatch",
    "Selection",
    "SeriesRules",
    "Volume",
    "VolumeError",
    "build_volume",
    "dataset_from_bytes",
    "nearest_slice",
    "patient_to_voxel",
    "read_datasets",
    "read_folder",
    "select_series",
    "voxel_to_patient",
]

#: A gap between slices may deviate from the slice spacing by this fraction of it ...
GAP_TOLERANCE = 0.10
#: ... plus this many mm (position rounding).
GAP_TOLERANCE_MM = 0.01
#: Largest difference between the direction cosines of two slices of one volume.
ORIENTATION_TOLERANCE = 1e-4
#: Largest difference (mm) between the PixelSpacing of two slices of one volume.
PIXEL_SPACING_TOLERANCE = 1e-4
#: Slices closer than this (mm) along the normal share a position.
SAME_POSITION_MM = 1e-3
#: Largest in-plane offset of a slice from the stack's axis, as a fraction of a pixel.
INPLANE_TOLERANCE = 0.1

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Keywords whose values never go into a reason or an error message.
_IDENTIFYING_KEYWORDS = frozenset(
    {
        "AccessionNumber",
        "StudyID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "MedicalRecordLocator",
    }
)


class VolumeError(ValueError):
    """The instances cannot be stacked into one volume (the message says why)."""


class NoSeriesMatch(ValueError):
    """No series of the study satisfies the selection rules.

    ``reasons`` maps each SeriesInstanceUID to why it failed (as in :class:`Selection`).
    """

    def __init__(self, message: str, reasons: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons: dict[str, str] = dict(reasons or {})


def _is_identifying(keyword: str) -> bool:
    if keyword in _IDENTIFYING_KEYWORDS:
        return True
    if "Patient" in keyword and keyword not in {"PatientPosition", "PatientOrientation"}:
        return True
    try:
        return dictionary_VR(keyword) == "PN"
    except KeyError:
        return False


# --- series selection ------------------------------------------------------------------


def _text(value: Any) -> str:
    return str(value).strip()


def _same(actual: str, expected: str) -> bool:
    """Case-insensitive, stripped string equality; numbers compare as numbers."""
    if actual.casefold() == expected.casefold():
        return True
    try:
        return float(actual) == float(expected)
    except ValueError:
        return False


@dataclass(frozen=True)
class Condition:
    """One rule: ``keyword`` must equal one of ``values``, or match ``pattern``."""

    keyword: str
    values: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None

    def check(self, ds: Dataset) -> str | None:
        """``None`` when ``ds`` satisfies the condition, else the reason it does not."""
        value = ds.get(self.keyword)
        values = value if isinstance(value, MultiValue | list) else [value]
        items = [_text(v) for v in values if v is not None]
        if not any(items):
            return f"{self.keyword} is missing"
        shown = "\\".join(items)
        hide = _is_identifying(self.keyword)
        if self.pattern is not None:
            candidates = [*items, shown] if len(items) > 1 else items
            if any(self.pattern.search(c) for c in candidates):
                return None
            if hide:
                return f"{self.keyword} does not match the rule"
            return f"{self.keyword} {shown!r} does not match /{self.pattern.pattern}/"
        if any(_same(item, expected) for item in items for expected in self.values):
            return None
        if hide:
            return f"{self.keyword} does not match the rule"
        if len(self.values) == 1:
            return f"{self.keyword} is {shown}, not {self.values[0]}"
        return f"{self.keyword} is {shown}, not one of {', '.join(self.values)}"


@dataclass(frozen=True)
class SeriesRules:
    """Which series a model takes: DICOM attribute conditions plus a minimum slice count.

    Build it with :meth:`from_dict` from a bundle's ``gateway.series_selection``.
    """

    conditions: tuple[Condition, ...] = ()
    min_slices: int = 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeriesRules:
        """Rules from ``{"Modality": "CT", "BodyPartExamined": ["CHEST", "LUNG"],
        "SeriesDescription": {"regex": "(?i)lung"}, "min_slices": 20}``.

        A key is a DICOM keyword (or ``min_slices``); its value is a string or number
        (equality, strings case-insensitive and stripped), a non-empty list of those (any
        of them) or ``{"regex": pattern}`` (``re.search``). On a multi-valued attribute
        (ImageType) a condition holds when it holds for one of the values; a regex is also
        tried on the values joined with backslashes. Raises :class:`ValueError` on an
        unknown key or a malformed value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"series selection must be a mapping, got {type(d).__name__}")
        conditions: list[Condition] = []
        min_slices = 1
        for key, spec in d.items():
            if key == "min_slices":
                if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
                    raise ValueError(
                        f"series selection: min_slices must be an int >= 1, got {spec!r}"
                    )
                min_slices = spec
                continue
            if not isinstance(key, str) or key not in keyword_dict:
                close = difflib.get_close_matches(str(key), [*keyword_dict, "min_slices"], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"series selection: unknown key {key!r}: not a DICOM keyword nor "
                    f"'min_slices'{hint}"
                )
            if dictionary_VR(key) == "SQ":
                raise ValueError(f"series selection: {key} is a sequence and cannot be matched")
            conditions.append(_condition(key, spec))
        return cls(tuple(conditions), min_slices)


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(
            f"series selection: {key} must be a string, a number, a list of those or "
            f"{{'regex': ...}}, got {value!r}"
        )
    return _text(value)


def _condition(key: str, spec: Any) -> Condition:
    if isinstance(spec, Mapping):
        if set(spec) != {"regex"} or not isinstance(spec["regex"], str):
            raise ValueError(
                f"series selection: {key} as a mapping must be {{'regex': '<pattern>'}}, "
                f"got {dict(spec)!r}"
            )
        try:
            return Condition(key, pattern=re.compile(spec["regex"]))
        except re.error as exc:
            raise ValueError(
                f"series selection: {key}: bad regex {spec['regex']!r}: {exc}"
            ) from exc
    if isinstance(spec, list | tuple):
        if not spec:
            raise ValueError(f"series selection: {key}: the list of values is empty")
        return Condition(key, values=tuple(_scalar(key, v) for v in spec))
    return Condition(key, values=(_scalar(key, spec),))


@dataclass(frozen=True)
class Selection:
    """The chosen series: its image instances, and why every other series was not chosen."""

    series_uid: str
    instances: list[Dataset]
    reasons: dict[str, str] = field(default_factory=dict)


def _has_image(ds: Dataset) -> bool:
    return any(k in ds for k in _PIXEL_KEYWORDS) or ("Rows" in ds and "Columns" in ds)


def _instance_number(ds: Dataset) -> float:
    try:
        return float(ds.InstanceNumber)
    except (AttributeError, TypeError, ValueError):
        return math.inf


def _series_number(ds: Dataset) -> float:
    try:
        return float(ds.SeriesNumber)
    except (AttributeError, TypeError, ValueError):
        return math.inf


def _series_label(first: Dataset, count: int) -> str:
    number = _series_number(first)
    num = "?" if math.isinf(number) else f"{number:g}"
    modality = _text(first.get("Modality", "")) or "?"
    description = _text(first.get("SeriesDescription", ""))[:64]
    desc = f" {description!r}" if description else ""
    return f"series {num} ({modality}{desc}, {count} image instance{'s' if count != 1 else ''})"


def select_series(headers: Iterable[Dataset], rules: SeriesRules) -> Selection:
    """Pick the series a model takes from the instances of a study.

    ``headers`` may be read with ``stop_before_pixels``. Instances are grouped by
    SeriesInstanceUID; a series matches when every condition holds on its first image
    instance (lowest InstanceNumber) and it has at least ``rules.min_slices`` image
    instances (PixelData, or Rows and Columns). The matching series with the most image
    instances wins (tie: lowest SeriesNumber, then UID). :attr:`Selection.instances`
    holds its image instances in input order. Raises :class:`NoSeriesMatch` listing
    why each series fails; instances without a SeriesInstanceUID are reported under "".
    """
    groups: dict[str, list[Dataset]] = {}
    for ds in headers:
        groups.setdefault(_text(ds.get("SeriesInstanceUID", "")), []).append(ds)

    reasons: dict[str, str] = {}
    labels: dict[str, str] = {}
    matches: list[tuple[int, float, str]] = []
    for uid, instances in groups.items():
        images = [ds for ds in instances if _has_image(ds)]
        first = min(images or instances, key=_instance_number)
        labels[uid] = _series_label(first, len(images))
        if not uid:
            reasons[uid] = f"{len(instances)} instance(s) without a SeriesInstanceUID"
            continue
        if not images:
            reasons[uid] = "no image instances"
            continue
        failed = [r for r in (c.check(first) for c in rules.conditions) if r is not None]
        if len(images) < rules.min_slices:
            failed.append(f"{len(images)} slices, fewer than {rules.min_slices}")
        if failed:
            reasons[uid] = "; ".join(failed)
        else:
            matches.append((-len(images), _series_number(first), uid))

    if not matches:
        detail = "; ".join(f"{labels[uid]}: {reasons[uid]}" for uid in groups) or "no instances"
        raise NoSeriesMatch(f"no series matches the selection rules: {detail}", reasons)
    matches.sort()
    best_count, best_number, best_uid = matches[0]
    for count, number, uid in matches[1:]:
        if count > best_count:
            reasons[uid] = f"matches, but has fewer slices ({-count} < {-best_count})"
        elif number > best_number:
            reasons[uid] = "matches with as many slices, but has a higher SeriesNumber"
        else:
            reasons[uid] = "matches with as many slices, but has a higher SeriesInstanceUID"
    instances = [ds for ds in groups[best_uid] if _has_image(ds)]
    return Selection(best_uid, instances, reasons)


# --- the volume ------------------------------------------------------------------------


@dataclass
class Volume:
    """A stack of slices as one array, with where it lies in the patient (LPS, mm)."""

    array: np.ndarray  # float32, (X=columns, Y=rows, Z=slices)
    affine: np.ndarray  # 4x4 float64, [i, j, k, 1] -> LPS mm
    spacing: tuple[float, float, float]  # (column mm, row mm, slice mm)
    sop_instance_uids: list[str]  # in k order
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str


def _floats(ds: Dataset, keyword: str, count: int, where: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or value == "":
        raise VolumeError(f"{where} has no {keyword}")
    try:
        out = np.array(
            [float(v) for v in (value if isinstance(value, MultiValue | list) else [value])]
        )
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{where}: {keyword} is not numeric") from exc
    if out.shape != (count,) or not np.all(np.isfinite(out)):
        raise VolumeError(f"{where}: {keyword} must have {count} finite values")
    return out


def _where(index: int, ds: Dataset) -> str:
    number = ds.get("InstanceNumber")
    return (
        f"instance {number}" if number not in (None, "") else f"instance #{index + 1} (input order)"
    )


def _decode(ds: Dataset, where: str) -> np.ndarray:
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise VolumeError(f"{where} has no pixel data (read with stop_before_pixels?)")
    tsyntax = getattr(ds, "file_meta", FileMetaDataset()).get("TransferSyntaxUID")
    if not tsyntax:
        raise VolumeError(f"{where} has no Transfer Syntax UID in its file meta")
    try:
        pixels: np.ndarray = pixel_array(ds)
    except Exception as exc:  # pydicom raises many kinds for undecodable data
        ts = UID(str(tsyntax))
        raise VolumeError(
            f"{where}: cannot decode pixel data in transfer syntax {ts.name} ({ts}): {exc}"
        ) from exc
    return pixels


def build_volume(datasets: Sequence[Dataset]) -> Volume:
    """Stack the slices of one series (full datasets, any order) into a :class:`Volume`.

    Raises :class:`VolumeError` when the slices do not make one evenly spaced volume: fewer
    than two, multi-frame, position or orientation missing, orientation / size / pixel
    spacing differing, two slices at one position, uneven gaps, a sheared stack, different
    series, or pixel data that cannot be decoded.
    """
    if len(datasets) < 2:
        raise VolumeError(f"a volume needs at least 2 slices, got {len(datasets)}")
    for index, ds in enumerate(datasets):
        frames = ds.get("NumberOfFrames")
        if frames not in (None, "") and int(frames) > 1:
            raise VolumeError(
                f"{_where(index, ds)} has {int(frames)} frames: multi-frame (enhanced) images "
                "are not supported yet"
            )
    series = {_text(ds.get("SeriesInstanceUID", "")) for ds in datasets} - {""}
    if len(series) > 1:
        raise VolumeError(f"the slices come from {len(series)} different series")
    frames_of_ref = {_text(ds.get("FrameOfReferenceUID", "")) for ds in datasets} - {""}
    if len(frames_of_ref) > 1:
        raise VolumeError(f"the slices have {len(frames_of_ref)} different FrameOfReferenceUIDs")

    first = datasets[0]
    where0 = _where(0, first)
    iop0 = _floats(first, "ImageOrientationPatient", 6, where0)
    row_dir, col_dir = iop0[:3], iop0[3:]
    if min(np.linalg.norm(row_dir), np.linalg.norm(col_dir)) < 0.5:
        raise VolumeError(f"{where0}: ImageOrientationPatient has a zero direction")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise VolumeError(f"{where0}: ImageOrientationPatient directions are not orthogonal")
    normal = np.cross(row_dir, col_dir)
    rows, cols = int(first.get("Rows") or 0), int(first.get("Columns") or 0)
    if rows < 1 or cols < 1:
        raise VolumeError(f"{where0} has no Rows/Columns")
    pixel_spacing = _floats(first, "PixelSpacing", 2, where0)
    if np.any(pixel_spacing <= 0):
        raise VolumeError(f"{where0}: PixelSpacing must be positive")

    positions = np.empty((len(datasets), 3))
    for index, ds in enumerate(datasets):
        where = _where(index, ds)
        if (
            np.max(np.abs(_floats(ds, "ImageOrientationPatient", 6, where) - iop0))
            > ORIENTATION_TOLERANCE
        ):
            raise VolumeError(f"the slices have different orientations ({where} and {where0})")
        if (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) != (rows, cols):
            raise VolumeError(f"the slices have different Rows/Columns ({where} and {where0})")
        spacing_k = _floats(ds, "PixelSpacing", 2, where)
        if np.max(np.abs(spacing_k - pixel_spacing)) > PIXEL_SPACING_TOLERANCE:
            raise VolumeError(f"the slices have different PixelSpacing ({where} and {where0})")
        positions[index] = _floats(ds, "ImagePositionPatient", 3, where)

    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    same = np.flatnonzero(gaps < SAME_POSITION_MM)
    if same.size:
        a, b = int(order[same[0]]), int(order[same[0] + 1])
        raise VolumeError(
            f"{_where(a, datasets[a])} and {_where(b, datasets[b])} share a slice position "
            f"({along[same[0]]:.3f} mm along the normal)"
        )
    count = len(datasets)
    median_gap = float(np.median(gaps))
    deviation = np.abs(gaps - median_gap)
    g = int(np.argmax(deviation))
    if float(deviation[g]) > GAP_TOLERANCE * median_gap + GAP_TOLERANCE_MM:
        raise VolumeError(
            f"the slices are not evenly spaced: a gap of {gaps[g]:.3f} mm between slices "
            f"{g} and {g + 1} (sorted), where the median gap is {median_gap:.3f} mm "
            "(missing slices?)"
        )
    slice_spacing = float(along[-1] - along[0]) / (count - 1)
    tolerance = GAP_TOLERANCE * slice_spacing + GAP_TOLERANCE_MM
    drift = np.abs(along - along[0] - slice_spacing * np.arange(count))
    if float(drift.max()) > tolerance:
        raise VolumeError(
            f"the slices are not evenly spaced: slice {int(drift.argmax())} (sorted) is "
            f"{float(drift.max()):.3f} mm off an even {slice_spacing:.3f} mm spacing"
        )
    sorted_positions = positions[order]
    offsets = sorted_positions - sorted_positions[0]
    inplane = offsets - np.outer(offsets @ normal, normal)
    if float(np.linalg.norm(inplane, axis=1).max()) > INPLANE_TOLERANCE * float(
        pixel_spacing.min()
    ):
        raise VolumeError(
            "the slice positions do not lie along the slice normal (gantry tilt or a "
            "sheared stack?): resample before use"
        )

    col_spacing, row_spacing = float(pixel_spacing[1]), float(pixel_spacing[0])
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = normal * slice_spacing
    affine[:3, 3] = sorted_positions[0]

    array = np.empty((cols, rows, count), dtype=np.float32)
    for k, index in enumerate(order):
        ds = datasets[int(index)]
        where = _where(int(index), ds)
        pixels = _decode(ds, where)
        if pixels.shape != (rows, cols):
            raise VolumeError(
                f"{where}: pixel data has shape {pixels.shape}, expected ({rows}, {cols}) "
                "(only single-sample grayscale images are supported)"
            )
        out = array[:, :, k]
        out[...] = pixels.T
        slope, intercept = _rescale(ds, where)
        if slope != 1.0:
            out *= np.float32(slope)
        if intercept != 0.0:
            out += np.float32(intercept)

    first_sorted = datasets[int(order[0])]
    return Volume(
        array=array,
        affine=affine,
        spacing=(col_spacing, row_spacing, slice_spacing),
        sop_instance_uids=[_text(datasets[int(i)].get("SOPInstanceUID", "")) for i in order],
        series_uid=_text(first_sorted.get("SeriesInstanceUID", "")),
        study_uid=_text(first_sorted.get("StudyInstanceUID", "")),
        frame_of_reference_uid=_text(first_sorted.get("FrameOfReferenceUID", "")),
        modality=_text(first_sorted.get("Modality", "")),
    )


def _rescale(ds: Dataset, where: str) -> tuple[float, float]:
    try:
        slope = ds.get("RescaleSlope")
        intercept = ds.get("RescaleIntercept")
        result = (
            1.0 if slope in (None, "") else float(slope),
            0.0 if intercept in (None, "") else float(intercept),
        )
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{where}: RescaleSlope/RescaleIntercept is not numeric") from exc
    if not all(math.isfinite(v) for v in result):
        raise VolumeError(f"{where}: RescaleSlope/RescaleIntercept is not finite")
    return result


# --- coordinates -----------------------------------------------------------------------


def voxel_to_patient(affine: np.ndarray, ijk: Any) -> np.ndarray:
    """Patient coordinates (LPS mm) of voxel index ``ijk``: one ``(3,)`` or many ``(N, 3)``."""
    points = np.asarray(ijk, dtype=np.float64)
    a = np.asarray(affine, dtype=np.float64)
    out: np.ndarray = points @ a[:3, :3].T + a[:3, 3]
    return out


def patient_to_voxel(affine: np.ndarray, xyz: Any) -> np.ndarray:
    """Fractional voxel index of patient point(s) ``xyz`` (LPS mm), ``(3,)`` or ``(N, 3)``."""
    points = np.asarray(xyz, dtype=np.float64)
    a = np.asarray(affine, dtype=np.float64)
    out: np.ndarray = np.linalg.solve(a[:3, :3], (points - a[:3, 3]).T).T
    return out


def nearest_slice(volume: Volume, k: float) -> str:
    """SOP Instance UID of the slice nearest to (fractional) slice index ``k``, clipped."""
    if not math.isfinite(k):
        raise ValueError(f"slice index must be finite, got {k}")
    last = len(volume.sop_instance_uids) - 1
    return volume.sop_instance_uids[min(max(math.floor(k + 0.5), 0), last)]


# --- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderScan:
    """What :func:`read_folder` found: headers of the DICOM files, and the files skipped."""

    datasets: list[Dataset]
    skipped: list[Path]


def read_folder(path: str | os.PathLike[str]) -> FolderScan:
    """Headers (``stop_before_pixels``) of every DICOM Part-10 file under ``path``.

    Recursive, in sorted path order. Each dataset keeps its ``filename`` so that
    :func:`read_datasets` can read it fully. Files that are not DICOM Part-10 (no
    ``DICM`` preamble, unreadable, corrupt) and DICOMDIRs are listed in
    :attr:`FolderScan.skipped` instead.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    datasets: list[Dataset] = []
    skipped: list[Path] = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = read_dataset(file)
        except MalformedInput:  # not DICOM, truncated, unreadable: all the same here
            skipped.append(file)
            continue
        sop_class = getattr(ds, "file_meta", FileMetaDataset()).get("MediaStorageSOPClassUID")
        if sop_class == MediaStorageDirectoryStorage:
            skipped.append(file)
            continue
        datasets.append(ds)
    return FolderScan(datasets, skipped)


def read_datasets(sources: Iterable[str | os.PathLike[str] | Dataset]) -> list[Dataset]:
    """Full datasets (with pixel data) for paths, or for headers read by :func:`read_folder`.

    A dataset that already holds pixel data is returned as it is; a header-only dataset is
    read again from its ``filename``. Raises :class:`VolumeError` when a file cannot be
    read (the message names the file, not its folder).
    """
    out: list[Dataset] = []
    for source in sources:
        if isinstance(source, Dataset):
            if any(k in source for k in _PIXEL_KEYWORDS):
                out.append(source)
                continue
            filename = getattr(source, "filename", None)
            if not isinstance(filename, str | os.PathLike) or not filename:
                raise VolumeError(
                    "a header-only dataset without a filename: read it again with "
                    "dataset_from_bytes(data)"
                )
            source = filename
        try:
            out.append(read_dataset(Path(source), pixels=True))
        except MalformedInput as exc:  # not DICOM, unreadable, truncated data ...
            raise VolumeError(f"cannot read {Path(source).name}: {exc}") from exc
    return out


def dataset_from_bytes(data: bytes, *, headers_only: bool = False) -> Dataset:
    """A dataset from DICOM bytes (Part-10 as the gateway store keeps them).

    Data without the Part-10 preamble is read with ``force=True``; its transfer syntax is
    then taken from how it was parsed. Raises :class:`ValueError` when the bytes are not
    DICOM. pydicom reads truncated data leniently: a dataset cut inside its pixel data
    comes back without PixelData (and :func:`build_volume` says so).
    """
    if is_part10(data):
        try:
            ds = read_dataset(data, pixels=not headers_only)
        except MalformedInput as exc:  # truncated or corrupt Part-10 data
            raise ValueError(f"not a readable DICOM dataset: {exc}") from exc
        if len(ds) == 0:
            raise ValueError("not a DICOM dataset: no data elements after the file meta")
        return ds
    try:  # no preamble: a bare dataset
        ds = read_dataset(data, pixels=not headers_only, force=True)
    except MalformedInput as exc:
        raise ValueError(f"not a DICOM dataset: {exc}") from exc
    if len(ds) == 0 or ("SOPClassUID" not in ds and "SOPInstanceUID" not in ds):
        raise ValueError("not a DICOM dataset: no SOP Class/Instance UID found")
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif little is False:
            meta.TransferSyntaxUID = ExplicitVRBigEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
