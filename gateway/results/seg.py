"""An image model's label mask as a DICOM Segmentation (binary) over its source series.

Pure: the result, the mask and the source headers in, a :class:`highdicom.seg.Segmentation`
out.  The mask is indexed ``[i, j, k]`` = (column, row, slice) like the volume the model
saw, so ``mask[:, :, k].T`` is the frame of the source slice ``k`` (the ``k``-th UID of
``result["input"]["sop_instance_uids"]``).  Each mask label that a finding names becomes
one segment, numbered in label order; its tracking UID is the SR's tracking UID of the
first finding with that label (see :func:`gateway.results.sr.build_sr`).
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset

from gateway.results.codes import (
    ABNORMAL_STRUCTURE,
    ALGORITHM_FAMILY,
    MANUFACTURER,
    ResultModel,
    code,
    finding_site,
    result_time,
    stamp_times,
    tracking_uid,
    with_type2,
)

__all__ = ["SEG_SERIES_NUMBER", "build_seg", "order_source"]

#: SeriesNumber of the SEG series (the SR's is one more).
SEG_SERIES_NUMBER = 9001


def order_source(result: Mapping[str, Any], source: Sequence[Dataset]) -> list[Dataset]:
    """The source headers in the result's slice order; ``ValueError`` when one is missing."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
    uids = [str(u) for u in (result.get("input") or {}).get("sop_instance_uids") or []]
    if not uids:
        raise ValueError("image result has no input.sop_instance_uids")
    missing = [u for u in uids if u not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} source instance(s) of the result are not in source")
    return [by_uid[u] for u in uids]


def build_seg(
    result: Mapping[str, Any],
    mask: np.ndarray,
    source: Sequence[Dataset],
    *,
    now: dt.datetime | None = None,
) -> hd.seg.Segmentation | None:
    """The SEG of ``mask`` over the source series, or ``None`` when no finding's label has
    any foreground.

    ``now`` stamps ContentDate/Time and InstanceCreationDate/Time (default:
    :func:`~gateway.results.codes.result_time`).
    """
    model = ResultModel.from_result(result)
    images = order_source(result, source)
    study_uid = str(images[0].StudyInstanceUID)
    mask = np.asarray(mask)
    if mask.ndim != 3 or mask.shape[2] != len(images):
        raise ValueError(
            f"mask shape {mask.shape} does not match {len(images)} source slices (X, Y, Z)"
        )
    if mask.shape[:2] != (int(images[0].Columns), int(images[0].Rows)):
        raise ValueError(
            f"mask shape {mask.shape} does not match {images[0].Columns} columns x "
            f"{images[0].Rows} rows"
        )

    first_finding: dict[int, tuple[int, Mapping[str, Any]]] = {}
    for index, finding in enumerate(result.get("findings") or [], start=1):
        label = finding.get("label")
        if label is not None and int(label) not in first_finding:
            first_finding[int(label)] = (index, finding)
    labels = [int(v) for v in np.unique(mask) if int(v) in first_finding]
    if not labels:
        return None

    # (slices, rows, columns) with pixel value = segment number, 0 elsewhere
    frames = np.zeros(mask.shape[::-1], dtype=np.uint8)
    segments = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name, family=ALGORITHM_FAMILY, version=model.version
    )
    for number, label in enumerate(labels, start=1):
        frames[mask.transpose(2, 1, 0) == label] = number
        index, finding = first_finding[label]
        finding_code = code(finding["code"])
        site = finding_site(finding_code)
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(finding.get("finding") or finding_code.meaning)[:64],
                segmented_property_category=(
                    code(finding["category"]) if finding.get("category") else ABNORMAL_STRUCTURE
                ),
                segmented_property_type=finding_code,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=tracking_uid(model, study_uid, index),
                tracking_id=f"finding {index}",
                anatomic_regions=[site] if site is not None else None,
            )
        )

    first = with_type2(images[0])
    if not first.get("SliceThickness"):
        # Type 2 in CT/MR, so maybe empty; highdicom copies the first source's value into
        # the SEG's Type 1C one (and prefers it to a pixel_measures argument).  The slice
        # spacing the model used is the thickness of the segmentation's voxels.
        spacing = (result.get("input") or {}).get("spacing")
        if not spacing:
            raise ValueError("source has no SliceThickness and the result no input.spacing")
        first = copy.deepcopy(first) if first is images[0] else first
        first.SliceThickness = float(spacing[2])
    when = (now or result_time(result, images[0])).replace(microsecond=0)
    seg = hd.seg.Segmentation(
        source_images=[first, *images[1:]],
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=model.uid("seg-series", study_uid),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=model.uid("seg-instance", study_uid),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.bundle,
        software_versions=model.version,
        device_serial_number=model.serial_number,
        content_label=re.sub(r"[^A-Z0-9_ ]", "_", model.bundle.upper())[:16] or "AI_SEG",
        content_description=model.description("segmentation"),
        series_description=model.description("segmentation"),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        contributing_equipment=model.contributing_equipment(when),
    )
    stamp_times(seg, when)
    return seg
