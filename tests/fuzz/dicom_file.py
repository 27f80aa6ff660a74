"""Fuzz target: Part 10 bytes into the file meta walker and the header reader.

Input: what follows the 128-byte preamble and ``DICM`` (the target adds them): the file
meta group, then the data set.  This is how delivery, ``gateway explain`` and the workers
read a stored instance: :func:`~gateway.dicom.part10.read_file_meta` (strict and
tolerant), :func:`~gateway.dicom.header.read_header` on bytes and on a memory view,
:func:`~gateway.dicom.header.read_dataset`, and the structural check of the data set in the
transfer syntax its file meta names.  Each returns or raises
:class:`~gateway.errors.MalformedInput`.

Oracle: where the strict file meta read succeeds and pydicom's file meta reader reads the
group in explicit VR (it falls back to implicit VR, for the group or an element whose VR is
no VR, where the gateway does not), both end the group at the same byte.
"""

from __future__ import annotations

import contextlib
import io
import warnings

from pydicom.filereader import _read_file_meta_info

from gateway.dicom.header import SEQUENCE_TAGS, read_dataset, read_header
from gateway.dicom.part10 import (
    DEFLATED,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    FileMeta,
    check_dataset,
    has_explicit_vr,
    read_file_meta,
)
from gateway.errors import MalformedInput
from tests.fuzz.dicomscp import KEYWORDS, KNOWN_VRS

_PREFIX = b"\x00" * 128 + b"DICM"
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_WALKED = (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, *DEFLATED)


def TestOneInput(data: bytes) -> None:
    whole = _PREFIX + data
    meta: FileMeta | None
    try:
        meta = read_file_meta(whole)
    except MalformedInput:
        meta = None
    try:
        tolerant = read_file_meta(whole, strict=False)
    except MalformedInput as exc:
        raise AssertionError(f"the tolerant file meta read refused: {exc}") from None
    assert len(_PREFIX) <= tolerant.offset <= len(whole), tolerant
    if meta is not None:
        assert meta == tolerant, (meta, tolerant)
        _same_end_as_pydicom(whole, meta)
        if meta.transfer_syntax in _WALKED:
            with contextlib.suppress(MalformedInput):
                check_dataset(whole[meta.offset :], meta.transfer_syntax, sequences=SEQUENCE_TAGS)
    for source in (whole, memoryview(whole)):
        with contextlib.suppress(MalformedInput):
            read_header(source, KEYWORDS)
    for pixels in (False, True):
        with contextlib.suppress(MalformedInput):
            read_dataset(whole, pixels=pixels)


def _vrs_valid(whole: bytes, end: int) -> bool:
    """Whether each element of the file meta (up to *end*) has a DICOM VR."""
    pos = len(_PREFIX)
    while pos < end:
        vr = whole[pos + 4 : pos + 6]
        if vr.decode("latin-1") not in KNOWN_VRS:
            return False
        if vr in _LONG_VRS:
            pos += 12 + int.from_bytes(whole[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(whole[pos + 6 : pos + 8], "little")
    return True


def _same_end_as_pydicom(whole: bytes, meta: FileMeta) -> None:
    if meta.offset > len(_PREFIX) and not has_explicit_vr(whole, len(_PREFIX)):
        return  # pydicom reads a data set whose first VR is no VR as implicit VR
    if len(whole) - meta.offset < 8:
        return  # less than an element header follows: pydicom's reader stops at the end
    if whole[meta.offset : meta.offset + 2] == b"\xfe\xff":
        return  # an item tag follows: pydicom's reader stops after it (it ends an item)
    if not _vrs_valid(whole, meta.offset):
        return  # pydicom reads an element whose VR is no VR as implicit VR, the gateway not
    fp = io.BytesIO(whole)
    fp.seek(len(_PREFIX))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom_meta = _read_file_meta_info(fp)
        explicit = pydicom_meta.original_encoding[0] is False and all(
            raw.VR is not None for raw in pydicom_meta.elements()
        )
    except Exception:  # pydicom refuses it: no comparison
        return
    if not explicit:  # not explicit VR: pydicom read it as implicit VR, the gateway never does
        return
    if fp.tell() != meta.offset:
        raise AssertionError(f"the file meta ends at byte {meta.offset}, pydicom's at {fp.tell()}")
