"""Report text for note models: from the OBX segments of an HL7 v2 message, or a plain file.

Only text-typed observations count: OBX-2 (value type) ``TX``, ``FT`` or ``ST``.  Each
repetition of OBX-5 is one line; the lines of successive OBX segments follow each other.
Observations whose result status (OBX-11) is ``D`` (delete) or ``W`` (posted in error)
are left out.  Escape sequences are decoded with the separators the message declares in
MSH-1/MSH-2: ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (and ``\\P\\``, the v2.7 truncation character),
the formatted-text commands ``\\.br\\`` (line break), ``\\.sp n\\`` (n line breaks),
``\\.ce\\`` (a new line), ``\\.sk n\\`` (n spaces), ``\\Xhh…\\`` (bytes in the message's
character set); highlighting (``\\H\\ \\N\\``), indentation and other commands are dropped.
The formatting commands are decoded whatever the value type: they are defined for FT, but
senders use ``\\.br\\`` in TX and ST too.

Segments may end with ``\\r`` (the standard), ``\\n`` or ``\\r\\n``.  A line that does not
start like a segment (three characters and the field separator) is taken as a line break
inside the previous segment, which is what a report saved by an editor usually is.

Everything here is a pure function of its input.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import MalformedInput

TEXT_VALUE_TYPES = frozenset({"TX", "FT", "ST"})
SKIPPED_RESULT_STATUS = frozenset({"D", "W"})

_LINE_SPLIT = re.compile(r"\r\n|\r|\n")
_SEGMENT_START = re.compile(r"[A-Z][A-Z0-9]{2}")
_FRAMING = b"\x0b\x1c\x00 \t\r\n"

# MSH-18 values (HL7 table 0211) and the Python codecs they name.
_CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/5": "iso8859-5",
    "8859/7": "iso8859-7",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
}


@dataclass(frozen=True)
class Separators:
    """MSH-1 and MSH-2 of one message."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""

    @classmethod
    def from_msh(cls, msh: str) -> Separators:
        if len(msh) < 8 or not msh.startswith("MSH"):
            raise MalformedInput("the MSH segment is too short to hold its separators")
        field = msh[3]
        encoding = msh[4:].split(field, 1)[0]
        if len(encoding) < 4 or field.isalnum() or field.isspace():
            raise MalformedInput(f"unusable MSH-1/MSH-2 separators {msh[3:8]!r}")
        return cls(
            field=field,
            component=encoding[0],
            repetition=encoding[1],
            escape=encoding[2],
            subcomponent=encoding[3],
            truncation=encoding[4] if len(encoding) > 4 else "",
        )


def report_text_from_hl7(message: bytes) -> str:
    """The report text of one HL7 v2 message (ORU, MDM, …): its text OBX values, one line each.

    Raises :class:`~gateway.errors.MalformedInput` when the message has no usable MSH
    segment.  A message without text observations gives ``""``.
    """
    segments, seps, charset = _read_message(message)
    lines: list[str] = []
    for segment in segments:
        if segment.startswith("MSH"):  # a batch holds several messages, each with its own
            seps = Separators.from_msh(segment)
            continue
        if not segment.startswith("OBX" + seps.field):
            continue
        fields = segment.split(seps.field)
        value_type = _field(fields, 2).split(seps.component, 1)[0].strip().upper()
        if value_type not in TEXT_VALUE_TYPES:
            continue
        if _field(fields, 11).strip().upper() in SKIPPED_RESULT_STATUS:
            continue
        for repetition in _field(fields, 5).split(seps.repetition):
            lines.append(decode_escapes(repetition, seps, charset))
    return "\n".join(lines).strip("\n")


def _read_message(message: bytes) -> tuple[list[str], Separators, str]:
    """A message's segments, its first MSH's separators and its codec (MSH-18)."""
    data = _strip_framing(message)
    charset = message_charset(data)
    segments = _segments(decode_message(data, charset))
    if not segments or not segments[0].startswith("MSH"):
        raise MalformedInput("an HL7 message must start with an MSH segment")
    return segments, Separators.from_msh(segments[0]), charset


def _hl7_in_file(data: bytes) -> bytes | None:
    """A file's HL7 message from its first MSH on, or None when the file is plain text."""
    start = _strip_framing(data)
    return _from_first_msh(start) if start[:3] in (b"MSH", b"FHS", b"BHS") else None


def report_text_from_file(path: str | os.PathLike[str]) -> str:
    """The report text of a file: an HL7 v2 message (it starts with MSH) or plain text."""
    data = Path(path).read_bytes()
    message = _hl7_in_file(data)
    if message is not None:
        return report_text_from_hl7(message)
    text = decode_message(_strip_framing(data), "")
    return "\n".join(_LINE_SPLIT.split(text)).strip("\n")


def decode_escapes(value: str, seps: Separators, charset: str = "") -> str:
    """Decode the HL7 escape sequences in one field value (see the module docstring)."""
    esc = seps.escape
    if esc not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        end = value.find(esc, i + 1) if ch == esc else -1
        if end < 0:
            out.append(ch)
            i += 1
            continue
        decoded = _escape(value[i + 1 : end], seps, charset)
        if decoded is None:  # not an escape sequence: keep the escape character as text
            out.append(ch)
            i += 1
            continue
        out.append(decoded)
        i = end + 1
    return "".join(out)


def _escape(body: str, seps: Separators, charset: str) -> str | None:
    """The text one escape sequence ``\\body\\`` stands for, or None if it is none."""
    simple = {
        "F": seps.field,
        "S": seps.component,
        "T": seps.subcomponent,
        "R": seps.repetition,
        "E": seps.escape,
        "P": seps.truncation,
        "H": "",
        "N": "",
    }
    if body in simple:
        return simple[body]
    if body.startswith("X"):
        digits = body[1:]
        if len(digits) % 2 or not re.fullmatch(r"[0-9A-Fa-f]*", digits):
            return None
        return decode_message(bytes.fromhex(digits), charset)
    if body.startswith(("Z", "C", "M")):  # locally defined / character set switches
        return "" if re.fullmatch(r"[ZCM][0-9A-Za-z]*", body) else None
    if body.startswith("."):
        command, _, argument = body[1:].partition(" ")
        command = command.strip()
        count = _count(argument.strip() or command[2:])
        if command == "br":
            return "\n"
        if command.startswith("sp"):
            return "\n" * count
        if command == "ce":
            return "\n"
        if command.startswith("sk"):
            return " " * count
        if command.startswith(("in", "ti", "fi", "nf")):
            return ""
    return None


def identifiers_from_file(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """:func:`identifiers_from_hl7` of a file that holds an HL7 message; none for plain text."""
    message = _hl7_in_file(Path(path).read_bytes())
    return [] if message is None else identifiers_from_hl7(message)


def _count(text: str) -> int:
    text = text.lstrip("+")
    return int(text) if text.isdigit() else 1


def _field(fields: list[str], number: int) -> str:
    """Field ``number`` of a non-MSH segment split on its field separator (``""`` if absent)."""
    return fields[number] if number < len(fields) else ""


def _segments(text: str) -> list[str]:
    segments: list[str] = []
    field_sep = text[3] if text.startswith("MSH") and len(text) > 3 else "|"
    for line in _LINE_SPLIT.split(text):
        if not line:
            continue
        looks_like_segment = _SEGMENT_START.match(line) is not None and (
            len(line) == 3 or line[3] == field_sep
        )
        if looks_like_segment or not segments:
            segments.append(line)
        else:  # a line break inside the previous segment's text
            segments[-1] += "\n" + line
    return segments


def _strip_framing(data: bytes) -> bytes:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.strip(_FRAMING)


def _from_first_msh(data: bytes) -> bytes:
    """A batch file (FHS/BHS …) read from its first message header on."""
    index = data.find(b"MSH")
    return data[index:] if index >= 0 else data


def message_charset(data: bytes) -> str:
    """The Python codec MSH-18 names, or ``""`` (then UTF-8 with a Latin-1 fallback)."""
    first_line = _LINE_SPLIT.split(data.decode("latin-1"), 1)[0]
    if len(first_line) < 4:
        return ""
    fields = first_line.split(first_line[3])
    msh18 = fields[17] if len(fields) > 17 else ""
    first = msh18.split(first_line[5] if len(first_line) > 5 else "~", 1)[0].strip().upper()
    return _CHARSETS.get(first, "")


def decode_message(data: bytes, charset: str) -> str:
    """The message's text, in the character set MSH-18 names (``message_charset``)."""
    if charset:
        return data.decode(charset, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


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
    :func:`gateway.security.deid.scrub_text`: the patient's names, IDs, birth date,
    address and phone numbers, next of kin, providers, visit and order numbers.

    A birth date is given in the spellings a report might use (``1961-03-14``,
    ``14/03/1961``, ``03/14/1961``, ``14.03.1961``).
    """
    segments, seps, charset = _read_message(message)
    found: list[tuple[str, str]] = []
    for segment in segments:
        if segment.startswith("MSH"):
            seps = Separators.from_msh(segment)
            continue
        fields_of = _ID_FIELDS.get(segment[:3])
        if fields_of is None:
            continue
        fields = segment.split(seps.field)
        for number, data_type in fields_of.items():
            components, placeholder = _ID_COMPONENTS[data_type]
            for repetition in _field(fields, number).split(seps.repetition):
                parts = repetition.split(seps.component)
                for c in components:
                    if c > len(parts):
                        continue
                    for sub in parts[c - 1].split(seps.subcomponent):
                        value = decode_escapes(sub, seps, charset).strip()
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
