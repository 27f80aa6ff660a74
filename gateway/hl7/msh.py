"""A fast, tolerant reader of the MSH segment: what the ACK path needs and nothing more.

Full HL7 parsing (hl7apy) costs milliseconds per message and belongs to later stages;
the MLLP edge only needs the separators, the sender, the message type, the control id
and the version to decide and build its ACK.  The bytes are decoded as latin-1 (a lossless
byte-to-character mapping) for reading; the stored message stays exactly as received.

Field numbering follows the standard: MSH-1 is the field separator itself, MSH-2 the
encoding characters, so splitting the segment on the field separator gives
``parts[n] == MSH-(n+1)`` for ``n >= 1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import MalformedInput

SUPPORTED_VERSIONS = frozenset(
    {"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"}
)

# HL7 table 0357 (message error condition codes) used by the edge.
ERR_SEGMENT_SEQUENCE = 100
ERR_REQUIRED_FIELD_MISSING = 101
ERR_DATA_TYPE = 102
ERR_UNSUPPORTED_MESSAGE_TYPE = 200
ERR_UNSUPPORTED_VERSION = 203
ERR_APPLICATION_INTERNAL = 207

_SEGMENT_SPLIT = re.compile(r"\r\n|\r|\n")
_MESSAGE_CODE = re.compile(r"[A-Za-z0-9]{3}")
_ESCAPES = {"F": 0, "S": 1, "R": 2, "E": 3, "T": 4, "P": 5}  # index into the separator string


@dataclass(frozen=True)
class Header:
    """The MSH fields the edge uses.  Values are unescaped; absent fields are ``""``.

    Application and facility values are the first component of the HD field.
    ``message_type`` is normalised to ``CODE^TRIGGER`` (``^`` whatever the component
    separator), the form routes match on.
    """

    field_sep: str = "|"
    encoding_chars: str = "^~\\&"
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_code: str = ""
    trigger: str = ""
    structure: str = ""
    control_id: str = ""
    processing_id: str = ""
    version: str = ""
    accept_ack_type: str = ""
    app_ack_type: str = ""
    charset: str = ""
    segment_ids: tuple[str, ...] = ()

    @property
    def component_sep(self) -> str:
        return self.encoding_chars[0]

    @property
    def repetition_sep(self) -> str:
        return self.encoding_chars[1]

    @property
    def escape_char(self) -> str:
        return self.encoding_chars[2]

    @property
    def subcomponent_sep(self) -> str:
        return self.encoding_chars[3]

    @property
    def truncation_char(self) -> str:
        """The v2.7+ truncation character (fifth encoding character), or ``""``."""
        return self.encoding_chars[4] if len(self.encoding_chars) > 4 else ""

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger}" if self.trigger else self.message_code

    @property
    def enhanced_mode(self) -> bool:
        """Enhanced acknowledgement mode: MSH-15 (accept ACK type) is valued."""
        return bool(self.accept_ack_type)


class HeaderError(MalformedInput):
    """The MSH segment cannot be read, or names something the gateway does not accept.

    ``code`` is the HL7 table 0357 error code for the ERR segment, ``location`` the
    (segment, sequence, field) it concerns, and ``partial`` what could be read of the
    header (separators, control id, ...) so that the refusal still echoes them.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int = ERR_SEGMENT_SEQUENCE,
        location: tuple[str, int, int] | None = None,
        partial: Header | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.location = location
        self.partial = partial


def unescape(value: str, seps: str) -> str:
    """Undo the separator escapes (\\F\\ \\S\\ \\R\\ \\E\\ \\T\\ \\P\\); others stay as they are.

    *seps* is MSH-1 followed by MSH-2 (so the escape character is ``seps[3]``).
    """
    esc = seps[3]
    if esc not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch == esc and i + 2 < n and value[i + 2] == esc and value[i + 1] in _ESCAPES:
            index = _ESCAPES[value[i + 1]]
            if index < len(seps):
                out.append(seps[index])
                i += 3
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def parse_header(data: bytes) -> Header:
    """Read the MSH segment of one HL7 v2 message.

    Raises :class:`HeaderError` when the message does not start with MSH, the separators
    are unusable, MSH-9 / MSH-10 / MSH-12 is missing, or the version is not supported.
    """
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark some senders prepend
        data = data[3:]
    start = data.decode("latin-1").lstrip("\r\n")
    if not start.startswith("MSH"):
        shown = "an empty message" if not start else "a segment other than MSH"
        raise HeaderError(
            f"the message must start with an MSH segment, found {shown}",
            code=ERR_SEGMENT_SEQUENCE,
            location=("MSH", 1, 0),
        )
    segments = [s for s in _SEGMENT_SPLIT.split(start) if s]
    msh = segments[0]
    if len(msh) < 8:
        raise HeaderError(
            "the MSH segment is too short to hold its separators",
            code=ERR_DATA_TYPE,
            location=("MSH", 1, 2),
        )
    field_sep = msh[3]
    parts = msh.split(field_sep)
    encoding = parts[1] if len(parts) > 1 else ""
    _check_separators(field_sep, encoding)
    seps = field_sep + encoding  # in the order _ESCAPES indexes: F S R E T (P)

    def field(number: int) -> str:
        index = number - 1
        return parts[index] if index < len(parts) else ""

    def first(value: str) -> str:
        return unescape(value.split(encoding[0], 1)[0], seps)

    msg_type = field(9).split(encoding[1], 1)[0].split(encoding[0])
    seg_ids = tuple(s.split(field_sep, 1)[0] for s in segments)
    header = Header(
        field_sep=field_sep,
        encoding_chars=encoding,
        sending_application=first(field(3)),
        sending_facility=first(field(4)),
        receiving_application=first(field(5)),
        receiving_facility=first(field(6)),
        message_code=unescape(msg_type[0], seps),
        trigger=unescape(msg_type[1], seps) if len(msg_type) > 1 else "",
        structure=unescape(msg_type[2], seps) if len(msg_type) > 2 else "",
        control_id=unescape(field(10), seps),
        processing_id=first(field(11)),
        version=first(field(12)),
        accept_ack_type=first(field(15)),
        app_ack_type=first(field(16)),
        charset=first(field(18).split(encoding[1], 1)[0]),
        segment_ids=seg_ids,
    )
    if not header.message_code:
        raise HeaderError(
            "MSH-9 (message type) is missing",
            code=ERR_REQUIRED_FIELD_MISSING,
            location=("MSH", 1, 9),
            partial=header,
        )
    if not _MESSAGE_CODE.fullmatch(header.message_code):
        raise HeaderError(
            "MSH-9 (message type) must start with a three-character message code",
            code=ERR_UNSUPPORTED_MESSAGE_TYPE,
            location=("MSH", 1, 9),
            partial=header,
        )
    if not header.control_id:
        raise HeaderError(
            "MSH-10 (message control id) is missing",
            code=ERR_REQUIRED_FIELD_MISSING,
            location=("MSH", 1, 10),
            partial=header,
        )
    if not header.version:
        raise HeaderError(
            "MSH-12 (version id) is missing",
            code=ERR_REQUIRED_FIELD_MISSING,
            location=("MSH", 1, 12),
            partial=header,
        )
    if header.version not in SUPPORTED_VERSIONS:
        raise HeaderError(
            f"unsupported HL7 version '{header.version[:10]}'; supported: 2.3 to 2.8.2",
            code=ERR_UNSUPPORTED_VERSION,
            location=("MSH", 1, 12),
            partial=header,
        )
    return header


def _check_separators(field_sep: str, encoding: str) -> None:
    problem = ""
    if field_sep.isalnum() or field_sep in "\r\n" or field_sep.isspace():
        problem = f"MSH-1 field separator {field_sep!r} is not usable"
    elif len(encoding) not in (4, 5):
        problem = (
            f"MSH-2 must hold 4 encoding characters (5 with the truncation character), "
            f"found {len(encoding)}"
        )
    elif len(set(encoding + field_sep)) != len(encoding) + 1:
        problem = "MSH-1/MSH-2 separators must all be different"
    elif any(c.isalnum() or c.isspace() for c in encoding):
        problem = "MSH-2 encoding characters must not be letters, digits or white space"
    if problem:
        raise HeaderError(problem, code=ERR_DATA_TYPE, location=("MSH", 1, 2))
