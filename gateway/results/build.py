"""From a stored model result to the bytes each destination takes.

The glue between the store and the pure builders (:mod:`gateway.results.sr`,
:mod:`~gateway.results.seg`, :mod:`~gateway.results.oru`): it reads the source headers
or the source message, calls the builders, checks what they built against the result,
and encodes it.  Anything that fails here is :class:`ResultInvalid` (permanent): the job
becomes a dead letter with the reason and nothing broken is sent.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.filewriter import dcmwrite

from gateway.config import Destination
from gateway.dicom.header import read_dataset
from gateway.envelope import Kind
from gateway.errors import MalformedInput, Permanent, ResultInvalid
from gateway.hl7.message import Message, field_at, segment_fields, unescape
from gateway.results.codes import result_uid
from gateway.results.oru import build_oru
from gateway.results.seg import build_seg
from gateway.results.sr import build_sr
from gateway.store.store import Store


class ResultBuilder:
    """Builds each kind of object once, however many destinations take it."""

    def __init__(
        self,
        store: Store,
        result: dict[str, Any],
        mask: np.ndarray | None,
        *,
        kind: Kind,
        target: str,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.result = result
        self.mask = mask
        self.kind = kind
        self.target = target
        self.beat = beat
        self.now = dt.datetime.fromtimestamp(float(result.get("made_at", 0.0)), dt.UTC)
        self.skipped: dict[str, str] = {}
        self._dicom: list[bytes] | None = None
        self._headers: list[Dataset] | None = None

    def for_destination(self, name: str, dest: Destination) -> list[bytes]:
        if dest.dicom is not None:
            return self.dicom_objects(name)
        assert dest.hl7 is not None
        return [self.oru((dest.hl7.application, dest.hl7.facility))]

    def study_uid(self) -> str:
        """The Study Instance UID the results belong to ("" when there is none)."""
        try:
            return result_study_uid(self.result, self._headers or [])
        except Exception:
            return ""

    # --- sources ----------------------------------------------------------------------

    def source_headers(self) -> list[Dataset]:
        """Headers of the instances the model ran on, read back from the store; for a
        report, one instance per series of the study the report names."""
        if self._headers is None and self.kind is Kind.HL7:
            self._headers = self._report_study_headers()
        if self._headers is None:
            headers = []
            for uid in self.result.get("input", {}).get("sop_instance_uids", []):
                envelope_id = self.store.find_instance(str(uid))
                if envelope_id is None:
                    raise ResultInvalid(f"source instance {uid[:24]}... is no longer stored")
                self.beat()
                headers.append(_stored_header(self.store.read(envelope_id)[1]))
            self._headers = headers
        return self._headers

    def _report_study_headers(self) -> list[Dataset]:
        accession, study_uid = report_study_ids(self.store.read(self.target)[1])
        study_key = self.store.find_study(accession=accession, study_uid=study_uid)
        if study_key is None:
            return []
        headers: list[Dataset] = []
        seen: set[str] = set()
        for env in self.store.queue.study_envelopes(study_key):
            series = str(self.store.attrs(env.id).get("SeriesInstanceUID", ""))
            if series in seen:
                continue
            seen.add(series)
            self.beat()
            headers.append(_stored_header(self.store.read(env.id)[1]))
        return headers

    # --- DICOM ------------------------------------------------------------------------

    def dicom_objects(self, name: str) -> list[bytes]:
        """SEG (when the mask has anything) then SR, as Part-10 bytes; SEG first because
        the SR refers to it."""
        if self.kind is Kind.HL7 and not self.source_headers():
            self.skipped[name] = (
                "the report names no stored study (by accession number in OBR-3/OBR-2/"
                "ORC-3, or Study Instance UID in ZDS-1): there is nothing to file an SR under"
            )
            return []
        if not self.result.get("findings") and not self.result.get("classification"):
            self.skipped[name] = "the model found nothing to report: no SR (the ORU says so)"
            return []
        if self._dicom is None:
            headers = self.source_headers()
            try:
                seg = build_seg(self.result, self.mask, headers) if self.mask is not None else None
                sr = build_sr(self.result, headers, seg=seg, now=self.now)
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                raise ResultInvalid(f"cannot build a valid SR/SEG: {exc}") from None
            check_dicom(sr, self.result, headers)
            if seg is not None:
                check_dicom(seg, self.result, headers)
            self._dicom = [encode(seg)] if seg is not None else []
            self._dicom.append(encode(sr))
        return self._dicom

    # --- HL7 --------------------------------------------------------------------------

    def oru(self, receiving: tuple[str, str]) -> bytes:
        source_message = self.store.read(self.target)[1] if self.kind is Kind.HL7 else None
        source_dicom = self.source_headers()[0] if self.kind is Kind.DICOM else None
        try:
            return build_oru(
                self.result,
                source_message=source_message,
                source_dicom=source_dicom,
                subject_key=self.target,
                receiving=receiving,
                now=self.now,
            )
        except Permanent:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise ResultInvalid(f"cannot build a valid ORU^R01: {exc}") from None


def report_status(message: bytes) -> str:
    """The result status of a report: OBR-25 of the first OBR that has one (F final, C
    corrected, P preliminary...), else OBX-11 of the first OBX; "" when neither is given."""
    try:
        msg = Message.parse(message)
    except MalformedInput:
        return ""
    seps = msg.separators
    for segment_id, number in (("OBR", 25), ("OBX", 11)):
        for segment in msg.segments:
            if segment.startswith(segment_id + seps.field):
                value = field_at(segment_fields(segment, seps), number).strip()
                if value:
                    return value.split(seps.component, 1)[0][:2].upper()
    return ""


def report_study_ids(message: bytes) -> tuple[str, str]:
    """(accession number, Study Instance UID) a report names: the accession from OBR-3
    (filler order number), else OBR-2 or ORC-3; the study UID from ZDS-1 (IHE).  The first
    component of the first repetition, from the first segment that has one, separator
    escapes decoded (as routing reads them)."""
    try:
        msg = Message.parse(message)
    except MalformedInput:
        return "", ""
    seps = msg.separators

    def first(segment_id: str, number: int) -> str:
        for segment in msg.segments:
            if segment.startswith(segment_id + seps.field):
                raw = field_at(segment_fields(segment, seps), number)
                value = raw.split(seps.repetition, 1)[0].split(seps.component, 1)[0]
                value = unescape(value, seps, formatting=False).strip()
                if value:
                    return value
        return ""

    accession = first("OBR", 3) or first("OBR", 2) or first("ORC", 3)
    return accession, first("ZDS", 1)


def check_dicom(ds: Dataset, result: dict[str, Any], headers: list[Dataset]) -> None:
    """Our own rules on top of highdicom's construction checks."""
    study_uid = result_study_uid(result, headers)
    what = f"{getattr(ds, 'Modality', '?')} result"
    if str(ds.StudyInstanceUID) != study_uid:
        raise ResultInvalid(f"{what}: StudyInstanceUID differs from the source study")
    if headers and str(ds.PatientID) != str(getattr(headers[0], "PatientID", "")):
        raise ResultInvalid(f"{what}: PatientID differs from the source")
    known = {str(h.SOPInstanceUID) for h in headers}
    for uid in referenced_instances(ds):
        if uid not in known and uid != str(ds.SOPInstanceUID):
            # an SR may reference its SEG, which is not a source instance
            if getattr(ds, "Modality", "") == "SR" and uid_is_result(uid, result, study_uid):
                continue
            raise ResultInvalid(f"{what}: references an instance that is not in the source")


def _stored_header(data: bytes) -> Dataset:
    """The header of a stored source instance (Part 10, as received and checked)."""
    try:
        return read_dataset(data)
    except MalformedInput as exc:
        raise ResultInvalid(f"a stored source instance cannot be read: {exc.message}") from None


def result_study_uid(result: dict[str, Any], headers: list[Dataset]) -> str:
    """The study a result belongs to: the image's, or for a report the study it names."""
    uid = result.get("input", {}).get("study_uid")
    if uid:
        return str(uid)
    return str(headers[0].StudyInstanceUID) if headers else ""


def uid_is_result(uid: str, result: dict[str, Any], study_uid: str) -> bool:
    model = result.get("model", {})
    name, version = str(model.get("name")), str(model.get("version"))
    return uid == result_uid("seg-instance", study_uid, name, version)


def referenced_instances(ds: Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in the data set."""
    found: set[str] = set()

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.keyword == "ReferencedSOPInstanceUID":
                found.add(str(elem.value))
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(ds)
    return found


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
