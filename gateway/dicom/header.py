"""The one DICOM header reader: what the gateway reads of an instance without its pixels.

- :func:`read_header`: the identifiers (SOP Class, SOP Instance and Study Instance UID), the
  transfer syntax and the values of the given *keywords* of a Part 10 instance (bytes, a
  memoryview or a file path).  The file meta is walked by :func:`~gateway.dicom.part10.
  read_file_meta`; only the top-level elements up to the last tag asked for are handed to
  pydicom (:func:`~gateway.dicom.part10.header_end`), never the pixel data, and a file is
  read through a memory map.  This is what ingest stores for routing, what ``gateway
  explain`` routes on and what delivery reads to propose presentation contexts.
- :func:`read_dataset`: a pydicom dataset of a Part 10 instance, up to the pixel data or
  whole: the image input (series selection, volumes) and the conversion path of delivery.

Both raise :class:`~gateway.errors.MalformedInput` with the reason.  Like pydicom, the
header reader is tolerant: an element cut short, in the file meta or the data set, ends
what is read (the elements before it are); bytes without the preamble and ``DICM`` are
refused.  The strict structural check is :func:`~gateway.dicom.part10.check_dataset`.

Imports only :mod:`gateway.errors`, :mod:`gateway.dicom.part10`, pydicom and the standard
library; the keywords are the caller's (routing keeps its list in
:mod:`gateway.route.keywords`).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_dataset as read_encoded_dataset

from gateway.dicom.part10 import (
    DEFLATED,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    Buffer,
    FileMeta,
    has_explicit_vr,
    header_end,
    inflate,
    mapped,
    read_file_meta,
)
from gateway.errors import MalformedInput

__all__ = ["SEQUENCE_TAGS", "InstanceHeader", "Source", "read_dataset", "read_header"]

Source = bytes | memoryview | Path
"""A Part 10 instance (preamble, file meta, data set): its bytes, a view of them, or a file."""

_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_INSTANCE_UID = 0x0020000D
# The header ends before (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data
# and (7FE0,0010) Pixel Data, as pydicom's ``stop_before_pixels`` does.
_LAST_HEADER_TAG = 0x7FE00007

SEQUENCE_TAGS = frozenset(tag for tag in keyword_dict.values() if dictionary_VR(tag) == "SQ")
"""The tags whose VR is SQ in pydicom's data dictionary: what the structural check
(:func:`~gateway.dicom.part10.check_dataset`) walks as a sequence where the data set names
no VR (implicit VR, or UN)."""

# What pydicom raises on data it cannot decode.
_DECODE_ERRORS = (
    InvalidDicomError,
    BytesLengthException,  # a binary value whose length is not a multiple of its size
    zlib.error,  # a deflated data set that does not inflate
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    OSError,
    NotImplementedError,
    AttributeError,
    OverflowError,
    struct.error,
)


@dataclass(frozen=True)
class InstanceHeader:
    """What :func:`read_header` read of one instance."""

    sop_class_uid: str  # (0008,0016) of the data set; "" when absent
    sop_instance_uid: str  # (0008,0018) of the data set; "" when absent
    study_instance_uid: str  # (0020,000D); "" when absent
    # keyword -> value (str, number, list of str or None) for each keyword asked for that
    # the data set has, plus "TransferSyntaxUID" from the file meta
    attrs: dict[str, Any]
    file_meta: FileMeta


def read_header(source: Source, keywords: Iterable[str]) -> InstanceHeader:
    """The identifiers and the *keywords* of a Part 10 instance, read up to the last of
    those tags (never past the pixel data).  Unknown keywords are ignored.  Raises
    :class:`MalformedInput` when *source* is not Part 10 or cannot be decoded."""
    wanted = _tags(tuple(keywords))
    if not isinstance(source, Path):
        return _read_header(source, wanted)
    try:
        with mapped(source) as view:
            return _read_header(view, wanted)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MalformedInput(f"cannot read the file: {reason}") from None


def read_dataset(source: Source, *, pixels: bool = False, force: bool = False) -> Dataset:
    """A pydicom dataset of a Part 10 instance: up to the pixel data, or whole with
    *pixels*.  A path keeps its ``filename`` on the dataset (to read it again in full).
    *force* also reads bytes without preamble and file meta (a bare data set; pydicom
    guesses its encoding).  Raises :class:`MalformedInput`."""
    try:
        fp = source if isinstance(source, Path) else io.BytesIO(source)
        return dcmread(fp, stop_before_pixels=not pixels, force=force)
    except _DECODE_ERRORS as exc:
        raise MalformedInput(f"cannot decode the data set: {type(exc).__name__}") from None


@functools.lru_cache(maxsize=32)
def _tags(keywords: tuple[str, ...]) -> tuple[tuple[tuple[str, int], ...], int]:
    """(keyword, tag) of the known *keywords*, and the last tag the header read needs."""
    pairs = tuple((kw, tag) for kw in keywords if (tag := tag_for_keyword(kw)) is not None)
    last = max([_STUDY_INSTANCE_UID, *(tag for _kw, tag in pairs)])
    return pairs, min(last, _LAST_HEADER_TAG)


def _read_header(data: Buffer, wanted: tuple[tuple[tuple[str, int], ...], int]) -> InstanceHeader:
    pairs, last = wanted
    meta = read_file_meta(data, strict=False)
    syntax = meta.transfer_syntax
    with memoryview(data) as whole, whole[meta.offset :] as body:
        encoded: Buffer = inflate(body) if syntax in DEFLATED else body
        implicit, little = syntax == IMPLICIT_LE, syntax != EXPLICIT_BE
        if little and len(encoded) >= 6:  # pydicom's check: encoded otherwise than declared?
            implicit = not has_explicit_vr(encoded)
        walk = IMPLICIT_LE if implicit else EXPLICIT_LE if little else EXPLICIT_BE
        head = bytes(encoded[: header_end(encoded, walk, last)])  # (0008,0005) included
    try:
        ds = read_encoded_dataset(io.BytesIO(head), implicit, little)
        values = {kw: _plain(ds[tag].value) for kw, tag in pairs if tag in ds}
        sop_instance = str(ds[_SOP_INSTANCE_UID].value) if _SOP_INSTANCE_UID in ds else ""
        sop_class = str(ds[_SOP_CLASS_UID].value) if _SOP_CLASS_UID in ds else ""
        study = str(ds[_STUDY_INSTANCE_UID].value) if _STUDY_INSTANCE_UID in ds else ""
    except _DECODE_ERRORS as exc:
        raise MalformedInput(f"cannot decode the data set: {type(exc).__name__}") from None
    values["TransferSyntaxUID"] = syntax
    return InstanceHeader(sop_class, sop_instance, study, values, meta)


def _plain(value: Any) -> Any:
    """A value as the store keeps it: number, str, list of str or None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        return [str(v) for v in value]
    return str(value)
