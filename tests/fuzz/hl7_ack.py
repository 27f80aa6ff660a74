"""Fuzz target: the MLLP edge's decision, its MSH reader and the ACK builder.

Input: one frame's payload as ``read_frame`` hands it over (the start and end block
characters cannot be in it, so they are dropped).  ``parse_header`` reads the MSH segment
(:mod:`gateway.hl7.msh`) and returns a header, which the listener acknowledges with AA (or
CA), or raises :class:`~gateway.hl7.msh.HeaderError` with what it could read, which is
answered AR (CR).  Every ACK the listener can build for it (:func:`gateway.hl7.ack.
build_ack`: success, store failure, refusal) is built and read back.

Oracles:

- a header is returned only for an MSH the rule accepts, written out plainly here: the
  separators rule (:func:`tests.fuzz.hl7_message.separator_problem`), the MSH segment on
  one line (the next line starts a segment), MSH-9 starting with a three-character message
  code, MSH-10 and MSH-12 valued, MSH-12 a supported version;
  a header for another is a success response to invalid input, and a refusal of a valid
  one a crash;
- each ACK is one MLLP-safe message (no 0x0B / 0x1C) of MSH, MSA and, for an error, ERR;
  the edge's own MSH reader accepts it; it keeps the message's separators; MSH-7 reads as
  the time it was built; MSA-1 is the code and MSA-2 echoes MSH-10; the sender and
  receiver are swapped;
- escaping a value for an ACK and unescaping it gives the value back (line breaks become
  spaces).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from gateway.hl7.ack import COMMIT_CODE, OUR_APPLICATION, build_ack, escape
from gateway.hl7.message import Message, Separators, segment_fields, unescape
from gateway.hl7.msh import (
    ERR_APPLICATION_INTERNAL,
    SUPPORTED_VERSIONS,
    Header,
    HeaderError,
    parse_header,
)
from tests.fuzz import AcceptedInvalid
from tests.fuzz.hl7_message import separator_problem

_NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_STAMP = "20260102030405+0000"  # MSH-7 of the ACKs
_FRAMING = b"\x0b\x1c\x00 \t\r\n"
_PADDING = "\x00 \t"
_LINES = re.compile(r"\r\n|\r|\n")
_CODE = re.compile(r"[A-Za-z0-9]{3}")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")


def TestOneInput(data: bytes) -> None:
    payload = data.replace(b"\x0b", b"").replace(b"\x1c", b"")
    header: Header | None
    try:
        header = parse_header(payload)
        refused = None
    except HeaderError as exc:
        header, refused = exc.partial, exc
    problem = msh_problem(payload)
    if refused is None and problem is not None:
        raise AcceptedInvalid(f"parse_header accepted an MSH that is not valid: {problem}")
    if refused is not None and problem is None:
        raise AssertionError(f"parse_header refused a valid MSH: {refused.message}")
    enhanced = header is not None and header.enhanced_mode
    codes = ("AR",) if refused is not None else ("AA", "AE")
    for original in codes:
        code = COMMIT_CODE[original] if enhanced else original
        ack = build_ack(
            header,
            code,
            control_id="0123456789abcdef0123",
            text=refused.message if refused is not None else "",
            error_code=refused.code if refused is not None else ERR_APPLICATION_INTERNAL,
            error_location=refused.location if refused is not None else None,
            now=_NOW,
        )
        _check_ack(ack, header, code)
    seps = header.separators if header is not None else Separators()
    _check_round_trip(payload.decode("latin-1"), seps)


def msh_problem(payload: bytes) -> str | None:
    """Why the MSH of *payload* is not one the edge accepts; None when it is."""
    data = payload.strip(_FRAMING)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:].lstrip(_FRAMING)
    text = data.decode("latin-1")
    problem = separator_problem(text)
    if problem is not None:
        return problem
    lines = _LINES.split(text)
    first, fs = lines[0], lines[0][3]
    following = [line for line in lines[1:] if line and not line.isspace()]
    if following and not (_SEGMENT_ID.match(following[0]) and following[0][3:4] in (fs, "")):
        return "the line after MSH does not start a segment"
    seps = _separators(first)
    fields = ["MSH", fs, *first[4:].split(fs)]  # fields[n] is MSH-n

    def at(n: int) -> str:
        return fields[n] if n < len(fields) else ""

    def first_component(value: str) -> str:
        return _unescape(value.split(seps.component, 1)[0], seps)

    code = _unescape(at(9).split(seps.repetition, 1)[0].split(seps.component, 1)[0], seps)
    if not code:
        return "MSH-9 is empty"
    if not _CODE.fullmatch(code):
        return f"MSH-9 {code!r} is not a three-character code"
    if not at(10):
        return "MSH-10 is empty"
    version = first_component(at(12))
    if version not in SUPPORTED_VERSIONS:
        return f"MSH-12 {version!r} is not a supported version"
    return None


def _separators(first: str) -> Separators:
    enc = first[4:].split(first[3], 1)[0]
    return Separators(first[3], enc[0], enc[1], enc[2], enc[3], enc[4:])


def _unescape(value: str, seps: Separators) -> str:
    """The separator escapes only, left to right (what the edge decodes)."""
    names = {
        "F": seps.field,
        "S": seps.component,
        "T": seps.subcomponent,
        "R": seps.repetition,
        "E": seps.escape,
    }
    if seps.truncation:
        names["P"] = seps.truncation
    esc = seps.escape
    out, i = [], 0
    while i < len(value):
        if value[i] == esc and i + 2 < len(value) and value[i + 2] == esc and value[i + 1] in names:
            out.append(names[value[i + 1]])
            i += 3
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _flat(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


def _check_ack(ack: bytes, header: Header | None, code: str) -> None:
    assert b"\x0b" not in ack and b"\x1c" not in ack, ack
    assert ack.endswith(b"\r"), ack[-10:]
    text = ack.decode("latin-1")
    segments = text[:-1].split("\r")
    error = code not in ("AA", "CA")
    assert [s[:3] for s in segments] == ["MSH", "MSA", "ERR"][: 3 if error else 2], segments
    read = parse_header(ack)  # the edge's own reader accepts the ACK
    h = header or Header()
    assert (read.field_sep, read.encoding_chars) == (h.field_sep, h.encoding_chars), read
    assert read.sending_application == _flat(h.receiving_application or OUR_APPLICATION)
    assert read.sending_facility == _flat(h.receiving_facility)
    assert read.receiving_application == _flat(h.sending_application)
    assert read.receiving_facility == _flat(h.sending_facility)
    message = Message.parse(text)  # as the edge reads: one byte, one character
    msh = segment_fields(message.segments[0], message.separators)
    seps = message.separators
    stamp = msh[7].split(seps.repetition)[0].split(seps.component)[0].split(seps.subcomponent)[0]
    assert unescape(stamp, seps, formatting=False) == _STAMP, msh[7]
    msa = segment_fields(message.segments[1], message.separators)
    assert msa[1] == code, msa
    echoed = unescape(msa[2] if len(msa) > 2 else "", message.separators, formatting=False)
    # a reader strips NUL and blanks around a message: the end of MSA-2 when MSA ends it
    assert echoed.rstrip(_PADDING) == _flat(h.control_id).rstrip(_PADDING), (echoed, h)


def _check_round_trip(value: str, seps: Separators) -> None:
    escaped = escape(value, seps.field, seps.encoding)
    for formatting in (False, True):
        back = unescape(escaped, seps, formatting=formatting)
        assert back == _flat(value), (value[:60], escaped[:60], back[:60], formatting)
