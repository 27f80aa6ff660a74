"""MLLP framing on an in-memory stream."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import Permanent
from gateway.hl7.mllp import FramingError, frame, read_frame

MSG = b"MSH|^~\\&|EHR|HOSP|||2024||ORU^R01|C1|P|2.5\rPID|1\r"


def read_all(chunks: list[bytes], *, max_bytes: int = 1 << 20, limit: int = 2**16) -> list[bytes]:
    """Feed *chunks* then EOF and read frames until the clean end of stream."""

    async def go() -> list[bytes]:
        reader = asyncio.StreamReader(limit=limit)
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        frames: list[bytes] = []
        while (payload := await read_frame(reader, max_bytes)) is not None:
            frames.append(payload)
        return frames

    return asyncio.run(go())


def test_frame_wraps_the_payload_in_start_and_end_blocks() -> None:
    assert frame(b"abc") == b"\x0babc\x1c\x0d"


def test_reads_back_what_frame_wrote() -> None:
    assert read_all([frame(MSG)]) == [MSG]


def test_clean_end_of_stream_between_frames_is_none() -> None:
    assert read_all([]) == []
    assert read_all([frame(MSG), b"\r\n"]) == [MSG]


def test_several_frames_with_line_breaks_between_them() -> None:
    data = frame(b"one") + b"\n" + frame(b"two") + b"\r\n\r\n" + frame(b"three")
    assert read_all([data]) == [b"one", b"two", b"three"]


def test_frames_split_across_reads_at_any_byte() -> None:
    data = frame(MSG) + frame(b"second")
    for cut in range(1, len(data)):
        assert read_all([data[:cut], data[cut:]]) == [MSG, b"second"]


def test_a_frame_longer_than_the_reader_limit_is_read_in_pieces() -> None:
    big = b"MSH|" + b"x" * 100_000
    data = frame(big)
    chunks = [data[i : i + 777] for i in range(0, len(data), 777)]
    assert read_all(chunks, limit=1024) == [big]


def test_an_empty_frame_is_an_empty_payload() -> None:
    assert read_all([frame(b"")]) == [b""]


def test_garbage_before_the_start_block_is_a_framing_error() -> None:
    with pytest.raises(FramingError, match="start block 0x0B, received 0x47"):
        read_all([b"GET / HTTP/1.1\r\n"])
    with pytest.raises(FramingError):
        read_all([frame(MSG) + b"junk" + frame(MSG)])


def test_end_of_stream_inside_a_frame_is_a_framing_error() -> None:
    with pytest.raises(FramingError, match="closed inside an MLLP frame after 5 bytes"):
        read_all([b"\x0bhello"])
    with pytest.raises(FramingError):
        read_all([b"\x0bhello\x1c"])


@pytest.mark.parametrize("limit", [64, 2**16])
def test_a_frame_over_max_bytes_is_a_framing_error(limit: int) -> None:
    assert read_all([frame(b"x" * 1000)], max_bytes=1000, limit=limit) == [b"x" * 1000]
    with pytest.raises(FramingError, match="larger than the 1000-byte limit"):
        read_all([frame(b"x" * 1001)], max_bytes=1000, limit=limit)
    with pytest.raises(FramingError, match="larger than"):
        read_all([b"\x0b" + b"x" * 5000], max_bytes=1000, limit=limit)  # no end block at all


def test_a_lost_end_block_is_a_framing_error_not_two_messages_in_one() -> None:
    with pytest.raises(FramingError, match="inside a frame"):
        read_all([b"\x0bfirst" + frame(b"second")])
    with pytest.raises(FramingError, match="inside a frame"):
        read_all([b"\x0bfirst\x1csecond\x1c\x0d"])


def test_framing_errors_are_permanent() -> None:
    assert issubclass(FramingError, Permanent)
