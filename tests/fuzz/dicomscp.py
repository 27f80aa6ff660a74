"""What the DICOM targets share: the SCP's decision on one received data set, and the oracle
that judges a data set the SCP accepted.

The decision is :meth:`gateway.ingest.dicom_scp.StoreHandler._store` itself, the one place
that decides a C-STORE status, called with a stand-in for pynetdicom's event and a store
that keeps nothing: it returns the status (0x0000 when stored) or raises
:class:`~gateway.errors.Permanent` (a refusal).  Any other exception is a crash.

The oracle (:func:`structure_problem`) reads the data set with pydicom, in the transfer
syntax of the presentation context, and says why it is not whole:

- pydicom's top-level elements are not those the gateway's walker found (the two disagree
  on where an element ends), or a tag occurs twice at the top level (two values for one
  attribute: readers differ on which one counts);
- the elements do not end exactly where the data set ends;
- a value is shorter than its length says, a sequence or item cannot be read, an explicit
  VR is not a DICOM VR, or encapsulated pixel data is not a run of whole fragments.

Values themselves are not judged (the gateway never decodes them): only the elements pydicom
reads as sequences (by their VR, or the data dictionary's where the data set names none) are
decoded, with value validation off.

When the SCP answers success, its header must also name the instance as pydicom does: the
SOP Class, SOP Instance and Study Instance UIDs of the full read.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.hooks import raw_element_vr
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pydicom.valuerep import VR
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.events import Event
from pynetdicom.utils import set_ae

from gateway.dicom import part10
from gateway.dicom.header import InstanceHeader, read_header
from gateway.errors import MalformedInput, Permanent
from gateway.ingest.dicom_scp import StoreHandler
from gateway.observability.metrics import Metrics
from gateway.route.keywords import ROUTING_KEYWORDS
from gateway.store.store import Store
from tests.fuzz import AcceptedInvalid

# The transfer syntaxes a target can pick (its first byte): the SCP accepts them all.
SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,  # encapsulated: explicit VR little endian, pixel data in fragments
)
# What ingest reads: the routing keywords, and a few more of other VRs and places.
KEYWORDS = (*ROUTING_KEYWORDS, "ImageType", "SliceThickness", "PatientName", "Rows")
STORAGE_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage: the stand-in request's
PLACEHOLDER_UID = "1.2.3.4.5"

# The VRs of PS3.5 Table 6.2-1 (pydicom's, less the ambiguous ones of its dictionary).
KNOWN_VRS = frozenset(v.value for v in VR) - {"OB or OW", "US or SS", "US or OW", "US or SS or OW"}
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_SUCCESS = 0x0000


class _Keys:
    def index(self, purpose: str, value: str) -> str:
        return "0" * 16


class _Store:
    """A store that keeps nothing and answers "new"."""

    keys = _Keys()

    def ingest_instance(self, data: bytes | Path, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(new=True, envelope_id="fuzz")


@dataclass
class Received:
    """One C-STORE as the SCP sees it: the data set bytes, the presentation context's
    transfer syntax and the request's UIDs."""

    body: bytes
    syntax: str
    sop_class: str
    sop_instance: str
    on_disk: bool = False
    file_meta: Any = field(default=None, init=False)

    def part10(self) -> bytes:
        """The instance as pynetdicom writes it to disk (and the SCP stores it)."""
        meta = _meta_bytes(self.sop_class, self.sop_instance, self.syntax)
        return b"".join((b"\x00" * 128, b"DICM", meta, self.body))


class _Event:
    """The parts of pynetdicom's ``Event`` that ``StoreHandler._store`` reads."""

    def __init__(self, received: Received, path: Path | None) -> None:
        self._received = received
        self.context = SimpleNamespace(transfer_syntax=received.syntax)
        self.request = SimpleNamespace(
            AffectedSOPInstanceUID=received.sop_instance,
            AffectedSOPClassUID=received.sop_class,
        )
        self.file_meta = received.file_meta
        self.assoc = SimpleNamespace(
            requestor=SimpleNamespace(ae_title=set_ae("FUZZ", "ae"), address="127.0.0.1")
        )
        self.dataset_path = path

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        assert not include_meta
        return self._received.body


_HANDLERS: dict[bool, StoreHandler] = {}


def _handler(on_disk: bool) -> StoreHandler:
    if on_disk not in _HANDLERS:
        store = cast(Store, _Store())
        _HANDLERS[on_disk] = StoreHandler(store, 5.0, Metrics(), on_disk=on_disk, keywords=KEYWORDS)
    return _HANDLERS[on_disk]


_SCRATCH: list[Path] = []


def _scratch() -> Path:
    """A file for the received-to-disk path: in /dev/shm when there is one."""
    if not _SCRATCH:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, name = tempfile.mkstemp(prefix="gateway-fuzz-", suffix=".dcm", dir=base)
        os.close(fd)
        _SCRATCH.append(Path(name))
    return _SCRATCH[0]


def decide(received: Received) -> int:
    """The status ``StoreHandler._store`` answers for *received* (0x0000: stored); raises
    :class:`Permanent` for a refusal, anything else for a crash."""
    received.file_meta = create_file_meta(
        sop_class_uid=received.sop_class,  # type: ignore[arg-type]
        sop_instance_uid=received.sop_instance,  # type: ignore[arg-type]
        transfer_syntax=received.syntax,  # type: ignore[arg-type]
    )
    path = None
    if received.on_disk:  # as pynetdicom with STORE_RECV_CHUNKED_DATASET: a Part 10 file
        path = _scratch()
        path.write_bytes(received.part10())
    event = cast(Event, _Event(received, path))
    status = _handler(received.on_disk)._store(event, "FUZZ@127.0.0.1")
    return int(status) if isinstance(status, int) else int(status.Status)


@functools.lru_cache(maxsize=256)
def _meta_bytes(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    """The file meta group pynetdicom writes for a C-STORE (encoded once per request)."""
    meta = create_file_meta(
        sop_class_uid=sop_class,  # type: ignore[arg-type]
        sop_instance_uid=sop_instance,  # type: ignore[arg-type]
        transfer_syntax=syntax,  # type: ignore[arg-type]
    )
    return bytes(encode_file_meta(meta))


def claimed_uids(body: bytes, syntax: str) -> tuple[str, str]:
    """The (SOP Class, SOP Instance) UIDs a sender that agrees with the gateway puts in its
    C-STORE request: what the gateway's header reader finds (placeholders when it finds
    none), so that a data set reaches the success path whenever it passes the checks."""
    meta = _meta_bytes(STORAGE_CLASS, PLACEHOLDER_UID, syntax)
    try:
        header = read_header(b"\x00" * 128 + b"DICM" + meta + body, KEYWORDS)
    except MalformedInput:
        return STORAGE_CLASS, PLACEHOLDER_UID
    return header.sop_class_uid or STORAGE_CLASS, header.sop_instance_uid or PLACEHOLDER_UID


def judge(received: Received) -> None:
    """Run the SCP's decision on *received*; raise :class:`AcceptedInvalid` when it answers
    success for a data set the oracle finds broken (or that names another instance)."""
    try:
        status = decide(received)
    except Permanent:
        return  # refused: the contract
    if status != _SUCCESS:
        return
    problem = structure_problem(received.body, received.syntax)
    if problem is None:
        problem = identity_problem(received)
    if problem is not None:
        raise AcceptedInvalid(f"the SCP answered success (0x0000) for: {problem}")


# --- the oracle --------------------------------------------------------------------------


@contextlib.contextmanager
def _tolerant_values() -> Iterator[None]:
    """pydicom reads structure only: values are not validated, and a binary value of a
    wrong length becomes UN instead of an error."""
    settings = pydicom_config.settings
    saved = (settings.reading_validation_mode, pydicom_config.convert_wrong_length_to_UN)
    settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.convert_wrong_length_to_UN = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode, pydicom_config.convert_wrong_length_to_UN = saved


def _encoding(syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of *syntax*."""
    return syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian


def _inflated(body: bytes, syntax: str) -> bytes:
    return (
        zlib.decompress(body, -zlib.MAX_WBITS) if syntax == DeflatedExplicitVRLittleEndian else body
    )


def _walker_tags(data: bytes, syntax: str) -> list[int]:
    """The top-level tags the gateway's walker finds (the data set passed its check)."""
    walker = part10._walker(data, syntax)  # deflated: inflated already, explicit VR LE
    tags, pos, end = [], 0, len(data)
    while pos < end:
        tag = walker._tag(pos, end)
        tags.append(tag)
        pos = walker.element(pos, end, tag, 0)
    return tags


def structure_problem(body: bytes, syntax: str) -> str | None:
    """Why pydicom cannot read *body* as one whole data set in *syntax*; None when it can."""
    try:
        data = _inflated(body, syntax)
    except zlib.error as exc:
        return f"the deflated data set does not inflate ({exc})"
    implicit, little = _encoding(syntax)
    fp = io.BytesIO(data)
    with _tolerant_values():
        try:
            tags: list[int] = []
            ds = Dataset()
            end = 0
            for elem in data_element_generator(fp, implicit, little):
                tags.append(int(elem.tag))
                ds[elem.tag] = elem
                end = fp.tell()
            if end != len(data):
                return f"{len(data) - end} bytes after the last element pydicom reads"
            walked = _walker_tags(data, syntax)
            if walked != tags:
                return (
                    f"pydicom reads the top-level tags {_tag_list(tags)}, the gateway's walker "
                    f"{_tag_list(walked)}"
                )
            if len(set(tags)) != len(tags):
                twice = sorted({t for t in tags if tags.count(t) > 1})
                return f"top-level tags occur twice: {_tag_list(twice)}"
            return _dataset_problem(ds, little)
        except Exception as exc:  # pydicom's errors are many and various
            return f"pydicom cannot read it: {type(exc).__name__}: {str(exc)[:200]}"


def _tag_list(tags: list[int]) -> str:
    shown = ", ".join(f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in tags[:12])
    return f"[{shown}{', ...' if len(tags) > 12 else ''}]"


def _dataset_problem(ds: Dataset, little: bool) -> str | None:
    for raw in list(ds.elements()):
        where = f"({raw.tag >> 16:04X},{raw.tag & 0xFFFF:04X})"
        if isinstance(raw, RawDataElement):
            if raw.VR is not None and raw.VR not in KNOWN_VRS:
                return f"{where} has the VR {raw.VR!r}, which is not a DICOM VR"
            value = raw.value or b""
            if raw.length == _UNDEFINED:
                problem = _fragments_problem(bytes(value), little) if raw.VR != "SQ" else None
                if problem is not None:
                    return f"{where}: {problem}"
            elif len(value) != raw.length:
                return f"{where} holds {len(value)} bytes, its length says {raw.length}"
            resolved: dict[str, Any] = {}
            raw_element_vr(raw, resolved, ds=ds)  # the VR pydicom gives it: implicit, UN
            if resolved["VR"] != "SQ":
                continue  # a value: not judged
        elem = ds[raw.tag]
        if elem.VR == "SQ":
            for item in elem.value:
                problem = _dataset_problem(item, little)
                if problem is not None:
                    return f"{where} item: {problem}"
    return None


def _fragments_problem(value: bytes, little: bool) -> str | None:
    """Why *value* (an undefined-length value without its delimiter) is not a run of whole
    encapsulated fragments."""
    fmt = "<HHL" if little else ">HHL"
    pos = 0
    while pos < len(value):
        if pos + 8 > len(value):
            return "encapsulated pixel data ends inside a fragment header"
        group, elem, length = struct.unpack_from(fmt, value, pos)
        if (group << 16 | elem) != _ITEM or length == _UNDEFINED:
            return "encapsulated pixel data holds something other than fragments"
        pos += 8 + length
    if pos != len(value):
        return "the last encapsulated fragment is cut short"
    return None


def identity_problem(received: Received) -> str | None:
    """Why the gateway's header names another instance than pydicom's full read does."""
    header: InstanceHeader = read_header(received.part10(), KEYWORDS)
    implicit, little = _encoding(received.syntax)
    with _tolerant_values():
        ds = Dataset()
        fp = io.BytesIO(_inflated(received.body, received.syntax))
        for elem in data_element_generator(fp, implicit, little):
            ds[elem.tag] = elem
        full = tuple(
            str(ds[tag].value) if tag in ds else "" for tag in (0x00080016, 0x00080018, 0x0020000D)
        )
    ours = (header.sop_class_uid, header.sop_instance_uid, header.study_instance_uid)
    if full != ours:
        return f"the header reads the UIDs {ours}, a full read {full}"
    return None
