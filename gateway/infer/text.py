"""Report text for note models: from the OBX segments of an HL7 v2 message, or a plain file.

Only text-typed observations count: OBX-2 (value type) ``TX``, ``FT`` or ``ST``.  Each
repetition of OBX-5 is one line; the lines of successive OBX segments follow each other.
Observations whose result status (OBX-11) is ``D`` (delete) or ``W`` (posted in error)
are left out.  Escape sequences are decoded with the separators and character set the
message declares (:func:`gateway.hl7.message.unescape`, formatting included): the
separator escapes, ``\\.br\\`` and the other formatted-text commands, ``\\Xhh…\\``;
highlighting is dropped.  The formatting commands are decoded whatever the value type:
they are defined for FT, but senders use ``\\.br\\`` in TX and ST too.

The message is read with :class:`gateway.hl7.message.Message`, the one HL7 reader:
segments may end with ``\\r``, ``\\n`` or ``\\r\\n``, and a line that does not start
like a segment continues the previous one, which is what a report saved by an editor
usually is.  A batch (several MSH) is read with each message's own separators.

Everything here is a pure function of its input.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.hl7.message import (
    Message,
    Separators,
    decode,
    field_at,
    hl7_in,
    segment_fields,
    strip_framing,
    unescape,
)

TEXT_VALUE_TYPES = frozenset({"TX", "FT", "ST"})
SKIPPED_RESULT_STATUS = frozenset({"D", "W"})


def report_text_from_hl7(message: bytes) -> str:
    """The report text of one HL7 v2 message (ORU, MDM, …): its text OBX values, one line each.

    Raises :class:`~gateway.errors.MalformedInput` when the message has no usable MSH
    segment.  A message without text observations gives ``""``.
    """
    parsed = Message.parse(message)
    seps = parsed.separators
    lines: list[str] = []
    for segment in parsed.segments:
        if segment.startswith("MSH"):  # a batch holds several messages, each with its own
            seps = Separators.from_msh(segment)
            continue
        if not segment.startswith("OBX" + seps.field):
            continue
        fields = segment_fields(segment, seps)
        value_type = field_at(fields, 2).split(seps.component, 1)[0].strip().upper()
        if value_type not in TEXT_VALUE_TYPES:
            continue
        if field_at(fields, 11).strip().upper() in SKIPPED_RESULT_STATUS:
            continue
        for repetition in field_at(fields, 5).split(seps.repetition):
            lines.append(unescape(repetition, seps, parsed.charset))
    return "\n".join(lines).strip("\n")


def report_text_from_file(path: str | os.PathLike[str]) -> str:
    """The report text of a file: an HL7 v2 message (it starts with MSH) or plain text."""
    data = Path(path).read_bytes()
    message = hl7_in(data)
    if message is not None:
        return report_text_from_hl7(message)
    text = decode(strip_framing(data))
    return text.replace("\r\n", "\n").replace("\r", "\n").strip("\n")


def identifiers_from_file(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """:func:`identifiers_from_hl7` of a file that holds an HL7 message; none for plain text."""
    message = hl7_in(Path(path).read_bytes())
    return [] if message is None else identifiers_from_hl7(message)


# Fields of a message that identify the patient or the people and orders around them, and
# which of their components hold the identifying part (see :func:`identifiers_from_hl7`).
# CX/EI: the ID (component 1); XPN: family, given, middle; XCN: ID, family, given, middle;
# XAD: street, other, city, postcode; XTN: the number as written, area code, local number;
# DT: a date; NDL (OBR-32…35): the name, as subcomponents of component 1.
_ID_COMPONENTS: dict[str, tuple[tuple[int, ...], str]] = {
    "CX": ((1,), "[ID]"),
    "EI": ((1,), "[ID]"),
    "ST": ((1,), "[ID]"),
    "XPN": ((1, 2, 3), "[NAME]"),
    "XCN": ((2, 3, 4), "[NAME]"),
    "XAD": ((1, 2, 3, 5), "[ADDRESS]"),
    "XTN": ((1, 6, 7), "[CONTACT]"),
    "DT": ((1,), "[DATE]"),
    "NDL": ((1,), "[NAME]"),
}
_ID_FIELDS: dict[str, dict[int, str]] = {
    "PID": {
        2: "CX",
        3: "CX",
        4: "CX",
        5: "XPN",
        6: "XPN",
        7: "DT",
        9: "XPN",
        11: "XAD",
        13: "XTN",
        14: "XTN",
        18: "CX",
        19: "ST",
        20: "ST",
        21: "CX",
        29: "DT",
    },
    "PD1": {4: "XCN"},
    "NK1": {2: "XPN", 4: "XAD", 5: "XTN", 6: "XTN"},
    "PV1": {7: "XCN", 8: "XCN", 9: "XCN", 17: "XCN", 19: "CX", 50: "CX", 52: "XCN"},
    "MRG": {1: "CX", 2: "CX", 3: "CX", 5: "CX", 7: "XPN"},
    "ORC": {2: "EI", 3: "EI", 4: "EI", 10: "XCN", 11: "XCN", 12: "XCN"},
    "OBR": {
        2: "EI",
        3: "EI",
        16: "XCN",
        18: "ST",
        19: "ST",
        20: "ST",
        21: "ST",
        28: "XCN",
        32: "NDL",
        33: "NDL",
        34: "NDL",
        35: "NDL",
    },
    "GT1": {3: "XPN", 5: "XAD", 6: "XTN", 7: "XTN"},
    "IN1": {16: "XPN", 19: "XAD", 36: "ST"},
}


def identifiers_from_hl7(message: bytes) -> list[tuple[str, str]]:
    """The identifying values a message carries, as ``(placeholder, value)`` pairs for
    :func:`gateway.security.deid.deidentify_text`: the patient's names, IDs, birth date,
    address and phone numbers, next of kin, providers, visit and order numbers.

    A birth date is given in the spellings a report might use (``1961-03-14``,
    ``14/03/1961``, ``03/14/1961``, ``14.03.1961``).
    """
    parsed = Message.parse(message)
    seps = parsed.separators
    found: list[tuple[str, str]] = []
    for segment in parsed.segments:
        if segment.startswith("MSH"):
            seps = Separators.from_msh(segment)
            continue
        fields_of = _ID_FIELDS.get(segment[:3])
        if fields_of is None:
            continue
        fields = segment_fields(segment, seps)
        for number, data_type in fields_of.items():
            components, placeholder = _ID_COMPONENTS[data_type]
            for repetition in field_at(fields, number).split(seps.repetition):
                parts = repetition.split(seps.component)
                for c in components:
                    if c > len(parts):
                        continue
                    for sub in parts[c - 1].split(seps.subcomponent):
                        value = unescape(sub, seps, parsed.charset).strip()
                        if data_type == "DT":
                            found += [(placeholder, v) for v in _date_spellings(value)]
                        elif value:
                            found.append((placeholder, value))
    return found


def _date_spellings(value: str) -> list[str]:
    if len(value) < 8 or not value[:8].isdigit():
        return [value] if value else []
    y, m, d = value[:4], value[4:6], value[6:8]
    return [value, value[:8], f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"]
