"""A strict structural check of an encoded data set, before anything is acknowledged.

pydicom reads tolerantly: a value cut short is returned shorter, trailing garbage becomes
an odd element.  For an archive that is the right choice; for a gateway that answers
"stored" it is not, so every element header is walked here (values are skipped, never
decoded) and any length that runs past its container is a :class:`MalformedInput`.
"""

from __future__ import annotations

import struct
import zlib

from gateway.errors import MalformedInput

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")  # deflated explicit / image

_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQ_END = 0xFFFEE0DD
MAX_DEPTH = 64


Buffer = bytes | memoryview


class _Walker:
    def __init__(self, data: Buffer, *, implicit: bool, big_endian: bool) -> None:
        self.data = data
        self.implicit = implicit
        e = ">" if big_endian else "<"
        self.u16 = struct.Struct(e + "H")
        self.u32 = struct.Struct(e + "I")
        self.tag_fmt = struct.Struct(e + "HH")

    def _fail(self, offset: int, what: str) -> MalformedInput:
        return MalformedInput(f"malformed data set at byte {offset}: {what}")

    def _tag(self, pos: int, end: int) -> int:  # (group << 16) | element
        if pos + 8 > end:
            raise self._fail(pos, "truncated element header")
        group: int
        elem: int
        group, elem = self.tag_fmt.unpack_from(self.data, pos)
        return (group << 16) | elem

    def dataset(self, pos: int, end: int, depth: int, *, until_item_end: bool) -> int:
        """Walk elements from *pos*; return the position after the data set."""
        if depth > MAX_DEPTH:
            raise self._fail(pos, "sequences nested too deeply")
        while pos < end:
            tag = self._tag(pos, end)
            if tag == ITEM_END:
                if not until_item_end:
                    raise self._fail(pos, "item delimiter outside an item")
                return pos + 8
            if tag in (ITEM, SEQ_END):
                raise self._fail(pos, f"unexpected item tag ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            pos = self.element(pos, end, tag, depth)
        if until_item_end:
            raise self._fail(pos, "item without its delimiter")
        return pos

    def element(self, pos: int, end: int, tag: int, depth: int) -> int:
        length: int
        if self.implicit:
            length = self.u32.unpack_from(self.data, pos + 4)[0]
            vr = b"SQ" if length == UNDEFINED else b""
            pos += 8
        else:
            vr = bytes(self.data[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise self._fail(pos, "truncated element header")
                length = self.u32.unpack_from(self.data, pos + 8)[0]
                pos += 12
            else:
                if not (vr.isalpha() and vr.isupper()):
                    raise self._fail(pos, f"invalid VR {vr!r}")
                length = self.u16.unpack_from(self.data, pos + 6)[0]
                pos += 8
        if length != UNDEFINED:
            if pos + length > end:
                raise self._fail(
                    pos,
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes, "
                    f"{end - pos} remain",
                )
            if vr == b"SQ":
                self.sequence(pos, pos + length, depth, defined=True)
            return pos + length
        if tag == 0x7FE00010 or vr in (b"OB", b"OW"):
            return self.fragments(pos, end)
        if vr == b"SQ":
            return self.sequence(pos, end, depth, defined=False)
        if vr == b"UN":  # PS3.5 6.2.2: its items are encoded in implicit VR little endian
            return _Walker(self.data, implicit=True, big_endian=False).sequence(
                pos, end, depth, defined=False
            )
        raise self._fail(pos, f"undefined length on VR {vr.decode(errors='replace')}")

    def sequence(self, pos: int, end: int, depth: int, *, defined: bool) -> int:
        while pos < end:
            tag = self._tag(pos, end)
            length = self.u32.unpack_from(self.data, pos + 4)[0]
            if tag == SEQ_END:
                if defined:
                    raise self._fail(pos, "sequence delimiter in a defined-length sequence")
                return pos + 8
            if tag != ITEM:
                raise self._fail(pos, "expected an item in a sequence")
            pos += 8
            if length == UNDEFINED:
                pos = self.dataset(pos, end, depth + 1, until_item_end=True)
            else:
                if pos + length > end:
                    raise self._fail(pos, "item runs past its sequence")
                self.dataset(pos, pos + length, depth + 1, until_item_end=False)
                pos += length
        if not defined:
            raise self._fail(pos, "sequence without its delimiter")
        return pos

    def fragments(self, pos: int, end: int) -> int:
        while pos < end:
            tag = self._tag(pos, end)
            length = self.u32.unpack_from(self.data, pos + 4)[0]
            pos += 8
            if tag == SEQ_END:
                return pos
            if tag != ITEM or length == UNDEFINED or pos + length > end:
                raise self._fail(pos - 8, "broken encapsulated pixel data fragment")
            pos += length
        raise self._fail(pos, "encapsulated pixel data without its delimiter")


def check_dataset(data: Buffer, transfer_syntax: str) -> None:
    """Raise :class:`MalformedInput` unless *data* (a data set without file meta) is a
    well-formed sequence of elements in *transfer_syntax*."""
    if transfer_syntax in DEFLATED:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)  # whole: deflate is rare
        except zlib.error as exc:
            raise MalformedInput(f"deflated data set does not inflate: {exc}") from None
    walker = _Walker(
        data, implicit=transfer_syntax == IMPLICIT_LE, big_endian=transfer_syntax == EXPLICIT_BE
    )
    try:
        walker.dataset(0, len(data), 0, until_item_end=False)
    except struct.error:
        raise MalformedInput("malformed data set: truncated element") from None


def dataset_offset(part10: Buffer) -> int:
    """Where the data set starts in Part 10 bytes: after preamble, 'DICM' and the file meta
    group, whose length the (0002,0000) element gives."""
    if bytes(part10[128:132]) != b"DICM" or bytes(part10[132:136]) != b"\x02\x00\x00\x00":
        raise MalformedInput("not a DICOM file: no DICM prefix or group length")
    (group_length,) = struct.unpack_from("<I", part10, 140)
    return 144 + int(group_length)
