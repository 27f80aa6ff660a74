"""A model result as a DICOM Comprehensive 3D SR: TID 1500 Measurement Report as IHE AI
Results (AIR) profiles it.

Pure: the result, the source headers (and the SEG, when one was made) in, a
:class:`highdicom.sr.Comprehensive3DSR` out.  The document

- joins the source study (patient and study copied from the sources by highdicom) as a new
  series whose UIDs derive from (study, model, version): a re-run replaces it;
- reports the imaging procedure (the source's code, else a fallback by modality and body
  part), a device observer (the model) and the model in Contributing Equipment;
- holds one measurement group per image finding: a TID 1411 volumetric ROI referencing its
  SEG segment, or without a SEG a TID 1410 planar ROI, a circle of the finding's diameter
  on the source slice nearest its centre; with diameter, volume and probability;
- holds the study-level classification, and each finding of a text result, as coded
  qualitative evaluations (Present / Absent / Undetermined) in TID 1501 groups.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from gateway.results.codes import (
    ABSENT,
    ALGORITHM_FAMILY,
    DIAMETER,
    LANGUAGE,
    MANUFACTURER,
    PRESENT,
    PROBABILITY,
    UNIT_MM,
    UNIT_MM3,
    UNIT_PROBABILITY,
    VOLUME,
    ResultModel,
    code,
    finding_site,
    procedure_fallback,
    result_time,
    stamp_times,
    status_value,
    tracking_uid,
    with_type2,
)

__all__ = ["SR_SERIES_NUMBER", "build_sr", "procedure_codes"]

#: SeriesNumber of the SR series (the SEG's is 9001).
SR_SERIES_NUMBER = 9002

MeasurementGroup = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


def build_sr(
    result: Mapping[str, Any],
    source: Sequence[Dataset],
    *,
    seg: hd.seg.Segmentation | None = None,
    now: dt.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``result``, filed in the study of ``source``.

    ``source`` holds headers of the study's instances (pixel data not needed): for an
    image result the series the model ran on, for a text result at least one instance of
    the study the report is about.  ``seg`` is :func:`gateway.results.seg.build_seg`'s
    output for the same result; findings then reference its segments.  ``now`` is when
    the result was made (ContentDate/Time; default
    :func:`~gateway.results.codes.result_time`).  Raises ``ValueError`` on a result or
    source that cannot make a valid document.
    """
    if not source:
        raise ValueError("build_sr needs at least one source instance")
    model = ResultModel.from_result(result)
    source = _canonical_order(result, source)
    study_uid = str(source[0].StudyInstanceUID)
    given = (result.get("input") or {}).get("study_uid")
    if given and str(given) != study_uid:
        raise ValueError("result's input.study_uid is not the study of the source instances")
    when = (now or result_time(result, source[0])).replace(microsecond=0)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, family=ALGORITHM_FAMILY
    )

    kind = (result.get("input") or {}).get("kind")
    if kind == "image":
        groups = _image_groups(result, model, study_uid, source, seg, algorithm)
    elif kind == "text":
        groups = _text_groups(result, model, study_uid, algorithm)
    else:
        raise ValueError(f"result input kind must be 'image' or 'text', got {kind!r}")
    if not groups:
        raise ValueError("result has no findings and no classification: nothing to report")

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.uid("device", study_uid),
        name=model.name,
        manufacturer_name=MANUFACTURER,
        model_name=model.bundle,
        serial_number=model.serial_number,
    )
    procedures = procedure_codes(source)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=device,
            )
        ),
        procedure_reported=procedures,
        imaging_measurements=groups,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            LANGUAGE
        ),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(source, seg),
        content=report[0],
        series_instance_uid=model.uid("sr-series", study_uid),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=model.uid("sr-instance", study_uid),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.bundle,
        software_versions=model.version,
        device_serial_number=model.serial_number,
        series_description=model.description(),
        is_complete=True,  # all the model says; PRELIMINARY and UNVERIFIED: nobody reviewed it
        performed_procedure_codes=procedures,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        contributing_equipment=model.contributing_equipment(when),
    )
    stamp_times(sr, when)
    return sr


def procedure_codes(source: Sequence[Dataset]) -> list[hd.sr.CodedConcept]:
    """The imaging procedure: the sources' ProcedureCodeSequence, else their
    RequestedProcedureCodeSequence (top level or in RequestAttributesSequence), else
    :func:`~gateway.results.codes.procedure_fallback` by Modality and BodyPartExamined."""
    for keyword in ("ProcedureCodeSequence", "RequestedProcedureCodeSequence"):
        found: dict[tuple[str, str], hd.sr.CodedConcept] = {}
        for ds in source:
            items = list(ds.get(keyword) or [])
            if keyword == "RequestedProcedureCodeSequence":
                for request in ds.get("RequestAttributesSequence") or []:
                    items += list(request.get(keyword) or [])
            for item in items:
                try:
                    concept = hd.sr.CodedConcept.from_dataset(item)
                except (AttributeError, TypeError, ValueError):
                    continue  # an incomplete code item: not usable, try the next
                found.setdefault((concept.scheme_designator, concept.value), concept)
        if found:
            return list(found.values())
    modality, body_part = (str(source[0].get(k) or "") for k in ("Modality", "BodyPartExamined"))
    return [procedure_fallback(modality, body_part)]


# --- content ---------------------------------------------------------------------------


def _image_groups(
    result: Mapping[str, Any],
    model: ResultModel,
    study_uid: str,
    source: Sequence[Dataset],
    seg: hd.seg.Segmentation | None,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[MeasurementGroup]:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
    segments = {}
    if seg is not None:
        segments = {str(s.get("TrackingUID")): int(s.SegmentNumber) for s in seg.SegmentSequence}
    findings = list(result.get("findings") or [])
    first_with_label: dict[int, int] = {}
    groups: list[MeasurementGroup] = []
    for index, finding in enumerate(findings, start=1):
        finding_code = code(finding["code"])
        site = finding_site(finding_code)
        common: dict[str, Any] = {
            "tracking_identifier": hd.sr.TrackingIdentifier(
                uid=tracking_uid(model, study_uid, index), identifier=f"finding {index}"
            ),
            "finding_type": finding_code,
            "algorithm_id": algorithm,
            "finding_sites": [hd.sr.FindingSite(site)] if site is not None else None,
            "measurements": _measurements(finding),
        }
        label = finding.get("label")
        first = first_with_label.setdefault(int(label), index) if label is not None else index
        number = segments.get(tracking_uid(model, study_uid, first))
        if seg is not None and number is not None:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=_referenced_segment(seg, number),
                    **common,
                )
            )
        else:
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    referenced_region=_circle(finding, by_uid, result), **common
                )
            )
    classification = result.get("classification")
    if classification:
        probability = classification.get("probability")
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=model.uid("classification", study_uid), identifier="classification"
                ),
                algorithm_id=algorithm,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        code(classification["code"]), _classification_value(classification)
                    )
                ],
                measurements=([_probability(probability)] if probability is not None else None),
            )
        )
    return groups


def _text_groups(
    result: Mapping[str, Any],
    model: ResultModel,
    study_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[MeasurementGroup]:
    groups: list[MeasurementGroup] = []
    for index, finding in enumerate(result.get("findings") or [], start=1):
        concept = code(("SCT", str(finding["code"]), str(finding["meaning"])))
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid(model, study_uid, index), identifier=f"finding {index}"
                ),
                algorithm_id=algorithm,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(concept, status_value(str(finding["status"])))
                ],
            )
        )
    return groups


def _measurements(finding: Mapping[str, Any]) -> list[hd.sr.Measurement]:
    out = [
        hd.sr.Measurement(name=DIAMETER, value=float(finding["diameter_mm"]), unit=UNIT_MM),
        hd.sr.Measurement(name=VOLUME, value=float(finding["volume_mm3"]), unit=UNIT_MM3),
    ]
    if finding.get("probability") is not None:
        out.append(_probability(finding["probability"]))
    return out


def _probability(value: Any) -> hd.sr.Measurement:
    p = float(value)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {p}")
    return hd.sr.Measurement(name=PROBABILITY, value=p, unit=UNIT_PROBABILITY)


def _classification_value(classification: Mapping[str, Any]) -> hd.sr.CodedConcept:
    """Present/Absent from ``status``, ``present`` or a ``*_present`` flag."""
    if "status" in classification:
        return status_value(str(classification["status"]))
    for key, value in classification.items():
        if (key == "present" or key.endswith("_present")) and isinstance(value, bool):
            return PRESENT if value else ABSENT
    raise ValueError("classification says neither status nor present (true/false)")


def _circle(
    finding: Mapping[str, Any], by_uid: Mapping[str, Dataset], result: Mapping[str, Any]
) -> hd.sr.ImageRegion:
    """The finding on the source slice nearest its centre: a circle of its diameter
    around the centre, in that image's pixel coordinates (pixel centres at +0.5)."""
    uid = str(finding.get("referenced_sop_instance_uid") or "")
    image = by_uid.get(uid)
    if image is None:
        raise ValueError("finding's referenced_sop_instance_uid is not a source instance")
    i, j = (float(v) + 0.5 for v in finding["centre_voxel"][:2])
    spacing = image.get("PixelSpacing") or [0.0, result["input"]["spacing"][0]]
    radius = max(float(finding["diameter_mm"]) / 2 / float(spacing[1]), 0.5)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=np.array([[i, j], [i + radius, j]]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(image.SOPClassUID), referenced_sop_instance_uid=uid
        ),
    )


def _canonical_order(result: Mapping[str, Any], source: Sequence[Dataset]) -> list[Dataset]:
    """The sources in the result's slice order, any others after by UID: the output must
    not depend on the order the caller read them in."""
    uids = [str(u) for u in (result.get("input") or {}).get("sop_instance_uids") or []]
    rank = {uid: n for n, uid in enumerate(uids)}
    return sorted(
        source, key=lambda ds: (rank.get(str(ds.SOPInstanceUID), len(rank)), ds.SOPInstanceUID)
    )


def _referenced_segment(seg: hd.seg.Segmentation, number: int) -> hd.sr.ReferencedSegment:
    """Segment ``number`` of ``seg`` with the source images of its frames.

    Not ``ReferencedSegment.from_segmentation``: highdicom 0.28.2 looks for the segment
    number in each frame's functional groups only, and a SEG with one segment keeps it in
    the shared functional groups (AttributeError)."""
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    images: dict[str, hd.sr.SourceImageForSegmentation] = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ident = frame.get("SegmentIdentificationSequence") or shared
        if ident is None or int(ident[0].ReferencedSegmentNumber) != number:
            continue
        for derivation in frame.get("DerivationImageSequence") or []:
            for src in derivation.get("SourceImageSequence") or []:
                images.setdefault(
                    str(src.ReferencedSOPInstanceUID),
                    hd.sr.SourceImageForSegmentation(
                        str(src.ReferencedSOPClassUID), str(src.ReferencedSOPInstanceUID)
                    ),
                )
    source_series = None
    if not images:  # no per-frame derivation: the SEG's one source series
        source_series = hd.sr.SourceSeriesForSegmentation(
            str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
        )
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=number,
        source_images=list(images.values()) or None,
        source_series=source_series,
    )


def _evidence(source: Sequence[Dataset], seg: Dataset | None) -> list[Dataset]:
    """The sources (and SEG) as highdicom's evidence, the first with its Type 2 patient
    and study attributes present (see :func:`~gateway.results.codes.with_type2`)."""
    return [with_type2(source[0]), *source[1:], *([seg] if seg is not None else [])]
