"""Fuzz target: a byte stream into the MLLP frame reader (:func:`gateway.hl7.mllp.read_frame`).

Input: one byte that picks the reader's buffer limit and the frame size limit
(``hl7.max_frame_bytes``), one byte that picks the size of the pieces the stream arrives
in, then the stream.  ``read_frame`` is called until the stream ends or it raises
:class:`~gateway.hl7.mllp.FramingError` (the connection is then closed).

Oracle: a reference reader of the framing rule, written out plainly here: frames are
``0x0B`` + payload + ``0x1C 0x0D``, only CR / LF between them, no ``0x0B`` or ``0x1C`` in a
payload, a payload at most the size limit.  ``read_frame`` must return the same payloads and
stop with an error where the reference does: a payload the reference refuses is a success
response to invalid input; any other difference (a frame lost or refused wrongly) is a
crash.
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.hl7.mllp import FramingError, read_frame
from tests.fuzz import AcceptedInvalid

_LIMITS = (1, 2, 3, 5, 8, 64, 1024, 2**16)  # StreamReader limit
_MAX_BYTES = (0, 1, 2, 7, 16, 100, 1024, 10**6)  # frame size limit
_PIECES = (1, 2, 3, 7, 64, 4096, 2**20, 2**20)  # arrival chunk size

_LOOP = asyncio.new_event_loop()


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    limit = _LIMITS[data[0] & 7]
    max_bytes = _MAX_BYTES[(data[0] >> 3) & 7]
    piece = _PIECES[data[1] & 7]
    stream = data[2:]
    got, error = _LOOP.run_until_complete(_read_all(stream, limit, max_bytes, piece))
    want, refused = reference(stream, max_bytes)
    for i, payload in enumerate(got):
        if i >= len(want) or payload != want[i]:
            if i >= len(want) and refused:
                raise AcceptedInvalid(
                    f"read_frame returned frame {i} ({payload[:40]!r}), the reference refuses "
                    "the stream there"
                )
            raise AssertionError(
                f"frame {i}: read_frame {payload[:40]!r}, reference {want[i : i + 1]}"
            )
    if len(got) < len(want):
        raise AssertionError(
            f"read_frame stopped after {len(got)} frames ({error}), reference {len(want)}"
        )
    if refused != (error is not None):
        raise AssertionError(f"read_frame error {error!r}, reference refuses: {refused}")


async def _read_all(
    stream: bytes, limit: int, max_bytes: int, piece: int
) -> tuple[list[bytes], str | None]:
    reader = asyncio.StreamReader(limit=limit)

    async def feed() -> None:
        for start in range(0, len(stream), piece):
            reader.feed_data(stream[start : start + piece])
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.ensure_future(feed())
    frames: list[bytes] = []
    error = None
    try:
        while (payload := await read_frame(reader, max_bytes)) is not None:
            frames.append(payload)
    except FramingError as exc:
        error = exc.message
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
    return frames, error


def reference(stream: bytes, max_bytes: int) -> tuple[list[bytes], bool]:
    """The payloads of *stream* up to its first framing error, and whether there is one."""
    frames: list[bytes] = []
    pos = 0
    while True:
        while pos < len(stream) and stream[pos] in b"\r\n":
            pos += 1
        if pos == len(stream):
            return frames, False
        if stream[pos] != 0x0B:
            return frames, True
        end = stream.find(b"\x1c\r", pos + 1)
        if end < 0:
            return frames, True
        payload = stream[pos + 1 : end]
        if len(payload) > max_bytes or b"\x0b" in payload or b"\x1c" in payload:
            return frames, True
        frames.append(payload)
        pos = end + 2
