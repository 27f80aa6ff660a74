"""Build :class:`~gateway.route.rules.Attributes` from what the gateway has at hand.

- DICOM: the routing keywords (:data:`gateway.route.keywords.ROUTING_KEYWORDS`, plus
  ``TransferSyntaxUID``) of every instance of a study, merged: an attribute's values are
  those of all instances, so a route condition holds when any instance satisfies it.
  :func:`from_stored_dicom` takes the attribute dicts the store keeps per instance (no
  pixel data, no spool read); :func:`from_dicom_files` reads files with the same reader
  the DICOM SCP uses, so ``gateway explain`` sees what the gateway sees;
  :func:`from_datasets` takes pydicom datasets already in memory.
- HL7: :func:`from_hl7` parses one message (bytes) into paths ``SEG``, ``SEG-F``,
  ``SEG-F.C``, ``SEG-F.C.S`` (1-based; MSH-1 is the field separator and MSH-2 the
  encoding characters, as in the standard, so MSH-9 is the message type).

Values are strings; empty values are dropped.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.dicom.header import read_header
from gateway.dicom.part10 import is_part10
from gateway.envelope import Kind
from gateway.errors import MalformedInput
from gateway.hl7.message import Message, hl7_in, segment_fields, split_messages, unescape
from gateway.hl7.msh import HeaderError, parse_header
from gateway.route.keywords import ROUTING_KEYWORDS
from gateway.route.rules import Attributes


class _Collector:
    """Values per key, in first-seen order, without duplicates or empty strings."""

    def __init__(self) -> None:
        self._values: dict[str, dict[str, None]] = {}

    def add(self, key: str, value: str) -> None:
        if value:
            self._values.setdefault(key, {})[value] = None

    def result(self) -> dict[str, list[str]]:
        return {key: list(values) for key, values in self._values.items()}


# --- DICOM ------------------------------------------------------------------------------


def from_stored_dicom(
    instances: Iterable[Mapping[str, Any]], calling_ae: str | None = None
) -> Attributes:
    """A study's attributes from the per-instance attribute dicts the store keeps
    (:attr:`gateway.dicom.header.InstanceHeader.attrs`: keyword -> str, number, list of
    str or ``None``).  ``calling_ae`` is the sender's calling AE title (see
    :func:`calling_ae_of`)."""
    values = _Collector()
    for attrs in instances:
        for keyword, value in attrs.items():
            for text in _strings(value):
                values.add(keyword, text)
    return Attributes(Kind.DICOM, values.result(), calling_ae.strip() if calling_ae else None)


def from_datasets(
    datasets: Iterable[Dataset],
    calling_ae: str | None = None,
    keywords: Iterable[str] = ROUTING_KEYWORDS,
) -> Attributes:
    """A study's attributes from pydicom datasets (the routing *keywords* only, plus the
    transfer syntax from the file meta when there is one)."""
    keywords = tuple(keywords)
    stored: list[dict[str, Any]] = []
    for ds in datasets:
        attrs: dict[str, Any] = {kw: ds.get(kw) for kw in keywords if kw in ds}
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "TransferSyntaxUID" in meta:
            attrs["TransferSyntaxUID"] = str(meta.TransferSyntaxUID)
        stored.append(attrs)
    return from_stored_dicom(stored, calling_ae)


def from_dicom_files(
    paths: Iterable[Path | str],
    calling_ae: str | None = None,
    keywords: Iterable[str] = ROUTING_KEYWORDS,
) -> Attributes:
    """A study's attributes from Part 10 files, read up to the pixel data with the reader
    the DICOM SCP uses (:func:`gateway.dicom.header.read_header`).  Raises
    :class:`MalformedInput` naming the file that cannot be read."""
    keywords = tuple(keywords)
    return from_stored_dicom([read_dicom_header(path, keywords)[1] for path in paths], calling_ae)


def read_dicom_header(
    path: Path | str, keywords: Iterable[str] = ROUTING_KEYWORDS
) -> tuple[str, dict[str, Any]]:
    """(StudyInstanceUID, routing attributes) of one Part 10 file, read up to the pixel
    data.  Raises :class:`MalformedInput` naming the file."""
    path = Path(path)
    try:
        header = read_header(path, keywords)
    except MalformedInput as exc:
        raise MalformedInput(f"{path}: {exc.message}") from None
    if not header.study_instance_uid:
        raise MalformedInput(f"{path}: Study Instance UID (0020,000D) is missing")
    return header.study_instance_uid, header.attrs


def calling_ae_of(source: str) -> str | None:
    """The calling AE title in an envelope's DICOM ``source`` (``AE@host``)."""
    ae, sep, _host = source.rpartition("@")
    title = ae if sep else source
    return title.strip() or None


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bytes):
        return []  # binary values are not routing material
    if isinstance(value, list | tuple | MultiValue):
        return [s for v in value for s in _strings(v)]
    return [str(value).strip()]


# --- HL7 --------------------------------------------------------------------------------


def hl7_keys(routes: Iterable[Any]) -> frozenset[str]:
    """The HL7 keys (``MSH-9``, ``PID-3.1`` ...) that *routes* test: what routing needs
    :func:`from_hl7` to read."""
    return frozenset(key.upper() for route in routes for key in (route.when.hl7 or {}))


def from_hl7(message: bytes | str, keys: Collection[str] | None = None) -> Attributes:
    """The attributes of one HL7 v2 message (only those under *keys* when given: the
    segments and fields they name are read, the rest skipped, with the same values).

    Keys: ``SEG`` (the segment is there), ``SEG-F`` (each repetition of the field, its
    components joined with ``^`` and subcomponents with ``&``, whatever separators the
    message declares, trailing empty components dropped), ``SEG-F.C`` and ``SEG-F.C.S``.
    The separator escapes (``\\F\\ \\S\\ \\R\\ \\E\\ \\T\\``) are decoded, others kept as
    written.  Every occurrence of a repeated segment contributes its values.  ``MSH-9``
    also holds the normalised message type ``CODE^TRIGGER``, so ``MSH-9: ORU^R01`` matches
    ``ORU^R01^ORU_R01``.

    The message is read with :class:`gateway.hl7.message.Message`: framing, separators,
    MSH-18 character set, segments (continuation lines included) as every stage reads
    them.  Raises :class:`MalformedInput` when the message does not start with a usable
    MSH segment.
    """
    parsed = Message.parse(message)
    seps = parsed.separators
    comp_sep, rep_sep, sub_sep = seps.component, seps.repetition, seps.subcomponent

    # with keys: only the segments and fields ("PID-3") they name are read
    wanted_fields = None if keys is None else {k.upper().split(".", 1)[0] for k in keys}
    wanted_segments = None if wanted_fields is None else {f.split("-", 1)[0] for f in wanted_fields}
    values = _Collector()
    for segment in parsed.segments:
        seg_id = segment[:3]
        if wanted_segments is not None and seg_id not in wanted_segments:
            continue
        values.add(seg_id, seg_id)
        fields = segment_fields(segment, seps)
        if seg_id == "MSH":
            values.add("MSH-1", seps.field)
            values.add("MSH-2", seps.encoding)
            first = 3
        else:
            first = 1
        for number in range(first, len(fields)):
            path = f"{seg_id}-{number}"
            if wanted_fields is not None and path not in wanted_fields:
                continue
            for repetition in fields[number].split(rep_sep):
                texts: list[str] = []
                for c, component in enumerate(repetition.split(comp_sep), start=1):
                    subs = [unescape(s, seps, formatting=False) for s in component.split(sub_sep)]
                    for n, sub in enumerate(subs, start=1):
                        values.add(f"{path}.{c}.{n}", sub)
                    joined = "&".join(subs).rstrip("&")
                    values.add(f"{path}.{c}", joined)
                    texts.append(joined)
                values.add(path, "^".join(texts).rstrip("^"))
    result = values.result()
    msh9 = result.get("MSH-9")
    code, trigger = result.get("MSH-9.1", [""])[0], result.get("MSH-9.2", [""])[0]
    if msh9 is not None and code and trigger and f"{code}^{trigger}" not in msh9:
        msh9.append(f"{code}^{trigger}")
    return Attributes(Kind.HL7, result)


# --- inputs of `gateway explain` ---------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """One thing to route, found in an input path: a DICOM study or an HL7 message.

    ``label`` names where it came from (the path, plus ``#N`` for the N-th message of a
    file holding several); ``summary`` says what it is in words; ``ids`` holds the same
    identifiers for machine-readable output.
    """

    label: str
    summary: str
    attrs: Attributes
    ids: Mapping[str, str | int] = field(default_factory=dict)


def subjects_in(
    path: Path | str,
    calling_ae: str | None = None,
    keywords: Iterable[str] = ROUTING_KEYWORDS,
) -> list[Subject]:
    """The studies and messages in one input path, read without side effects:

    - a DICOM Part 10 file (``DICM`` at offset 128): one study of one instance;
    - a folder: every DICOM file in it and below, one study per StudyInstanceUID (files
      that are not DICOM are skipped);
    - an HL7 file (starting with MSH): one subject per message (a new message starts at
      every MSH segment), each checked the way the MLLP listener checks it.

    Raises :class:`MalformedInput` naming the file that cannot be read or understood.
    """
    path = Path(path)
    keywords = tuple(keywords)
    if path.is_dir():
        return _folder_subjects(path, calling_ae, keywords)
    data = _read(path)
    if is_part10(data):
        study, attrs = read_dicom_header(path, keywords)
        return [_study_subject(str(path), study, [attrs], calling_ae)]
    hl7 = hl7_in(data)
    if hl7 is not None:
        messages = split_messages(hl7)
        return [
            _message_subject(f"{path} #{i}" if len(messages) > 1 else str(path), message)
            for i, message in enumerate(messages, start=1)
        ]
    raise MalformedInput(
        f"{path}: neither a DICOM file ('DICM' at offset 128) nor an HL7 message "
        "(starting with MSH)"
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MalformedInput(f"{path}: no such file or folder") from None
    except OSError as exc:
        raise MalformedInput(f"{path}: cannot read: {exc.strerror}") from None


def _folder_subjects(
    folder: Path, calling_ae: str | None, keywords: tuple[str, ...]
) -> list[Subject]:
    studies: dict[str, list[dict[str, Any]]] = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with file.open("rb") as f:
                head = f.read(132)
        except OSError as exc:
            raise MalformedInput(f"{file}: cannot read: {exc.strerror}") from None
        if is_part10(head):
            study, attrs = read_dicom_header(file, keywords)
            studies.setdefault(study, []).append(attrs)
    if not studies:
        raise MalformedInput(f"{folder}: no DICOM files ('DICM' at offset 128) in this folder")
    return [
        _study_subject(str(folder), study, instances, calling_ae)
        for study, instances in studies.items()
    ]


def _study_subject(
    label: str, study: str, instances: list[dict[str, Any]], calling_ae: str | None
) -> Subject:
    attrs = from_stored_dicom(instances, calling_ae)
    n = len(instances)
    modalities = ", ".join(attrs.get("Modality")) or "no Modality"
    summary = f"DICOM study {study} ({n} instance{'s' if n != 1 else ''}, {modalities})"
    return Subject(label, summary, attrs, {"study_instance_uid": study, "instances": n})


def _message_subject(label: str, message: bytes) -> Subject:
    try:
        header = parse_header(message)
    except HeaderError as exc:
        raise MalformedInput(f"{label}: the HL7 listener would refuse it: {exc}") from None
    try:
        attrs = from_hl7(message)
    except MalformedInput as exc:
        raise MalformedInput(f"{label}: {exc.message}") from None
    summary = f"HL7 {header.message_type} message {header.control_id}"
    return Subject(
        label,
        summary,
        attrs,
        {"message_type": header.message_type, "control_id": header.control_id},
    )
