"""A fast, tolerant reader of the MSH segment: what the ACK path needs and nothing more.

Full HL7 parsing (hl7apy) costs milliseconds per message and belongs to later stages;
the MLLP edge only needs the separators, the sender, the message type, the control id
and the version to decide and build its ACK.  The bytes are decoded as latin-1 (a lossless
byte-to-character mapping) for reading; the stored message stays exactly as received.

Framing, the separator rule, segment splitting, field numbering (MSH-1 is the field
separator) and escape decoding (the separator escapes only) are those of the one HL7
reader, :mod:`gateway.hl7.message`; only the character set differs (latin-1 here, so
that the ACK echoes the sender's bytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import MalformedInput
from gateway.hl7.message import (
    Separators,
    segment_fields,
    split_segments,
    strip_framing,
    unescape,
)

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

_MESSAGE_CODE = re.compile(r"[A-Za-z0-9]{3}")


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
    def separators(self) -> Separators:
        enc = self.encoding_chars
        return Separators(self.field_sep, enc[0], enc[1], enc[2], enc[3], enc[4:])

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


def parse_header(data: bytes) -> Header:
    """Read the MSH segment of one HL7 v2 message.

    Raises :class:`HeaderError` when the message does not start with MSH, the separators
    are unusable, the MSH segment runs on past its line (the next line does not start a
    segment: the reader would take it as the continuation of MSH, other readers as a broken
    segment), MSH-9 / MSH-10 / MSH-12 is missing, or the version is not supported.
    """
    text = strip_framing(data).decode("latin-1")
    if not text.startswith("MSH"):
        shown = "an empty message" if not text else "a segment other than MSH"
        raise HeaderError(
            f"the message must start with an MSH segment, found {shown}",
            code=ERR_SEGMENT_SEQUENCE,
            location=("MSH", 1, 0),
        )
    try:
        seps = Separators.from_msh(text)
    except MalformedInput as exc:
        raise HeaderError(exc.message, code=ERR_DATA_TYPE, location=("MSH", 1, 2)) from None
    segments = split_segments(text, seps.field)
    msh, _, continued = segments[0].partition("\n")
    parts = segment_fields(msh, seps)  # MSH-1 and MSH-2 are read from this line too

    def field(number: int) -> str:
        return parts[number] if number < len(parts) else ""

    def plain(value: str) -> str:
        return unescape(value, seps, formatting=False)

    def first(value: str) -> str:
        return plain(value.split(seps.component, 1)[0])

    msg_type = field(9).split(seps.repetition, 1)[0].split(seps.component)
    header = Header(
        field_sep=seps.field,
        encoding_chars=seps.encoding,
        sending_application=first(field(3)),
        sending_facility=first(field(4)),
        receiving_application=first(field(5)),
        receiving_facility=first(field(6)),
        message_code=plain(msg_type[0]),
        trigger=plain(msg_type[1]) if len(msg_type) > 1 else "",
        structure=plain(msg_type[2]) if len(msg_type) > 2 else "",
        control_id=plain(field(10)),
        processing_id=first(field(11)),
        version=first(field(12)),
        accept_ack_type=first(field(15)),
        app_ack_type=first(field(16)),
        charset=first(field(18).split(seps.repetition, 1)[0]),
        segment_ids=tuple(segment[:3] for segment in segments),
    )
    if continued:
        raise HeaderError(
            "the line after MSH does not start a segment, so it would continue the MSH "
            "segment: segments end with a carriage return",
            code=ERR_SEGMENT_SEQUENCE,
            location=("MSH", 1, 0),
            partial=header,
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
