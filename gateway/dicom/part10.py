"""The Part-10 walker: where a file's data set starts, in which transfer syntax, and
whether that data set is well formed, found by walking element headers (values are
skipped, never decoded).

- :func:`is_part10`: the 128-byte preamble and ``DICM``.
- :func:`read_file_meta`: the file meta group (0002) walked element by element, as pydicom
  and pynetdicom read it, so the data set offset is right whether the (0002,0000) group
  length is there, missing or wrong; it also gives the transfer syntax and the media
  storage SOP class and instance UIDs.
- :func:`check_dataset`: a strict structural check of an encoded data set, before anything
  is acknowledged.  pydicom reads tolerantly: a value cut short is returned shorter,
  trailing garbage becomes an odd element.  For an archive that is the right choice; for
  a gateway that answers "stored" it is not, so every element header is walked and any
  length that runs past its container is a :class:`MalformedInput`, as are an explicit VR
  that is not one of DICOM's and an element twice in one data set (where the data set
  names no VR, implicit VR or UN, the tags the caller gives as sequences, the data
  dictionary's, are walked as sequences too); and the pixel data must be able to hold the
  image its attributes describe (:class:`PixelDataMismatch`).
- :func:`header_end`: where the top-level elements up to a given tag end (the tolerant
  walk the header reader uses: it stops at the first element cut short).
- :func:`mapped`: a file as a read-only memoryview (a memory map: nothing is copied).
- :func:`encode_file_meta`: the file meta of a received instance, encoded.

Imports only :mod:`gateway.errors` and the standard library.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import zlib
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from gateway.errors import MalformedInput

__all__ = [
    "DEFLATED",
    "EXPLICIT_BE",
    "EXPLICIT_LE",
    "IMPLICIT_LE",
    "INFLATED_MAX_BYTES",
    "NATIVE",
    "Buffer",
    "FileMeta",
    "PixelDataMismatch",
    "check_dataset",
    "encode_file_meta",
    "has_explicit_vr",
    "header_end",
    "inflate",
    "is_part10",
    "mapped",
    "read_file_meta",
]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
# The transfer syntaxes whose data set is deflated (PS3.5 A.5): Deflated Explicit VR Little
# Endian and JPIP Referenced Deflate.  (Deflated Image Frame Compression, 1.2.840.10008.
# 1.2.8.1, deflates each frame of encapsulated pixel data, not the data set.)
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")
# A deflated data set is inflated in memory to be checked and read; past this size it is
# refused rather than inflated (a "deflate bomb": 1 MB of deflate inflates to about 1 GB).
INFLATED_MAX_BYTES = 256 * 1024 * 1024
# The transfer syntaxes whose pixel data is native (uncompressed, defined length); in all
# the others that pynetdicom accepts, (7FE0,0010) is encapsulated (PS3.5 A.4).
NATIVE = (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED[0])

PREAMBLE = 128  # bytes before "DICM"
META_START = PREAMBLE + 4  # the first file meta element

_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
# The VRs of PS3.5 Table 6.2-1: an explicit VR that is none of these cannot be read (how
# long is its length field?), and pydicom refuses its value.
_VRS = _LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)
UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQ_END = 0xFFFEE0DD
MAX_DEPTH = 64

# The pixel data elements and the Image Pixel module attributes (PS3.3 C.7.6.3) that say
# how long native pixel data must be; :func:`check_dataset` notes where the top-level ones
# are as it walks, and reads their values once the walk is done.
PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008
DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00009
_PIXEL_TAGS = {  # tag -> (name, bits per sample fixed by its VR; 0: BitsAllocated)
    FLOAT_PIXEL_DATA: ("Float Pixel Data", 32),
    DOUBLE_FLOAT_PIXEL_DATA: ("Double Float Pixel Data", 64),
    PIXEL_DATA: ("Pixel Data", 0),
}
_SAMPLES_PER_PIXEL = 0x00280002
_PHOTOMETRIC = 0x00280004
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
_IMAGE_TAGS = frozenset(
    {_SAMPLES_PER_PIXEL, _PHOTOMETRIC, _NUMBER_OF_FRAMES, _ROWS, _COLUMNS, _BITS_ALLOCATED}
    | _PIXEL_TAGS.keys()
)
# 4:2:2 (horizontally subsampled chrominance): two samples per pixel where RGB has three
# (PS3.3 C.7.6.3.1.2)
_SUBSAMPLED_422 = (b"YBR_FULL_422", b"YBR_PARTIAL_422")

# File meta elements whose (UI) values :func:`read_file_meta` returns.
_MEDIA_SOP_CLASS = 0x00020002
_MEDIA_SOP_INSTANCE = 0x00020003
_TRANSFER_SYNTAX = 0x00020010


Buffer = bytes | memoryview


class PixelDataMismatch(MalformedInput):
    """The pixel data cannot be the image its attributes describe."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail  # the attributes it was measured against, for a log


class _Formats(NamedTuple):
    """The structs a walker reads with, in one byte order: made once, not per walker (one
    is made per instance checked and per header read; making them took over 1 µs)."""

    u16: struct.Struct
    u32: struct.Struct
    tag: struct.Struct
    vr_u16: struct.Struct  # an explicit VR and its 2-byte length
    implicit_us: struct.Struct  # a US element's length and (first) value, after its tag
    explicit_us: struct.Struct  # the same, with its VR


def _formats(e: str) -> _Formats:
    return _Formats(*(struct.Struct(e + f) for f in ("H", "I", "HH", "2sH", "IH", "2sHH")))


_LITTLE_ENDIAN = _formats("<")
_BIG_ENDIAN = _formats(">")


class _Walker:
    def __init__(
        self,
        data: Buffer,
        *,
        implicit: bool,
        big_endian: bool,
        native: bool = False,
        sequences: Container[int] = frozenset(),
    ) -> None:
        self.data = data
        self.implicit = implicit
        self.sequences = sequences
        # strict about pixel data: native syntaxes have no encapsulated (undefined length) one
        self.native = native
        formats = _BIG_ENDIAN if big_endian else _LITTLE_ENDIAN
        self.u16, self.u32, self.tag_fmt, self.vr_u16 = formats[:4]
        # a US element's length and (first) value, after its tag
        self.us = formats.implicit_us if implicit else formats.explicit_us

    def _fail(self, offset: int, what: str) -> MalformedInput:
        return MalformedInput(f"malformed data set at byte {offset}: {what}")

    def _tag(self, pos: int, end: int) -> int:  # (group << 16) | element
        if pos + 8 > end:
            raise self._fail(pos, "truncated element header")
        group: int
        elem: int
        group, elem = self.tag_fmt.unpack_from(self.data, pos)
        return (group << 16) | elem

    def dataset(
        self,
        pos: int,
        end: int,
        depth: int,
        *,
        until_item_end: bool,
        found: dict[int, int] | None = None,
    ) -> int:
        """Walk elements from *pos*; return the position after the data set.  *found*
        gets the offset of each element of :data:`_IMAGE_TAGS` met on the way."""
        if depth > MAX_DEPTH:
            raise self._fail(pos, "sequences nested too deeply")
        seen: set[int] = set()
        while pos < end:
            tag = self._tag(pos, end)
            if tag == ITEM_END:
                if not until_item_end:
                    raise self._fail(pos, "item delimiter outside an item")
                return pos + 8
            if tag in (ITEM, SEQ_END):
                raise self._fail(pos, f"unexpected item tag ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if tag in seen:  # two values of one attribute: readers differ on which counts
                raise self._fail(pos, f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) occurs twice")
            seen.add(tag)
            if tag in _IMAGE_TAGS and found is not None:
                found[tag] = pos
            pos = self.element(pos, end, tag, depth)
        if until_item_end:
            raise self._fail(pos, "item without its delimiter")
        return pos

    def element(self, pos: int, end: int, tag: int, depth: int) -> int:
        length: int
        if self.implicit:
            length = self.u32.unpack_from(self.data, pos + 4)[0]
            # the VR is the data dictionary's: a sequence is walked, whatever its length
            vr = b"SQ" if length == UNDEFINED or tag in self.sequences else b""
            pos += 8
        else:
            vr = bytes(self.data[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise self._fail(pos, "truncated element header")
                length = self.u32.unpack_from(self.data, pos + 8)[0]
                pos += 12
            else:
                if vr not in _VRS:
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
            elif vr == b"UN" and tag in self.sequences:  # PS3.5 6.2.2: implicit VR LE items
                self._implicit().sequence(pos, pos + length, depth, defined=True)
            return pos + length
        if tag in _PIXEL_TAGS and (self.native or tag != PIXEL_DATA):
            # only (7FE0,0010) of an encapsulated syntax has fragments (PS3.5 A.4)
            where = " in a native transfer syntax" if tag == PIXEL_DATA else ""
            raise MalformedInput(f"{_PIXEL_TAGS[tag][0]} has undefined length{where}")
        # encapsulated pixel data: by its VR, or by its tag where the data set names no VR
        # (an explicit SQ or UN is what it says it is, as any reader takes it)
        if vr in (b"OB", b"OW") or (self.implicit and tag == PIXEL_DATA):
            return self.fragments(pos, end)
        if vr == b"SQ":
            return self.sequence(pos, end, depth, defined=False)
        if vr == b"UN":  # PS3.5 6.2.2: its items are encoded in implicit VR little endian
            return self._implicit().sequence(pos, end, depth, defined=False)
        raise self._fail(pos, f"undefined length on VR {vr.decode(errors='replace')}")

    def _implicit(self) -> _Walker:
        return _Walker(
            self.data,
            implicit=True,
            big_endian=False,
            native=self.native,
            sequences=self.sequences,
        )

    def value(self, pos: int) -> tuple[bytes, int, int]:
        """(VR, or b"" in implicit VR; value offset; length) of the element at *pos*, whose
        header the walk has already read."""
        if self.implicit:
            return b"", pos + 8, self.u32.unpack_from(self.data, pos + 4)[0]
        vr: bytes
        length: int
        vr, length = self.vr_u16.unpack_from(self.data, pos + 4)
        if vr in _LONG_VRS:
            return vr, pos + 12, self.u32.unpack_from(self.data, pos + 8)[0]
        return vr, pos + 8, length

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


def inflate(data: Buffer, limit: int = INFLATED_MAX_BYTES) -> bytes:
    """A deflated data set (PS3.5 A.5), inflated whole (deflate is rare), or
    :class:`MalformedInput` when it does not inflate, is cut short, or would inflate to
    more than *limit* bytes: inflating stops there, so a small stream that claims
    gigabytes costs *limit* bytes of memory, not the gigabytes.  What follows the end of
    the stream (the pad byte of PS3.5 A.5) is ignored."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise MalformedInput(f"deflated data set does not inflate: {exc}") from None
    if inflater.eof:
        return out
    if inflater.unconsumed_tail or len(out) == limit:
        raise MalformedInput(f"deflated data set inflates past {limit} bytes")
    raise MalformedInput("deflated data set does not inflate: the stream is cut short")


def check_dataset(
    data: Buffer, transfer_syntax: str, *, sequences: Container[int] = frozenset()
) -> None:
    """Raise :class:`MalformedInput` unless *data* (a data set without file meta) is a
    well-formed sequence of elements in *transfer_syntax* whose pixel data can hold the
    image it claims to be.

    The walk refuses an element that runs past its container, a broken sequence or item,
    an explicit VR that is not one of DICOM's, an element twice in one data set or item,
    and pixel data of undefined length where it cannot have one: (7FE0,0010) in a native
    syntax (:data:`NATIVE`), Float and Double Float Pixel Data in any.  Then, for the
    top-level pixel data, :class:`PixelDataMismatch` (a :class:`MalformedInput`) when:

    - native (Pixel Data in a native syntax, Float and Double Float Pixel Data in any) and
      shorter than Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated / 8
      bytes, rounded up: BitsAllocated 1 is bit-packed (PS3.5 8.1.1); 32 and 64 bits for
      Float and Double Float Pixel Data whatever BitsAllocated says; NumberOfFrames absent
      or empty is 1; YBR_FULL_422 and YBR_PARTIAL_422 have two samples per pixel where RGB
      has three (PS3.3 C.7.6.3.1.2).  An odd size is padded to even (PS3.5 7.1.1), but the
      pad byte holds no pixel: an element of the odd size is not refused for lacking it
      (this walk does not refuse odd lengths elsewhere either).  Longer is accepted:
      trailing padding is common in real files.  When Rows, Columns or BitsAllocated is
      absent, empty or (explicit VR) not US or SS, or NumberOfFrames is not a number,
      there is nothing to measure against and nothing is refused;
    - encapsulated and without a fragment after the Basic Offset Table item (PS3.5 A.4).
      The fragments are walked (item tags, lengths within the data set, the delimiter);
      the codestream is not decoded, and Pixel Data of defined length in an encapsulated
      syntax is not measured.

    *sequences*: the tags whose VR is SQ in the data dictionary (:data:`gateway.dicom.
    header.SEQUENCE_TAGS`).  Where the data names no VR (implicit VR, and the VR UN), only
    these, and values of undefined length, are walked as sequences; any other value is
    opaque bytes.

    A deflated data set is inflated whole first, as the header reader does.  Nothing is
    copied: the values read are a few short ones of the Image Pixel module."""
    if transfer_syntax in DEFLATED:
        data = inflate(data)
    walker = _walker(data, transfer_syntax, native=transfer_syntax in NATIVE, sequences=sequences)
    found: dict[int, int] = {}
    try:
        walker.dataset(0, len(data), 0, until_item_end=False, found=found)
    except struct.error:
        raise MalformedInput("malformed data set: truncated element") from None
    for tag in _PIXEL_TAGS:
        if tag in found:
            _check_pixel_data(walker, found, tag)


def _check_pixel_data(walker: _Walker, found: dict[int, int], tag: int) -> None:
    """Raise :class:`PixelDataMismatch` when the top-level pixel data element *tag* (found
    at ``found[tag]`` by a finished walk) cannot hold the image (see :func:`check_dataset`)."""
    name, bits = _PIXEL_TAGS[tag]
    _vr, start, length = walker.value(found[tag])
    if length == UNDEFINED:  # encapsulated; the walk checked the items and the delimiter
        pos = start
        for _ in range(2):  # the Basic Offset Table item, then the first fragment
            if walker._tag(pos, len(walker.data)) != ITEM:
                raise PixelDataMismatch(f"encapsulated {name} has no fragment")
            pos += 8 + walker.u32.unpack_from(walker.data, pos + 4)[0]
        return
    if tag == PIXEL_DATA and not walker.native:  # compressed, yet defined length: not measured
        return
    rows = _unsigned(walker, found, _ROWS)
    columns = _unsigned(walker, found, _COLUMNS)
    bits = bits or _unsigned(walker, found, _BITS_ALLOCATED) or 0
    frames = _frames(walker, found)
    if rows is None or columns is None or not bits or frames is None:
        return
    spp = _unsigned(walker, found, _SAMPLES_PER_PIXEL)
    spp = 1 if spp is None else spp
    samples = rows * columns * frames * spp
    # 4:2:2 is a three-sample interpretation: a grey image's is not read
    photometric = _text(walker, found, _PHOTOMETRIC) if spp == 3 else None
    if photometric in _SUBSAMPLED_422:
        samples = samples * 2 // 3
    need = (samples * bits + 7) // 8
    if length < need:
        raise PixelDataMismatch(
            f"{name} has {length} of the {need} bytes the image needs",  # fits 64 characters
            f"Rows {rows}, Columns {columns}, {frames} frame(s), {spp} sample(s) of {bits} bits"
            + (f", {photometric.decode()}" if photometric in _SUBSAMPLED_422 else ""),
        )


def _unsigned(walker: _Walker, found: dict[int, int], tag: int) -> int | None:
    """The (first) US value of a top-level element, read with one unpack; None when absent,
    empty or, in explicit VR, of a VR other than US or SS (an IS "512" is not 12597)."""
    pos = found.get(tag)
    if pos is None or pos + 10 > len(walker.data):
        return None
    length: int
    value: int
    if walker.implicit:
        length, value = walker.us.unpack_from(walker.data, pos + 4)
    else:
        vr, length, value = walker.us.unpack_from(walker.data, pos + 4)
        if vr not in (b"US", b"SS"):
            return None
    return value if length >= 2 else None


def _text(walker: _Walker, found: dict[int, int], tag: int, limit: int = 64) -> bytes | None:
    """The value of a short top-level string element (its first value, without padding);
    None when absent or longer than *limit*."""
    pos = found.get(tag)
    if pos is None:
        return None
    _vr, start, length = walker.value(pos)
    if length > limit:
        return None
    return bytes(walker.data[start : start + length]).split(b"\\")[0].strip(b" \x00")


def _frames(walker: _Walker, found: dict[int, int]) -> int | None:
    """Number of Frames (IS): 1 when absent or empty; None when not a number >= 0."""
    if _NUMBER_OF_FRAMES not in found:
        return 1
    text = _text(walker, found, _NUMBER_OF_FRAMES, limit=16)
    if text is None:
        return None
    if not text:
        return 1
    try:
        frames = int(text)
    except ValueError:
        return None
    return frames if frames >= 0 else None


def header_end(data: Buffer, transfer_syntax: str, last_tag: int) -> int:
    """Where the top-level elements of *data* (a data set without file meta, not deflated)
    up to *last_tag* ((group << 16) | element) end: the offset of the first element with a
    greater tag, or of the first one cut short or malformed, or the end of *data*.

    Tolerant, as pydicom's reader is: the elements before that offset are whole, and what
    follows is not looked at (the strict check is :func:`check_dataset`)."""
    walker = _walker(data, transfer_syntax)
    pos, end = 0, len(data)
    with contextlib.suppress(MalformedInput, struct.error):
        while pos < end:
            tag = walker._tag(pos, end)
            if tag > last_tag:
                break
            pos = walker.element(pos, end, tag, 0)
    return pos


def has_explicit_vr(data: Buffer, offset: int = 0) -> bool:
    """Whether the element at *offset* looks explicit VR (two upper-case letters after its
    tag): the check pydicom makes on a data set's first element, to read a data set encoded
    otherwise than its transfer syntax says."""
    vr = bytes(data[offset + 4 : offset + 6])
    return len(vr) == 2 and vr.isalpha() and vr.isupper()


def _walker(
    data: Buffer,
    transfer_syntax: str,
    *,
    native: bool = False,
    sequences: Container[int] = frozenset(),
) -> _Walker:
    return _Walker(
        data,
        implicit=transfer_syntax == IMPLICIT_LE,
        big_endian=transfer_syntax == EXPLICIT_BE,
        native=native,
        sequences=sequences,
    )


def is_part10(data: Buffer) -> bool:
    """Whether *data* starts as a Part 10 file: a 128-byte preamble, then ``DICM``."""
    return bytes(data[PREAMBLE:META_START]) == b"DICM"


@dataclass(frozen=True)
class FileMeta:
    """What :func:`read_file_meta` found in a Part 10 file's group 0002."""

    offset: int  # where the data set starts (after preamble, "DICM" and the file meta)
    transfer_syntax: str  # (0002,0010); "" when the file meta has none
    sop_class_uid: str  # (0002,0002) Media Storage SOP Class UID; "" when absent
    sop_instance_uid: str  # (0002,0003) Media Storage SOP Instance UID; "" when absent


def read_file_meta(data: Buffer, *, strict: bool = True) -> FileMeta:
    """The file meta group of Part 10 bytes, walked element by element (always explicit VR
    little endian) until the first element of another group, as pydicom and pynetdicom read
    it: the (0002,0000) group length is not trusted, nor needed.

    Raises :class:`MalformedInput` when *data* has no preamble and ``DICM`` and, if
    *strict*, when it ends inside the file meta; tolerant (``strict=False``, as pydicom
    reads), the file meta ends at the element cut short, and so does *data*."""
    if not is_part10(data):
        raise MalformedInput("not a DICOM Part 10 file: no 'DICM' after the 128-byte preamble")
    values: dict[int, str] = {}
    pos, end = META_START, len(data)
    while pos < end:
        try:
            group, elem = struct.unpack_from("<HH", data, pos)
            if group != 0x0002:
                break
            if bytes(data[pos + 4 : pos + 6]) in _LONG_VRS:
                (length,) = struct.unpack_from("<I", data, pos + 8)
                start = pos + 12
            else:
                (length,) = struct.unpack_from("<H", data, pos + 6)
                start = pos + 8
        except struct.error:
            length, start = 0, end + 1
        if start + length > end:
            if not strict:
                return _file_meta(end, values)
            raise MalformedInput(f"file meta cut short at byte {pos}")
        tag = (group << 16) | elem
        if tag in (_MEDIA_SOP_CLASS, _MEDIA_SOP_INSTANCE, _TRANSFER_SYNTAX):
            text = bytes(data[start : start + length]).rstrip(b"\x00 ")
            values[tag] = text.decode("ascii", errors="replace").strip()
        pos = start + length
    return _file_meta(pos, values)


def _file_meta(offset: int, values: dict[int, str]) -> FileMeta:
    return FileMeta(
        offset,
        values.get(_TRANSFER_SYNTAX, ""),
        values.get(_MEDIA_SOP_CLASS, ""),
        values.get(_MEDIA_SOP_INSTANCE, ""),
    )


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[memoryview]:
    """The bytes of the file at *path*, read-only, through a memory map (nothing is copied
    into memory).  Slices of the view must be released before the block ends (``with
    view[a:b] as part:``).  Raises :class:`MalformedInput` for an empty file, ``OSError``
    when it cannot be opened."""
    with path.open("rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise MalformedInput("empty file") from None
    with mm, memoryview(mm) as view:
        yield view


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of the file meta."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _uid_value(uid: str) -> bytes:
    # A C-STORE request's UIDs need not be conformant (pynetdicom checks their length only)
    # and are decoded as pydicom decodes a UI value, one byte to one Latin-1 character:
    # encoded back the same way, as pydicom does; a character Latin-1 lacks (none comes off
    # the wire) becomes "?" rather than an error on the acknowledgement path.
    raw = uid.encode("latin-1", errors="replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_uid: str,
    implementation_version: str,
) -> bytes:
    """The file meta group (0002) of a received instance, encoded, group length first:
    the bytes pydicom writes for pynetdicom's ``create_file_meta`` with the same values,
    made here with a few ``struct.pack`` calls instead of a pydicom dataset (that costs
    about a tenth of an instance's time on the acknowledgement path).  UIDs are padded
    with NUL, the version name with a space, to an even length (PS3.5 6.2)."""
    version = implementation_version.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join(
        (
            _meta_element(0x00020001, b"OB", b"\x00\x01"),
            _meta_element(_MEDIA_SOP_CLASS, b"UI", _uid_value(sop_class_uid)),
            _meta_element(_MEDIA_SOP_INSTANCE, b"UI", _uid_value(sop_instance_uid)),
            _meta_element(_TRANSFER_SYNTAX, b"UI", _uid_value(transfer_syntax)),
            _meta_element(0x00020012, b"UI", _uid_value(implementation_uid)),
            _meta_element(0x00020013, b"SH", version),
        )
    )
    return _meta_element(0x00020000, b"UL", struct.pack("<I", len(body))) + body
