"""The strict structural check that runs before a C-STORE is acknowledged."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from gateway.dicom.part10 import check_dataset
from gateway.errors import MalformedInput
from tests.dicomgen import SeriesSpec, make_study


def encode(ds: Dataset, ts: str) -> bytes:
    from pydicom.filebase import DicomBytesIO

    buf = DicomBytesIO()
    buf.is_implicit_VR = ts == ImplicitVRLittleEndian
    buf.is_little_endian = ts != ExplicitVRBigEndian
    write_dataset(buf, ds)
    return buf.getvalue()


def sample() -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "DOE^JANE"
    item = Dataset()
    item.CodeValue = "123"
    item.CodeMeaning = "thing"
    ds.ProcedureCodeSequence = Sequence([item, item])
    ds.StudyInstanceUID = "1.2.3"
    return ds


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_well_formed_data_sets_pass(ts: str) -> None:
    check_dataset(encode(sample(), ts), ts)


@pytest.mark.parametrize("cut", [1, 3, 9, 20])
def test_a_data_set_cut_short_is_malformed(cut: int) -> None:
    data = encode(sample(), ExplicitVRLittleEndian)
    with pytest.raises(MalformedInput, match="malformed data set"):
        check_dataset(data[:-cut], ExplicitVRLittleEndian)


def test_trailing_garbage_is_malformed() -> None:
    data = encode(sample(), ExplicitVRLittleEndian)
    with pytest.raises(MalformedInput):
        check_dataset(data + b"garbage!", ExplicitVRLittleEndian)


def test_generated_study_in_every_transfer_syntax_passes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.dicomgen import dataset_bytes

    for f in make_study(
        tmp_path,
        series=[
            SeriesSpec("CT", count=1, rows=32, cols=32, transfer_syntax=ts)
            for ts in (
                ExplicitVRLittleEndian,
                ImplicitVRLittleEndian,
                ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian,
                RLELossless,
            )
        ],
    ):
        ts = str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        check_dataset(dataset_bytes(f.read_bytes()), ts)


def test_broken_encapsulated_pixel_data_is_malformed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.dicomgen import dataset_bytes

    f = make_study(tmp_path, series=[SeriesSpec("CT", 1, 32, 32, RLELossless)])[0]
    data = dataset_bytes(f.read_bytes())
    with pytest.raises(MalformedInput):
        check_dataset(data[:-12], RLELossless)


def test_deflated_garbage_is_malformed() -> None:
    with pytest.raises(MalformedInput, match="inflate"):
        check_dataset(b"\x00\x01 not deflate", DeflatedExplicitVRLittleEndian)
