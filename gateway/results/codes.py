"""Codes, units and identities shared by the DICOM result builders.

Everything here is a constant or a pure function.  Where the standard offers a choice,
the comment beside the constant says which one was taken and why.  References:
DICOM PS3.16 context groups (CID) as shipped in ``pydicom.sr.codedict``, and UCUM.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from highdicom import ContributingEquipment
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, DT, TM

__all__ = [
    "ABNORMAL_STRUCTURE",
    "ABSENT",
    "ALGORITHM_FAMILY",
    "ANATOMICAL_STRUCTURE",
    "DIAMETER",
    "LANGUAGE",
    "MANUFACTURER",
    "PRESENT",
    "PROBABILITY",
    "PROCESSING_EQUIPMENT",
    "UNDETERMINED",
    "UNIT_MM",
    "UNIT_MM3",
    "UNIT_PROBABILITY",
    "VOLUME",
    "ResultModel",
    "code",
    "finding_site",
    "procedure_fallback",
    "result_time",
    "result_uid",
    "stamp_times",
    "status_value",
    "tracking_uid",
    "with_type2",
]

#: Manufacturer (0008,0070) of everything the gateway makes, and of its device observer.
MANUFACTURER = "dicom-hl7-ai-gateway"

# --- values of qualitative evaluations -------------------------------------------------
# CID 240 "Present-Absent" holds exactly these three, so a reader that knows the value set
# knows all our values.  "Uncertain" maps to its third member, Undetermined (373068000),
# rather than Equivocal (42425007, CID 3120 "Perfusion Finding": a perfusion study's
# borderline result) or SCT 2667000 (not in any DICOM context group; DICOM's "Absent" is
# 272519000).
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
UNDETERMINED = CodedConcept("373068000", "SCT", "Undetermined")

_STATUS = {"present": PRESENT, "absent": ABSENT, "uncertain": UNDETERMINED}

# --- measurements ----------------------------------------------------------------------
DIAMETER = CodedConcept("81827009", "SCT", "Diameter")  # CID 7470 Linear Measurement
VOLUME = CodedConcept("118565006", "SCT", "Volume")  # CID 7473 Volume Measurement
# DCM 122157 "Probability" (PS3.16 Annex D): the model's probability, a number in [0, 1].
# Not DCM 111047 "Probability of cancer": our findings are not all about malignancy.
PROBABILITY = CodedConcept("122157", "DCM", "Probability")

# UCUM units as DICOM spells them (CID 7181).  A probability is dimensionless: UCUM "1"
# ("no units", the unit DICOM lists for unitless quantities); "{probability}" would be
# valid UCUM too but appears in no DICOM context group.
UNIT_MM = CodedConcept("mm", "UCUM", "millimeter")
UNIT_MM3 = CodedConcept("mm3", "UCUM", "cubic millimeter")
UNIT_PROBABILITY = CodedConcept("1", "UCUM", "no units")

# --- segmentation ----------------------------------------------------------------------
# CID 7150 "Segmentation Property Categories".
ABNORMAL_STRUCTURE = CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")
# CID 7162 "Surface Processing Algorithm Family", the value set for the SEG's
# AlgorithmFamilyCodeSequence and TID 4019's algorithm family.
ALGORITHM_FAMILY = CodedConcept("123110", "DCM", "Artificial Intelligence")

# --- document --------------------------------------------------------------------------
# CID 7005 "Contributing Equipment Purpose of Reference": the model processed the images.
PROCESSING_EQUIPMENT = CodedConcept("109102", "DCM", "Processing Equipment")
LANGUAGE = CodedConcept("en-US", "RFC5646", "English (United States)")

# Where a finding is, when the model does not say (finding code -> site).
_FINDING_SITES: dict[tuple[str, str], CodedConcept] = {
    ("SCT", "786838002"): CodedConcept("39607008", "SCT", "Lung"),  # Nodule of lung
}

# Procedure reported when the source carries no procedure code (TID 1500 row 4, CID 100
# "Quantitative Diagnostic Imaging Procedure", extensible).  First (modality, body part)
# with LOINC/RSNA Playbook codes, then the modality alone with CID 100's own "unspecified
# body region" codes, then SCT "Imaging procedure".  Never a made-up "AI analysis".
_PROCEDURES_BY_REGION: dict[tuple[str, str], CodedConcept] = {
    ("CT", "CHEST"): CodedConcept("24627-2", "LN", "CT Chest"),
    ("CT", "HEAD"): CodedConcept("24725-4", "LN", "CT Head"),
    ("MR", "BRAIN"): CodedConcept("24590-2", "LN", "MR Brain"),
    ("MR", "HEAD"): CodedConcept("24590-2", "LN", "MR Brain"),
}
_PROCEDURES_BY_MODALITY: dict[str, CodedConcept] = {
    "CT": CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "PT": CodedConcept("44136-0", "LN", "PET unspecified body region"),
    "NM": CodedConcept("49118-3", "LN", "NM unspecified body region"),
    "CR": CodedConcept("43468-8", "LN", "XR unspecified body region"),
    "DX": CodedConcept("43468-8", "LN", "XR unspecified body region"),
    "US": CodedConcept("16310003", "SCT", "Diagnostic ultrasonography"),
    "MG": CodedConcept("71651007", "SCT", "Mammography"),
}
_IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")

# Namespace of the name-based UUIDs behind result_uid; changing it changes every UID.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:x-dicom-hl7-ai-gateway:results")

# Coding scheme names a model's metadata may use, as DICOM designators.
_SCHEMES = {
    "SNOMED": "SCT",
    "SNOMED CT": "SCT",
    "SNOMEDCT": "SCT",
    "SNM": "SCT",
    "HTTP://SNOMED.INFO/SCT": "SCT",
    "LOINC": "LN",
    "HTTP://LOINC.ORG": "LN",
    "RADLEX": "RADLEX",
    "UCUM": "UCUM",
}


def code(value: Mapping[str, Any] | tuple[str, str, str] | Code) -> CodedConcept:
    """A coded concept from ``{"system", "value", "meaning"}``, a
    ``(system, value, meaning)`` tuple or a pydicom ``Code``.

    The system is a DICOM coding scheme designator (``SCT``, ``LN``, ``DCM``, ...); common
    spellings (``SNOMED``, ``http://loinc.org``) are translated.  Raises ``ValueError``
    naming what is missing.
    """
    if isinstance(value, Code):
        return CodedConcept.from_code(value)
    if isinstance(value, tuple):
        system, val, meaning = value
    else:
        system = value.get("system") or value.get("scheme") or ""
        val, meaning = value.get("value") or "", value.get("meaning") or ""
    system, val, meaning = str(system).strip(), str(val).strip(), str(meaning).strip()
    if not (system and val and meaning):
        raise ValueError(f"a code needs a system, a value and a meaning, got {value!r}")
    return CodedConcept(val, _SCHEMES.get(system.upper(), system), meaning)


def status_value(status: str) -> CodedConcept:
    """The CID 240 value for a text finding's ``status`` (present, absent, uncertain)."""
    try:
        return _STATUS[status.strip().lower()]
    except KeyError:
        raise ValueError(
            f"finding status must be one of {sorted(_STATUS)}, got {status!r}"
        ) from None


def finding_site(finding_code: CodedConcept) -> CodedConcept | None:
    """The anatomic site implied by a finding code, when the table knows it."""
    return _FINDING_SITES.get((finding_code.scheme_designator, finding_code.value))


def procedure_fallback(modality: str, body_part: str = "") -> CodedConcept:
    """Procedure code from Modality and BodyPartExamined, for sources without one."""
    modality, body_part = modality.strip().upper(), body_part.strip().upper()
    return _PROCEDURES_BY_REGION.get(
        (modality, body_part), _PROCEDURES_BY_MODALITY.get(modality, _IMAGING_PROCEDURE)
    )


def result_uid(kind: str, study_uid: str, model_name: str, model_version: str) -> str:
    """A UID derived from what the result is about, not from chance.

    ``kind`` names the object (``sr-series``, ``sr-instance``, ``seg-series``,
    ``seg-instance``, ``device``, ``finding-1``, ...).  The same study, model and version
    always give the same UID, so a re-run replaces its earlier result at the receiver
    instead of adding a second copy; another version of the model gives other UIDs.

    The form is PS3.5 B.2's ``2.25.<UUID as a decimal integer>`` with a name-based
    (version 5) UUID of the four values.  Not ``pydicom.uid.generate_uid(prefix=None,
    entropy_srcs=...)``: with ``prefix=None`` pydicom ignores ``entropy_srcs`` and returns
    a random UUID4 (and it joins the sources without a separator).
    """
    parts = [kind, study_uid, model_name, model_version]
    if not all(parts):
        raise ValueError(f"result_uid needs kind, study, model name and version, got {parts}")
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, json.dumps(parts)).int}"


@dataclass(frozen=True)
class ResultModel:
    """The model behind a result, as the DICOM objects name it."""

    name: str
    bundle: str
    version: str
    weights_sha256: str

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> ResultModel:
        model = result.get("model") or {}
        fields = {k: str(model.get(k) or "") for k in ("name", "bundle", "version")}
        fields["weights_sha256"] = str(model.get("weights_sha256") or "")
        missing = [k for k, v in fields.items() if not v]
        if missing:
            raise ValueError(f"result's model lacks {', '.join(missing)}")
        return cls(**fields)

    @property
    def serial_number(self) -> str:
        """DeviceSerialNumber: the first 16 hex digits of the weights' SHA-256."""
        return self.weights_sha256[:16]

    def description(self, what: str = "") -> str:
        """SeriesDescription, e.g. ``AI lung-nodules 0.1.0 segmentation``."""
        return " ".join(p for p in ("AI", self.name, self.version, what) if p)[:64]

    def contributing_equipment(self, when: dt.datetime) -> list[ContributingEquipment]:
        """The algorithm as Contributing Equipment (purpose: processing equipment)."""
        return [
            ContributingEquipment(
                manufacturer=MANUFACTURER,
                purpose_of_reference=PROCESSING_EQUIPMENT,
                manufacturer_model_name=self.bundle,
                software_versions=self.version,
                device_serial_number=self.serial_number,
                contribution_datetime=when,
                contribution_description=f"AI model {self.name}"[:64],
            )
        ]

    def uid(self, kind: str, study_uid: str) -> str:
        return result_uid(kind, study_uid, self.name, self.version)


def tracking_uid(model: ResultModel, study_uid: str, finding_index: int) -> str:
    """Tracking UID of finding ``finding_index`` (1-based) of a result: the SR's
    measurement group and the SEG's segment for that finding share it."""
    return model.uid(f"finding-{finding_index}", study_uid)


def result_time(result: Mapping[str, Any], source: Dataset) -> dt.datetime:
    """When the result was made, for builders not given ``now``: the result's
    ``made_at`` (epoch seconds, UTC), else the source series' (or study's) date and time,
    so the output depends only on the input and never on a clock."""
    made_at = result.get("made_at")
    if made_at is not None:
        return dt.datetime.fromtimestamp(float(made_at), dt.UTC)
    date = str(source.get("SeriesDate") or source.get("StudyDate") or "19700101")
    time = str(source.get("SeriesTime") or source.get("StudyTime") or "000000").split(".")[0]
    return dt.datetime.strptime(date + time.ljust(6, "0")[:6], "%Y%m%d%H%M%S")


def stamp_times(ds: Dataset, when: dt.datetime) -> None:
    """Replace the clock readings highdicom takes while building (InstanceCreationDate/Time,
    its own Contributing Equipment item's ContributionDateTime) with ``when``, and record
    ``when``'s UTC offset.  highdicom has no parameter for these."""
    ds.InstanceCreationDate = DA(when.date())
    ds.InstanceCreationTime = TM(when.time().replace(microsecond=0))
    offset = when.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds()) // 60
        sign = "-" if minutes < 0 else "+"
        ds.TimezoneOffsetFromUTC = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    for item in ds.get("ContributingEquipmentSequence") or []:
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(when.replace(microsecond=0))


# Patient and study attributes highdicom's SR and SEG constructors read from the first
# source with plain attribute access, although all are Type 2 (may be absent) there.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def with_type2(ds: Dataset) -> Dataset:
    """``ds``, or a copy of it with the patient/study attributes it lacks set empty, so
    highdicom copies an empty value instead of raising AttributeError.  The caller's
    dataset is never changed."""
    missing = [k for k in _TYPE2_COPIED if k not in ds]
    if not missing:
        return ds
    filled = copy.deepcopy(ds)
    for keyword in missing:
        setattr(filled, keyword, "")
    return filled
