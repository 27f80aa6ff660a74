"""HL7 v2.5 ORU^R01 from a model result: a pure builder, validated with hl7apy.

:func:`build_oru` takes a result of :mod:`gateway.infer.runtime` and the source it was
made from (the HL7 message, or a DICOM header of the study) and returns one ER7 message:
segments ended by ``\\r``, no MLLP framing, UTF-8 bytes (MSH-18 ``UNICODE UTF-8``, so
names copied from a Latin-1 or ``\\Xhh\\``-escaped source arrive as the same text).

Message::

    MSH  ORU^R01^ORU_R01, version 2.5, processing id P, MSH-10 = control_id(...)
    PID  copied from the source message (set id 1, fields as v2.5 defines them), or built
         from the DICOM patient module
    PV1  copied from the source message when it has one (PV1-2 U when empty); else left
         out: the visit group is optional in v2.5 ORU_R01, and DICOM has no visit to give
    ORC  RE, placer / filler order numbers
    OBR  OBR-2 placer, OBR-3 filler (= accession for DICOM sources), OBR-4 procedure
         (source OBR-4; ProcedureCodeSequence, StudyDescription, or the SR's procedure
         code for the modality), OBR-7 observation time (source OBR-7; StudyDate+Time),
         OBR-22 = now, OBR-24 section (source OBR-24, or from the modality: CT, NMR,
         NMS, RUS, RX, else RAD), OBR-25 = P (preliminary)
    OBX  1: TX summary, one line (OBX-5 repetition) per finding, then per finding n
         (OBX-4 = n): CE finding code = Present / Absent / Undetermined, then its NM
         measurements; then the study classification (OBX-4 = findings + 1): CE + NM

Every OBX has OBX-11 = P (machine-made, not reviewed), OBX-14 = now and OBX-18 = model
name^version (EI: entity id = name, namespace = version).

Codes (HL7 table 0396 names): qualitative values are SNOMED CT, the same as the DICOM SR
(DICOM CID 240 "Present-Absent"): Present 52101004, Absent 272519000, and for
"uncertain" Undetermined 373068000 (CID 240's third member, rather than
Equivocal 42425007, a perfusion-study value).  Measurements are numbers (NM) with UCUM
units, concepts and units as in the SR (:mod:`gateway.results.codes`): diameter
81827009^Diameter^SCT in ``mm`` (1 decimal), volume 118565006^Volume^SCT in ``mm3``
(0 decimals), probability 122157^Probability^DCM in ``1`` ("no units", 2 decimals, 0..1);
rounded half up.
The summary is a local code, ``AISUMMARY^AI findings summary^99AIGW``.

MSH-10 is ``AI`` + 18 hex digits of a SHA-256 over (subject key, model name, model
version), 20 characters (the v2.5 length of MSH-10): a retry or a re-run of the same
model version on the same subject sends the same id, so the receiver can recognise the
duplicate; another subject, model or version gets another id.

Escaping: every value goes through :func:`gateway.hl7.ack.escape` (``\\F\\ \\S\\ \\R\\
\\E\\ \\T\\``).  Copied fields are split on the source's separators, each leaf is decoded
(:func:`gateway.hl7.message.unescape`, in the source's MSH-18 character set) and
escaped again for ours, so ``O\\T\\BRIEN`` stays ``O\\T\\BRIEN`` and a source with other
separators or ``\\Xhh\\`` escapes still gives the same text.

Validation before returning: hl7apy ``parse_message(..., STRICT, find_groups=True)`` and
``Validator.validate`` (structure, cardinality, data types, ST/NM/DTM formats and
lengths), plus the checks hl7apy leaves out: segment order, OBX-5 against OBX-2 (hl7apy
types OBX-5 as "varies" and checks nothing), NM syntax (hl7apy accepts ``nan``, ``1e5``),
and the HL7 table values of the coded fields we set (hl7apy only warns, into a file).
A failure raises :class:`ResultInvalid`; nothing broken is returned.

The ER7 text is composed here and hl7apy only parses it back, because hl7apy 1.3.5 cannot
be trusted to write it: its parser keeps values escaped, and its ``to_er7`` escapes the
escape character of any sequence but ``\\H\\ \\N\\ \\F\\ \\S\\ \\T\\ \\R\\ \\E\\``, so a copied
``\\X0D\\`` or ``\\.br\\`` would go out as ``\\E\\X0D\\E\\``.  Copied fields therefore hold
text, not formatting: ``\\.br\\`` becomes a space, ``\\H\\``/``\\N\\`` are dropped.
"""

from __future__ import annotations

import hashlib
import math
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pydicom
from hl7apy import load_reference
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from hl7apy.validation import Validator

from gateway.errors import MalformedInput, ResultInvalid
from gateway.hl7.ack import MAX_CONTROL_ID, escape
from gateway.hl7.message import Message, Separators, segment_fields, unescape
from gateway.results import codes

__all__ = ["VERSION", "Coded", "ResultInvalid", "build_oru", "control_id"]

VERSION = "2.5"
CHARSET = "UNICODE UTF-8"
FIELD_SEP = "|"
ENCODING_CHARS = "^~\\&"
MAX_TEXT_LINE = 199  # hl7apy checks OBX-5 (typed "varies") as ST: 199 characters, escaped
NOTE = "AI, preliminary, not reviewed"


@dataclass(frozen=True)
class Coded:
    """A CE value: code, text, coding system (HL7 table 0396)."""

    code: str
    meaning: str
    system: str

    def er7(self) -> str:
        return _components(self.code, self.meaning, self.system)

    @classmethod
    def of(cls, concept: Any) -> Coded:
        """From a highdicom/pydicom coded concept (value, meaning, scheme designator)."""
        return cls(str(concept.value), str(concept.meaning), str(concept.scheme_designator))


PRESENT = Coded.of(codes.PRESENT)
ABSENT = Coded.of(codes.ABSENT)
UNDETERMINED = Coded.of(codes.UNDETERMINED)
STATUS_VALUES = {"present": PRESENT, "absent": ABSENT, "uncertain": UNDETERMINED}

SUMMARY = Coded("AISUMMARY", "AI findings summary", "99AIGW")


@dataclass(frozen=True)
class Measurement:
    """A number a finding may carry: its key in the result, concept, unit, decimals."""

    key: str
    concept: Coded
    unit: Coded
    decimals: int
    shown: str  # how the summary line writes it

    def text(self, value: Any, what: str) -> str:
        return _number(value, self.decimals, f"{what} {self.key}")


MEASUREMENTS = (
    Measurement("diameter_mm", Coded.of(codes.DIAMETER), Coded.of(codes.UNIT_MM), 1, "{} mm"),
    Measurement("volume_mm3", Coded.of(codes.VOLUME), Coded.of(codes.UNIT_MM3), 0, "{} mm3"),
    Measurement(
        "probability", Coded.of(codes.PROBABILITY), Coded.of(codes.UNIT_PROBABILITY), 2, "p={}"
    ),
)
PROBABILITY = MEASUREMENTS[-1]

# OBR-24 (HL7 table 0074, diagnostic service section) by DICOM modality; others: RAD.
SECTIONS = {
    "CT": "CT", "MR": "NMR", "NM": "NMS", "PT": "NMS", "US": "RUS",
    "CR": "RX", "DX": "RX", "RG": "RX",
}  # fmt: skip

# Segments copied whole from a source message: set id renumbered, fields cut to what v2.5
# defines for the segment (from hl7apy's v2.5 tables, not a hand-kept list).
COPIED_SEGMENTS = ("PID", "PV1")

# Coded fields this builder sets, and the HL7 table their value must come from.
TABLE_CHECKS = (
    ("ORC", 1, "HL70119"),
    ("OBR", 24, "HL70074"),
    ("OBR", 25, "HL70123"),
    ("OBX", 2, "HL70125"),
    ("OBX", 11, "HL70085"),
)
SEGMENT_ORDER = re.compile(r"MSH (PID (PV1 )?)?ORC OBR (OBX )+")
NM_SYNTAX = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def control_id(subject_key: str, model_name: str, model_version: str) -> str:
    """MSH-10 of the result of *model_name* *model_version* on *subject_key*: stable
    across retries and re-runs, different per subject, model and version."""
    digest = hashlib.sha256(
        "\x1f".join(("oru", subject_key, model_name, model_version)).encode()
    ).hexdigest()
    return ("AI" + digest[: MAX_CONTROL_ID - 2]).upper()


def build_oru(
    result: Mapping[str, Any],
    *,
    source_message: bytes | None = None,
    source_dicom: pydicom.Dataset | None = None,
    subject_key: str,
    sending: tuple[str, str] = ("AI_GATEWAY", "AI"),
    receiving: tuple[str, str] = ("EHR", "HOSP"),
    now: datetime,
) -> bytes:
    """One ORU^R01 (HL7 v2.5, UTF-8, ``\\r``-separated, unframed) for *result*.

    Patient, visit and order come from *source_message* when given, else (and for what
    the message lacks) from *source_dicom*.  *subject_key* identifies what the model ran
    on (the source envelope, the study) and with the model's name and version makes
    MSH-10.  *now* is MSH-7, OBR-22 and OBX-14.

    Raises :class:`ResultInvalid` when the result or the sources cannot make a valid
    message (no patient, a malformed finding, hl7apy STRICT validation failing).
    """
    model = _model(result)
    source = _SourceMessage.parse(source_message) if source_message is not None else None
    stamp = _timestamp(now)
    segments: list[str] = [
        _msh(sending, receiving, stamp, control_id(subject_key, *model)),
        *_patient(source, source_dicom),
    ]
    segments += _order(result, source, source_dicom, stamp)
    segments += _observations(result, model, stamp)
    text = "\r".join(segments) + "\r"
    validate(text)
    return text.encode("utf-8")


def validate(message: str) -> None:
    """Check one ER7 ORU^R01 v2.5 as strictly as hl7apy can, and then some.

    Raises :class:`ResultInvalid` with the first problem found.
    """
    lines = [s for s in message.split("\r") if s]
    ids = " ".join(s[:3] for s in lines) + " "
    if not SEGMENT_ORDER.fullmatch(ids):
        raise ResultInvalid(f"ORU^R01 segments out of order: {ids.strip()}")
    try:
        parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        Validator.validate(parsed)
    except (HL7apyException, ValueError) as exc:
        raise ResultInvalid(
            f"the ORU^R01 built does not validate as HL7 v2.5: {type(exc).__name__}: {exc}"
        ) from None
    for line in lines:
        fields = line.split(FIELD_SEP)
        seg = fields[0]
        for seg_id, number, table in TABLE_CHECKS:
            value = _nth(fields, number).split("^")[0]
            if seg == seg_id and value and value not in _table(table):
                raise ResultInvalid(f"{seg}-{number} {value!r} is not in HL7 table {table}")
        if seg == "OBX":
            _check_obx_value(fields)


# --- MSH -------------------------------------------------------------------------------


def _msh(sending: tuple[str, str], receiving: tuple[str, str], stamp: str, msh10: str) -> str:
    fields = [
        "MSH", ENCODING_CHARS, _e(sending[0] or ""), _e(sending[1] or ""),
        _e(receiving[0] or ""), _e(receiving[1] or ""), stamp, "", "ORU^R01^ORU_R01",
        _e(msh10), "P", VERSION, "", "", "", "", "", CHARSET,
    ]  # fmt: skip
    return FIELD_SEP.join(fields)


# --- PID / PV1 -------------------------------------------------------------------------


def _patient(source: _SourceMessage | None, dicom: pydicom.Dataset | None) -> list[str]:
    pid = source.copy("PID") if source is not None else None
    if pid is not None and (not _nth(pid, 3) or not _nth(pid, 5)):
        pid = None  # PID-3 and PID-5 are required; take the DICOM header's if there is one
    if pid is None:
        if dicom is None:
            raise ResultInvalid(
                "no patient for the ORU: the source message has no usable PID segment "
                "(PID-3 and PID-5) and there is no DICOM source"
            )
        pid = _pid_from_dicom(dicom)
    segments = [FIELD_SEP.join(pid)]
    pv1 = source.copy("PV1") if source is not None else None
    if pv1 is not None:
        if not _nth(pv1, 2):
            pv1 = _put(pv1, 2, "U")  # PV1-2 patient class is required: U = unknown
        segments.append(FIELD_SEP.join(pv1))
    return segments


def _pid_from_dicom(ds: pydicom.Dataset) -> list[str]:
    patient_id = str(ds.get("PatientID") or "").strip()
    if not patient_id:
        raise ResultInvalid("the source DICOM has no PatientID for PID-3")
    qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence") or [pydicom.Dataset()]
    q = qualifiers[0]
    authority = _subcomponents(
        str(ds.get("IssuerOfPatientID") or ""),
        str(q.get("UniversalEntityID") or ""),
        str(q.get("UniversalEntityIDType") or ""),
    )
    id_type = _e(str(q.get("IdentifierTypeCode") or ""))
    cx = _join([_e(patient_id), "", "", authority, id_type], "^")
    name = ds.get("PatientName")
    if name is None or not str(name).strip("^= "):
        raise ResultInvalid("the source DICOM has no PatientName for PID-5")
    # DICOM PN family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix
    xpn = _components(
        name.family_name, name.given_name, name.middle_name, name.name_suffix, name.name_prefix
    )
    birth = str(ds.get("PatientBirthDate") or "")
    sex = str(ds.get("PatientSex") or "").strip().upper()
    fields = {1: "1", 3: cx, 5: xpn}
    if re.fullmatch(r"\d{8}", birth):
        fields[7] = birth
    if sex:
        fields[8] = sex if sex in ("M", "F", "O") else "U"
    return _fields("PID", fields)


# --- ORC / OBR -------------------------------------------------------------------------


def _order(
    result: Mapping[str, Any],
    source: _SourceMessage | None,
    dicom: pydicom.Dataset | None,
    stamp: str,
) -> list[str]:
    obr_src = (source.copy("OBR") if source is not None else None) or []
    orc_src = (source.copy("ORC") if source is not None else None) or []
    placer = _nth(obr_src, 2) or _nth(orc_src, 2)
    filler = _nth(obr_src, 3) or _nth(orc_src, 3)
    service = _nth(obr_src, 4)
    observed = _nth(obr_src, 7)
    section = _nth(obr_src, 24).split("^")[0]
    if dicom is not None:
        placer = placer or _e(str(dicom.get("PlacerOrderNumberImagingServiceRequest") or ""))
        filler = filler or _accession(dicom)
        service = service or _procedure(dicom)
        observed = observed or _study_time(dicom)
    if not service:
        service = Coded.of(codes.procedure_fallback("")).er7()
    if not section:
        section = _section(result, dicom)
    orc = _fields("ORC", {1: "RE", 2: placer, 3: filler})
    obr = _fields(
        "OBR",
        {1: "1", 2: placer, 3: filler, 4: service, 7: observed, 22: stamp, 24: section, 25: "P"},
    )
    return [FIELD_SEP.join(orc), FIELD_SEP.join(obr)]


def _accession(ds: pydicom.Dataset) -> str:
    accession = str(ds.get("AccessionNumber") or "").strip()
    if not accession:
        return ""
    issuer = ds.get("IssuerOfAccessionNumberSequence") or [pydicom.Dataset()]
    i = issuer[0]
    return _join(
        [
            _e(accession),
            _e(str(i.get("LocalNamespaceEntityID") or "")),
            _e(str(i.get("UniversalEntityID") or "")),
            _e(str(i.get("UniversalEntityIDType") or "")),
        ],
        "^",
    )


def _procedure(ds: pydicom.Dataset) -> str:
    """OBR-4 from ProcedureCodeSequence, else StudyDescription as text, else the
    modality's procedure code (the one the SR uses)."""
    for item in ds.get("ProcedureCodeSequence") or []:
        value = str(item.get("CodeValue") or item.get("LongCodeValue") or "")
        if value:
            return _components(
                value, str(item.get("CodeMeaning") or ""),
                str(item.get("CodingSchemeDesignator") or ""),
            )  # fmt: skip
    description = str(ds.get("StudyDescription") or "").strip()
    if description:
        return _components("", description)
    concept = codes.procedure_fallback(
        str(ds.get("Modality") or ""), str(ds.get("BodyPartExamined") or "")
    )
    return Coded.of(concept).er7()


def _study_time(ds: pydicom.Dataset) -> str:
    date = str(ds.get("StudyDate") or "")
    if not re.fullmatch(r"\d{8}", date):
        return ""
    time = re.match(r"\d{0,6}", str(ds.get("StudyTime") or ""))
    digits = time.group(0) if time else ""
    digits = digits[: len(digits) - len(digits) % 2]
    offset = str(ds.get("TimezoneOffsetFromUTC") or "")
    return date + digits + (offset if re.fullmatch(r"[+-]\d{4}", offset) else "")


def _section(result: Mapping[str, Any], dicom: pydicom.Dataset | None) -> str:
    source = result.get("input")
    modality = source.get("modality") if isinstance(source, Mapping) else None
    if not modality and dicom is not None:
        modality = dicom.get("Modality")
    if not modality:
        return ""
    return SECTIONS.get(str(modality).upper(), "RAD")


# --- OBX -------------------------------------------------------------------------------


def _observations(result: Mapping[str, Any], model: tuple[str, str], stamp: str) -> list[str]:
    findings = result.get("findings") or []
    if not isinstance(findings, Sequence) or isinstance(findings, str):
        raise ResultInvalid("the result's findings are not a list")
    equipment = _components(*model)
    rows: list[tuple[str, Coded, str, str, Coded | None]] = []  # type, OBX-3, sub, 5, 6
    lines: list[str] = []
    for number, finding in enumerate(findings, 1):
        if not isinstance(finding, Mapping):
            raise ResultInvalid(f"finding {number} is not a mapping")
        concept = _finding_code(finding, number)
        status = _status(finding, number)
        rows.append(("CE", concept, str(number), STATUS_VALUES[status].er7(), None))
        shown = [] if status == "present" and _has_measurements(finding) else [status]
        for m in MEASUREMENTS:
            value = finding.get(m.key)
            if value is not None:
                text = m.text(value, f"finding {number}")
                rows.append(("NM", m.concept, str(number), text, m.unit))
                shown.append(m.shown.format(text))
        lines.append(f"{_label(finding, concept)}: {', '.join(shown)} ({NOTE})")
    if not findings:
        lines.append(f"No findings were detected by {model[0]} {model[1]} ({NOTE}).")
    classification = result.get("classification")
    if classification:
        rows += _classification(classification, str(len(findings) + 1), lines)
    obx = [
        _obx(1, "TX", SUMMARY, "", "~".join(_e(x) for x in _wrap(lines)), None, stamp, equipment)
    ]
    for value_type, concept, sub_id, value, unit in rows:
        obx.append(_obx(len(obx) + 1, value_type, concept, sub_id, value, unit, stamp, equipment))
    return obx


def _classification(
    classification: Any, sub_id: str, lines: list[str]
) -> list[tuple[str, Coded, str, str, Coded | None]]:
    if not isinstance(classification, Mapping):
        raise ResultInvalid("the result's classification is not a mapping")
    concept = _coded(classification.get("code"), "classification")
    present = classification.get("present")
    if not isinstance(present, bool):
        flags = [v for k, v in classification.items() if k.endswith("_present")]
        present = flags[0] if flags and isinstance(flags[0], bool) else None
    if present is None:
        raise ResultInvalid("the classification says neither present nor absent")
    rows: list[tuple[str, Coded, str, str, Coded | None]] = [
        ("CE", concept, sub_id, (PRESENT if present else ABSENT).er7(), None)
    ]
    name = str(classification.get("finding") or concept.meaning)
    what = "yes" if present else "no"
    probability = classification.get("probability")
    if probability is not None:
        text = PROBABILITY.text(probability, "classification")
        rows.append(("NM", PROBABILITY.concept, sub_id, text, PROBABILITY.unit))
        what += ", " + PROBABILITY.shown.format(text)
    lines.append(f"{name}: {what} ({NOTE})")
    return rows


def _obx(
    set_id: int, value_type: str, concept: Coded, sub_id: str, value: str,
    unit: Coded | None, stamp: str, equipment: str,
) -> str:  # fmt: skip
    fields = {
        1: str(set_id), 2: value_type, 3: concept.er7(), 4: _e(sub_id), 5: value,
        6: unit.er7() if unit else "", 11: "P", 14: stamp, 18: equipment,
    }  # fmt: skip
    return FIELD_SEP.join(_fields("OBX", fields))


def _finding_code(finding: Mapping[str, Any], number: int) -> Coded:
    raw = finding.get("code")
    if isinstance(raw, str):  # text findings: a bare SNOMED CT code and its meaning
        raw = {"system": "SCT", "value": raw, "meaning": finding.get("meaning")}
    return _coded(raw, f"finding {number}")


def _coded(raw: Any, what: str) -> Coded:
    if not isinstance(raw, Mapping):
        raise ResultInvalid(f"{what} has no code")
    try:
        scheme = codes.code(raw).scheme_designator  # checks it, spells the scheme as DICOM
    except ValueError as exc:
        raise ResultInvalid(f"{what}: {exc}") from None
    # code and meaning as given: a DICOM concept would split a meaning at a backslash
    value, meaning = (str(raw.get(k) or "").strip() for k in ("value", "meaning"))
    return Coded(value, meaning, str(scheme))


def _status(finding: Mapping[str, Any], number: int) -> str:
    status = str(finding.get("status") or "present").strip().lower()  # detections: present
    if status not in STATUS_VALUES:
        raise ResultInvalid(
            f"finding {number} status must be one of {sorted(STATUS_VALUES)}, got {status!r}"
        )
    return status


def _has_measurements(finding: Mapping[str, Any]) -> bool:
    return any(finding.get(m.key) is not None for m in MEASUREMENTS)


def _label(finding: Mapping[str, Any], concept: Coded) -> str:
    return str(finding.get("finding") or concept.meaning).replace("_", " ")


def _number(value: Any, decimals: int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ResultInvalid(f"{what} is not a number: {value!r}")
    if not math.isfinite(value):
        raise ResultInvalid(f"{what} is not finite: {value!r}")
    # half up on the shortest decimal form (2.675 -> 2.68, 98.5 -> 99), as a person would
    step = Decimal(1).scaleb(-decimals)
    text = format(Decimal(repr(float(value))).quantize(step, ROUND_HALF_UP), "f")
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def _wrap(lines: Iterable[str]) -> list[str]:
    """Summary lines, long ones wrapped so that each stays within hl7apy's limit once
    escaped (an escape takes 3 characters for 1)."""
    out: list[str] = []
    for line in lines:
        if len(_e(line)) <= MAX_TEXT_LINE:
            out.append(line)
        else:
            out += textwrap.wrap(line, MAX_TEXT_LINE // 3) or [""]
    return out


# --- the source message ----------------------------------------------------------------


@dataclass(frozen=True)
class _SourceMessage:
    """The first PID / PV1 / ORC / OBR of a message, as raw fields, with its separators."""

    seps: Separators
    charset: str
    segments: Mapping[str, Sequence[str]]

    @classmethod
    def parse(cls, data: bytes) -> _SourceMessage:
        """Read with the one HL7 reader (:class:`gateway.hl7.message.Message`)."""
        try:
            message = Message.parse(data)
        except MalformedInput as exc:
            raise ResultInvalid(f"the source message: {exc.message}") from None
        seps = message.separators
        found: dict[str, Sequence[str]] = {}
        for segment in message.segments[1:]:
            fields = segment_fields(segment, seps)
            if fields[0] in ("PID", "PV1", "ORC", "OBR") and fields[0] not in found:
                found[fields[0]] = fields
        return cls(seps, message.charset, found)

    def copy(self, segment_id: str) -> list[str] | None:
        """The segment's fields re-encoded for our separators, cut to the fields v2.5
        defines; the set id is 1 in segments copied whole.  ``None`` when absent."""
        fields = self.segments.get(segment_id)
        if fields is None:
            return None
        limit = _field_count(segment_id) + 1
        out = [segment_id, *(self._transcode(f) for f in fields[1:limit])]
        if segment_id in COPIED_SEGMENTS:
            out = _put(out, 1, "1")
        return _trim(out)

    def _transcode(self, raw: str) -> str:
        """One field: split on the source's separators, each leaf decoded and escaped
        again for ours."""
        s = self.seps

        def leaf(text: str) -> str:
            return _e(unescape(text, s, self.charset))

        return "~".join(
            "^".join(
                "&".join(map(leaf, comp.split(s.subcomponent))) for comp in rep.split(s.component)
            )
            for rep in raw.split(s.repetition)
        )


# --- small helpers ---------------------------------------------------------------------


def _model(result: Mapping[str, Any]) -> tuple[str, str]:
    model = result.get("model")
    if not isinstance(model, Mapping):
        raise ResultInvalid("the result names no model")
    name, version = str(model.get("name") or ""), str(model.get("version") or "")
    if not name or not version:
        raise ResultInvalid("the result's model needs a name and a version")
    return name, version


def _timestamp(now: datetime) -> str:
    stamp = now.strftime("%Y%m%d%H%M%S")
    return stamp + now.strftime("%z") if now.tzinfo is not None else stamp


def _e(value: str) -> str:
    return escape(value, FIELD_SEP, ENCODING_CHARS)


def _join(parts: Sequence[str], sep: str) -> str:
    return sep.join(parts).rstrip(sep)


def _components(*values: str) -> str:
    return _join([_e(str(v or "")) for v in values], "^")


def _subcomponents(*values: str) -> str:
    return _join([_e(v) for v in values], "&")


def _fields(segment_id: str, values: Mapping[int, str]) -> list[str]:
    out = [segment_id] + [""] * max(values)
    for number, value in values.items():
        out[number] = value
    return _trim(out)


def _put(fields: list[str], number: int, value: str) -> list[str]:
    out = fields + [""] * (number + 1 - len(fields))
    out[number] = value
    return out


def _trim(fields: list[str]) -> list[str]:
    while len(fields) > 1 and not fields[-1]:
        fields = fields[:-1]
    return fields


def _nth(fields: Sequence[str], number: int) -> str:
    return fields[number] if number < len(fields) else ""


def _field_count(segment_id: str) -> int:
    return len(load_reference(segment_id, "Segment", VERSION)[1])


def _table(name: str) -> tuple[str, ...]:
    values: tuple[str, ...] = load_reference(name, "Table", VERSION)[1]
    return values


def _check_obx_value(fields: Sequence[str]) -> None:
    """OBX-5 against OBX-2, which hl7apy does not check ("varies")."""
    value_type, value = _nth(fields, 2), _nth(fields, 5)
    where = f"OBX {_nth(fields, 1)}"
    if not value:
        raise ResultInvalid(f"{where}: OBX-5 is empty")
    if value_type == "NM" and not NM_SYNTAX.fullmatch(value):
        raise ResultInvalid(f"{where}: OBX-5 {value!r} is not an HL7 NM number")
    if value_type == "CE":
        parts = value.split("^")
        if "~" in value or len(parts) > 6 or not parts[0] or not _nth(parts, 2):
            raise ResultInvalid(f"{where}: OBX-5 {value!r} is not a coded CE value")
