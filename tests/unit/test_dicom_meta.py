"""The file meta the SCP writes before a received data set (part10.encode_file_meta)."""

from __future__ import annotations

import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dsutils import encode_file_meta as pynetdicom_encode

from gateway.dicom.part10 import encode_file_meta, read_file_meta


@pytest.mark.parametrize(
    ("sop_class", "instance", "syntax", "version"),
    [
        (CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, PYNETDICOM_IMPLEMENTATION_VERSION),
        (CTImageStorage, "1.2.3.45", ImplicitVRLittleEndian, "ODD"),  # odd lengths padded
        ("1.2.840.10008.5.1.4.1.1.4", "2.25." + "9" * 59, JPEG2000Lossless, "AB"),
    ],
)
def test_the_same_bytes_as_pynetdicom(
    sop_class: str, instance: str, syntax: str, version: str
) -> None:
    theirs = pynetdicom_encode(
        create_file_meta(
            sop_class_uid=sop_class,
            sop_instance_uid=instance,
            transfer_syntax=syntax,
            implementation_version=version,
        )
    )
    ours = encode_file_meta(sop_class, instance, syntax, PYNETDICOM_IMPLEMENTATION_UID, version)
    assert ours == theirs
    meta = read_file_meta(b"\x00" * 128 + b"DICM" + ours + b"\x08\x00\x05\x00CS\x00\x00")
    assert (meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax) == (
        sop_class,
        instance,
        syntax,
    )
    assert meta.offset == 132 + len(ours)


def test_a_request_uid_that_is_not_ascii_is_written_as_pynetdicom_writes_it() -> None:
    # found by fuzzing (tests/fuzz/corpus/dicom_dataset/regress-latin-1-uid): pynetdicom
    # decodes a request's UIDs as Latin-1 and does not require them to be conformant; the
    # file meta encoded them as ASCII, and the SCP answered 0xC212, an internal error
    uid = "1.2.3.\xdc"
    theirs = pynetdicom_encode(
        create_file_meta(
            sop_class_uid=CTImageStorage,
            sop_instance_uid=uid,
            transfer_syntax=ExplicitVRLittleEndian,
        )
    )
    ours = encode_file_meta(
        CTImageStorage,
        uid,
        ExplicitVRLittleEndian,
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
    )
    assert ours == theirs
