"""The one reader of HL7 v2 messages: framing, separators, character set, segments, escapes.

Every stage that reads HL7 reads it with these rules: the MLLP edge's fast MSH reader
(:mod:`gateway.hl7.msh`), the ACK reader of the HL7 client, routing attributes, report
text and identifiers, the ORU builder's source message and ``gateway explain``.

- Framing (:func:`strip_framing`): MLLP start and end blocks, NUL, a UTF-8 byte order
  mark and blank space around the message are not part of it.
- Separators (:meth:`Separators.from_msh`, the one validation rule): MSH-1, the field
  separator, is not a letter, digit or white space; MSH-2 holds 4 encoding characters
  (component, repetition, escape, subcomponent), 5 with the v2.7 truncation character,
  none a letter, digit or white space, all different from each other and from MSH-1.
- Character set (:attr:`Message.charset`): the first repetition of MSH-18 (HL7 table
  0211) names the codec; without one the text is UTF-8, or Latin-1 when it is not valid
  UTF-8.
- Segments (:func:`split_segments`): lines end with ``\\r`` (the standard), ``\\n`` or
  ``\\r\\n``.  A line that starts with a segment id (``[A-Z][A-Z0-9]{2}``) followed by the
  field separator, or that is a segment id alone, starts a segment; any other line
  continues the previous segment after a ``\\n`` (a report saved by an editor).  Blank
  lines are dropped.
- Fields (:func:`segment_fields`): numbered as in the standard, ``fields[n]`` is SEG-n,
  so for MSH ``fields[1]`` is MSH-1 (the field separator) and ``fields[2]`` MSH-2.
- Escapes (:func:`unescape`, the one decoder): the separator escapes ``\\F\\ \\S\\ \\T\\
  \\R\\ \\E\\`` (and ``\\P\\`` when MSH-2 declares a truncation character); with
  ``formatting`` (the default) also the formatted-text commands, ``\\Xhh…\\`` and
  highlighting.  What is not an escape sequence stays as written.
- Files (:func:`hl7_in`, :func:`split_messages`): a file holds HL7 when it starts with
  MSH (or a batch header FHS / BHS); a new message starts at every MSH segment.

This module depends on the standard library and :mod:`gateway.errors` only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import MalformedInput

_BOM = b"\xef\xbb\xbf"
_FRAMING = b"\x0b\x1c\x00 \t\r\n"
_TEXT_FRAMING = "\x0b\x1c\x00 \t\r\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINE_BREAK_BYTES = re.compile(rb"\r\n|\r|\n")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_HEX = re.compile(r"[0-9A-Fa-f]*")
_LOCAL_ESCAPE = re.compile(r"[ZCM][0-9A-Za-z]*")  # locally defined, character set switches
MAX_COUNT = 100
"""The most line breaks or spaces one ``\\.sp n\\`` / ``\\.sk n\\`` stands for: a few bytes
must not become megabytes of text."""

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
    """MSH-1 and MSH-2 of one message (``truncation`` is ``""`` before v2.7)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""

    @classmethod
    def from_msh(cls, msh: str) -> Separators:
        """The separators an MSH segment declares (only its first line is read).

        Raises :class:`~gateway.errors.MalformedInput` saying what is wrong when they are
        unusable (see the module docstring for the rule).
        """
        if not msh.startswith("MSH"):
            raise MalformedInput("an HL7 message must start with an MSH segment")
        end = _LINE_BREAK.search(msh)
        if end is not None:
            msh = msh[: end.start()]
        if len(msh) < 8:
            raise MalformedInput("the MSH segment is too short to hold its separators")
        field = msh[3]
        encoding = msh[4:].split(field, 1)[0]
        if field.isalnum() or field.isspace():
            problem = f"MSH-1 field separator {field!r} is not usable"
        elif len(encoding) not in (4, 5):
            problem = (
                f"MSH-2 must hold 4 encoding characters (5 with the truncation character), "
                f"found {len(encoding)}"
            )
        elif len(set(encoding + field)) != len(encoding) + 1:
            problem = "MSH-1/MSH-2 separators must all be different"
        elif any(c.isalnum() or c.isspace() for c in encoding):
            problem = "MSH-2 encoding characters must not be letters, digits or white space"
        else:
            return cls(field, encoding[0], encoding[1], encoding[2], encoding[3], encoding[4:])
        raise MalformedInput(problem)

    @property
    def encoding(self) -> str:
        """MSH-2, the encoding characters."""
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


@dataclass(frozen=True)
class Message:
    """One HL7 v2 message read with the rules of this module: its first MSH's separators,
    the codec MSH-18 names (``""`` when none: UTF-8, else Latin-1) and its segments."""

    separators: Separators
    charset: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, data: bytes | str) -> Message:
        """Read one message (bytes as received, or text already decoded).

        Raises :class:`~gateway.errors.MalformedInput` when it does not start with an MSH
        segment or its separators are unusable.
        """
        if isinstance(data, bytes):
            data = strip_framing(data)
            charset = _charset(data)
            text = decode(data, charset)
        else:
            text = data.strip(_TEXT_FRAMING)
            if text.startswith("\ufeff"):
                text = text[1:].lstrip(_TEXT_FRAMING)
            charset = ""
        separators = Separators.from_msh(text)
        return cls(separators, charset, tuple(split_segments(text, separators.field)))


def strip_framing(data: bytes) -> bytes:
    """*data* without MLLP framing, NUL, a UTF-8 byte order mark and the blank space
    around it."""
    data = data.strip(_FRAMING)
    if data.startswith(_BOM):
        data = data[3:].lstrip(_FRAMING)
    return data


def decode(data: bytes, charset: str = "") -> str:
    """*data* as text in *charset* (a Python codec, as :attr:`Message.charset`; bytes it
    cannot decode are replaced), or without one UTF-8, else Latin-1."""
    if charset:
        return data.decode(charset, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def split_segments(text: str, field_sep: str = "|") -> list[str]:
    """The segments of a message's text: continuation lines joined to their segment with
    ``\\n``, blank lines dropped (see the module docstring)."""
    lines = _LINE_BREAK.split(text) if "\n" in text else text.split("\r")
    segments: list[str] = []
    for line in lines:
        if not line or line.isspace():
            continue
        starts_segment = (line[3:4] == field_sep or len(line) == 3) and _SEGMENT_ID.match(line)
        if starts_segment or not segments:
            segments.append(line)
        else:
            segments[-1] += "\n" + line
    return segments


def segment_fields(segment: str, separators: Separators) -> list[str]:
    """A segment split into fields numbered as in the standard: ``fields[n]`` is SEG-n,
    ``fields[0]`` the segment id; for MSH ``fields[1]`` is MSH-1, the field separator."""
    fields = segment.split(separators.field)
    if fields[0] == "MSH":
        fields.insert(1, separators.field)
    return fields


def field_at(fields: list[str], number: int) -> str:
    """SEG-*number* of :func:`segment_fields` (``""`` when the segment is shorter)."""
    return fields[number] if number < len(fields) else ""


def unescape(
    value: str, separators: Separators, charset: str = "", *, formatting: bool = True
) -> str:
    """Decode the escape sequences of one value (a field split down to what is read).

    Always the separator escapes ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``, and ``\\P\\`` when MSH-2
    declares a truncation character.  With *formatting*: also the formatted-text commands
    ``\\.br\\`` (line break), ``\\.sp n\\`` (n line breaks), ``\\.ce\\`` (a new line),
    ``\\.sk n\\`` (n spaces; n at most :data:`MAX_COUNT`); ``\\Xhh…\\`` (bytes in *charset*,
    see :func:`decode`);
    highlighting (``\\H\\ \\N\\``), indentation and fill commands, local (``\\Z…\\``) and
    character-set (``\\C…\\ \\M…\\``) escapes are dropped.  Without *formatting* (the ACK
    path, routing) those stay as written.  A sequence that is none of these, and a lone
    escape character, stay as written.
    """
    esc = separators.escape
    if esc not in value:
        return value
    out: list[str] = []
    i = 0
    while True:
        start = value.find(esc, i)
        end = value.find(esc, start + 1) if start >= 0 else -1
        if end < 0:
            out.append(value[i:])
            return "".join(out)
        decoded = _escape(value[start + 1 : end], separators, charset, formatting)
        if decoded is None:  # not an escape sequence: the escape character is text
            out.append(value[i : start + 1])
            i = start + 1
        else:
            out.append(value[i:start])
            out.append(decoded)
            i = end + 1


def hl7_in(data: bytes) -> bytes | None:
    """The HL7 in a file's bytes, from its first MSH segment on (framing stripped, a batch
    file's FHS / BHS headers skipped); ``None`` when the data does not start like HL7."""
    data = strip_framing(data)
    if data[:3] not in (b"MSH", b"FHS", b"BHS"):
        return None
    index = data.find(b"MSH")
    return data[index:] if index >= 0 else data


def split_messages(data: bytes) -> list[bytes]:
    """The messages of a file holding one or more (separated by blank lines, or not at
    all): a new message starts at every MSH segment.  MLLP framing bytes, byte order marks
    and blank lines are dropped; each message's segments end with ``\\r``."""
    messages: list[list[bytes]] = []
    for line in _LINE_BREAK_BYTES.split(data.replace(b"\x0b", b"").replace(b"\x1c", b"")):
        if line.startswith(_BOM):
            line = line[3:]
        if not line.strip():
            continue
        if line.startswith(b"MSH") or not messages:
            messages.append([])
        messages[-1].append(line)
    return [b"\r".join(segments) + b"\r" for segments in messages]


def _charset(data: bytes) -> str:
    """The codec MSH-18 of *data* (framing stripped) names, or ``""``."""
    end = _LINE_BREAK_BYTES.search(data)
    msh = (data[: end.start()] if end is not None else data).decode("latin-1")
    if len(msh) < 4:
        return ""
    fields = msh.split(msh[3], 18)
    msh18 = fields[17] if len(fields) > 17 else ""
    repetition = msh[5] if len(msh) > 5 else "~"
    return _CHARSETS.get(msh18.split(repetition, 1)[0].strip().upper(), "")


def _escape(body: str, seps: Separators, charset: str, formatting: bool) -> str | None:
    """The text one escape sequence ``\\body\\`` stands for, or None if it is none."""
    if len(body) == 1:
        if body == "F":
            return seps.field
        if body == "S":
            return seps.component
        if body == "T":
            return seps.subcomponent
        if body == "R":
            return seps.repetition
        if body == "E":
            return seps.escape
        if body == "P":
            return seps.truncation or None
    if not formatting:
        return None
    if body in ("H", "N"):  # highlighting on / off
        return ""
    if body.startswith("X"):
        digits = body[1:]
        if len(digits) % 2 or not _HEX.fullmatch(digits):
            return None
        return decode(bytes.fromhex(digits), charset)
    if body.startswith(("Z", "C", "M")):
        return "" if _LOCAL_ESCAPE.fullmatch(body) else None
    if body.startswith("."):
        command, _, argument = body[1:].partition(" ")
        command = command.strip()
        count = _count(argument.strip() or command[2:])
        if command in ("br", "ce"):
            return "\n"
        if command.startswith("sp"):
            return "\n" * count
        if command.startswith("sk"):
            return " " * count
        if command.startswith(("in", "ti", "fi", "nf")):
            return ""
    return None


def _count(text: str) -> int:
    """The *n* of a formatting command: ASCII digits (``str.isdigit`` also takes "¹"),
    1 when there are none, at most :data:`MAX_COUNT`."""
    text = text.lstrip("+")
    return min(int(text), MAX_COUNT) if text.isascii() and text.isdigit() else 1
