"""Fuzz target: the one HL7 v2 reader (:mod:`gateway.hl7.message`).

Input: a message (or a file of messages) as bytes.  It is read as received
(``Message.parse`` on bytes) and as text; every field of every segment is split and
unescaped, with and without the formatting commands; the file helpers (``hl7_in``,
``split_messages``) and the decoder run on it too.  Each returns, or ``Message.parse``
raises :class:`~gateway.errors.MalformedInput`.

Oracle: a message that parses has separators that keep the rule (written out plainly here:
MSH, then a field separator and 4 or 5 encoding characters, none a letter, digit or white
space, all different), found where MSH-1 and MSH-2 are; its segments are the message's
non-blank lines, MSH first; a value without the escape character unescapes to itself, and
none grows more than 16 times (``\\.sp n\\`` is bounded); the
messages ``split_messages`` returns each start with MSH (but the first) and end with CR.
"""

from __future__ import annotations

import re

from gateway.errors import MalformedInput
from gateway.hl7.message import (
    _CHARSETS,
    Message,
    Separators,
    decode,
    hl7_in,
    segment_fields,
    split_messages,
    strip_framing,
    unescape,
)
from tests.fuzz import AcceptedInvalid

_LINES = re.compile(r"\r\n|\r|\n")


def TestOneInput(data: bytes) -> None:
    for source in (data, data.decode("utf-8", errors="replace")):
        try:
            message = Message.parse(source)
        except MalformedInput:
            continue
        if isinstance(source, bytes):
            text = decode(strip_framing(source), message.charset)
        else:
            text = source.strip("\x0b\x1c\x00 \t\r\n").removeprefix("\ufeff")
            text = text.lstrip("\x0b\x1c\x00 \t\r\n")
        _check(message, text)
    found = hl7_in(data)
    assert found is None or found[:3] in (b"MSH", b"FHS", b"BHS"), found[:10]
    for i, part in enumerate(split_messages(data)):
        assert part.endswith(b"\r"), part[-10:]
        assert i == 0 or part.startswith(b"MSH"), part[:10]
        assert b"\x0b" not in part and b"\x1c" not in part
    for codec in {"", *_CHARSETS.values()}:
        decode(data, codec)


def _check(message: Message, text: str) -> None:
    seps = message.separators
    problem = separator_problem(text)
    if problem is not None:
        raise AcceptedInvalid(f"Message.parse accepted separators {seps}: {problem}")
    first = _LINES.split(text, maxsplit=1)[0]
    declared = first[3] + first[4:].split(first[3], 1)[0]
    assert seps.field + seps.encoding == declared, (seps, declared)
    lines = [line for line in _LINES.split(text) if line and not line.isspace()]
    assert message.segments[0].startswith("MSH"), message.segments[0][:10]
    assert "\n".join(message.segments) == "\n".join(lines), "segments are not the lines"
    for segment in message.segments:
        for value in _values(segment_fields(segment, seps), seps):
            for formatting in (True, False):
                decoded = unescape(value, seps, message.charset, formatting=formatting)
                if seps.escape not in value:
                    assert decoded == value, (value, decoded)
                assert len(decoded) <= 16 * len(value), f"{value[:40]!r} grows {len(decoded)}"


def _values(fields: list[str], seps: Separators) -> list[str]:
    """Every field, repetition, component and subcomponent of a segment's fields."""
    out = []
    for field in fields:
        out.append(field)
        for repetition in field.split(seps.repetition):
            for component in repetition.split(seps.component):
                out.extend(component.split(seps.subcomponent))
    return out


def separator_problem(text: str) -> str | None:
    """Why MSH-1 / MSH-2 at the start of *text* are not usable; None when they are."""
    first = _LINES.split(text, maxsplit=1)[0]
    if not first.startswith("MSH") or len(first) < 8:
        return "no MSH segment long enough to hold the separators"
    field = first[3]
    encoding = first[4:].split(field, 1)[0]
    chars = field + encoding
    if len(encoding) not in (4, 5):
        return f"MSH-2 has {len(encoding)} characters"
    if any(c.isalnum() or c.isspace() for c in chars):
        return "a separator is a letter, digit or white space"
    if len(set(chars)) != len(chars):
        return "two separators are the same character"
    return None
