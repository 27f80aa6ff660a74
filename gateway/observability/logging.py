"""Logging: structlog JSON lines on stdout, with a PHI-redaction processor.

The only global logging state lives here.  :func:`configure_logging` is called once by
the CLI; library log records (pynetdicom, asyncio, hl7apy) go through the same chain,
so redaction covers them too.  Identifiers in logs are envelope ids and keyed hashes.
"""

from __future__ import annotations

import datetime as _dt
import enum
import logging
import os
import re
import sys
import traceback
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

# Keys whose values are PHI (or may carry it) and never belong in a log line.
PHI_KEYS = frozenset(
    k.lower()
    for k in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientAddress",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientMotherBirthName",
        "PatientTelephoneNumbers",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
        "SeriesDescription",
        "InstitutionName",
        "StudyID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "patient_name",
        "patient_id",
        "birth_date",
        "accession",
        "accession_number",
        "mrn",
        "name",
        "dob",
        "address",
        "phone",
        "text",
        "note",
        "report",
        "message",
        "payload",
        "raw",
        "body",
        "dataset",
        "control_id",
        "msh10",
        "pid",
        "obx",
    )
)
REDACTED = "[redacted]"

# Values that look like PHI whatever key they come under (e.g. inside a library's message).
_PHI_PATTERNS = [
    # DOE^JANE, SMITH^J (PN); the lookahead spares HL7 types such as ORU^R01, ADT^A08
    re.compile(r"(?<![\w^])[A-Z][A-Za-z'-]+\^[A-Z][A-Za-z'-]*(?![0-9])(?:\^[\w'-]*)*"),
    re.compile(r"\b(?:PID|NK1|OBX|NTE|PV1|OBR|ORC|DG1|AL1|IN1|GT1)\|[^\r\n]*"),  # HL7 segments
    re.compile(r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b"),  # DA dates
]
_SAFE_TYPES = (str, int, float, bool, type(None))


def redact_text(text: str) -> str:
    """*text* with whatever looks like PHI (a person name ``DOE^JANE``, an HL7 segment that
    carries patient data, a DICOM date) replaced by ``[REDACTED]``: for free text that is
    about to be logged or audited.  Report text handed to a model is de-identified by
    :func:`gateway.security.deid.deidentify_text` instead."""
    for pattern in _PHI_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def redact_phi(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop PHI keys and scrub PHI-looking values; refuse rich objects (a Dataset, a message).

    Only plain scalars and lists/dicts of them are logged: anything else is replaced by its
    type name, so a whole dataset passed by mistake never reaches the log.
    """
    for key in list(event_dict):
        if key.lower() in PHI_KEYS and key != "event":
            event_dict[key] = REDACTED
            continue
        event_dict[key] = _clean(event_dict[key])
    return event_dict


def _clean(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, enum.Enum):
        return _clean(value.value, depth)
    if isinstance(value, _SAFE_TYPES):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)) and depth < 3:
        return [_clean(v, depth + 1) for v in value]
    if isinstance(value, Mapping) and depth < 3:
        return {
            str(k): (REDACTED if str(k).lower() in PHI_KEYS else _clean(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    return f"<{type(value).__name__}>"


def exception_fields(exc: BaseException) -> dict[str, str]:
    """How an unexpected exception is logged: its type and the last code lines of its stack.

    Never its text or the frames' locals: those can hold patient data (a pydicom value, an
    HL7 field).  The stack's source lines are code, not data.
    """
    return {
        "error_type": type(exc).__name__,
        "stack": "".join(traceback.format_tb(exc.__traceback__)[-4:]),
    }


class _ProcessFields:
    """A processor: the process's name and pid on every line."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self, _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("process", self.name)
        event_dict.setdefault("process_id", os.getpid())
        return event_dict


def configure_logging(
    level: str = "INFO", stream: TextIO | None = None, process: str | None = None
) -> None:
    """Set up structlog and the standard library logging to write redacted JSON lines.
    With *process* (``gateway run``'s processes share one stdout), every line also says
    which process wrote it: ``process`` (``supervisor``, ``ingest-0``, ``worker-1``) and
    ``process_id`` (the operating system's; ``pid`` is an HL7 segment's name, redacted)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *([_ProcessFields(process)] if process is not None else []),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_phi,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom's own INFO/DEBUG lines print identifiers; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("hl7apy").setLevel(logging.WARNING)
    # pydicom warns about non-conformant values; data is stored as received, so that is noise
    # at ingest.  Python warnings go through the same chain (redacted) instead of stderr.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
