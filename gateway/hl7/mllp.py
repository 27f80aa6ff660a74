"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol): bytes in, bytes out, no HL7 parsing.

A frame is ``0x0B`` + payload + ``0x1C 0x0D``.  CR / LF between frames is tolerated (some
senders end frames with ``0x1C 0x0D 0x0A``); anything else there is a framing error, after
which the connection cannot be trusted and is closed by the caller.
"""

from __future__ import annotations

import asyncio

from gateway.errors import MalformedInput

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
_BETWEEN_FRAMES = frozenset(b"\r\n")


class FramingError(MalformedInput):
    """The byte stream is not valid MLLP; the connection must be closed."""


def frame(payload: bytes) -> bytes:
    """Wrap one message in MLLP start and end blocks."""
    return START_BLOCK + payload + END_BLOCK


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes | None:
    """Read the next frame's payload; ``None`` on a clean end of stream between frames.

    Raises :class:`FramingError` for bytes other than CR/LF before the start block, a
    payload longer than *max_bytes*, a start or end block character inside the payload
    (a lost end block), or an end of stream inside a frame.  Works with any reader
    ``limit``: a frame longer than the limit is read in pieces.
    """
    while True:
        try:
            first = await reader.readexactly(1)
        except asyncio.IncompleteReadError:
            return None
        if first == START_BLOCK:
            break
        if first[0] not in _BETWEEN_FRAMES:
            raise FramingError(f"expected the MLLP start block 0x0B, received 0x{first[0]:02X}")
    pieces: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await reader.readuntil(END_BLOCK)
        except asyncio.IncompleteReadError as exc:
            got = size + len(exc.partial)
            if got > max_bytes:
                raise _too_big(max_bytes) from None
            raise FramingError(
                f"connection closed inside an MLLP frame after {got} bytes"
            ) from None
        except asyncio.LimitOverrunError as exc:
            # No end block within the reader's limit: take what is safe and keep reading.
            if size + exc.consumed > max_bytes:
                raise _too_big(max_bytes) from None
            piece = await reader.readexactly(exc.consumed)
            pieces.append(piece)
            size += len(piece)
            continue
        if size + len(chunk) - len(END_BLOCK) > max_bytes:
            raise _too_big(max_bytes)
        pieces.append(chunk)
        break
    payload = (pieces[0] if len(pieces) == 1 else b"".join(pieces))[: -len(END_BLOCK)]
    if START_BLOCK in payload or b"\x1c" in payload:
        raise FramingError(
            "an MLLP start or end block character inside a frame (a lost end block?)"
        )
    return payload


def _too_big(max_bytes: int) -> FramingError:
    return FramingError(f"MLLP frame larger than the {max_bytes}-byte limit (hl7.max_frame_bytes)")
