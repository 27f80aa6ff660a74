"""gateway.dicom: the Part-10 walker and the one header reader."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from gateway.dicom.header import read_dataset, read_header
from gateway.dicom.part10 import (
    DEFLATED,
    check_dataset,
    header_end,
    inflate,
    is_part10,
    mapped,
    read_file_meta,
)
from gateway.errors import MalformedInput

KEYWORDS = ("Modality", "SeriesNumber", "StudyDescription", "ImageType", "NoSuchKeyword")


def instance(ts: str = ExplicitVRLittleEndian) -> bytes:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "CT"
    ds.StudyDescription = "Thorax ä"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesNumber = "7"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 8
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.file_meta.TransferSyntaxUID = ts
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def without_group_length(data: bytes) -> bytes:
    """The same file with its (0002,0000) element removed."""
    assert data[132:136] == b"\x02\x00\x00\x00"
    return data[:132] + data[144:]


def test_file_meta_offset_with_and_without_group_length() -> None:
    data = instance()
    meta = read_file_meta(data)
    (group_length,) = struct.unpack_from("<I", data, 140)
    assert meta.offset == 144 + group_length
    assert meta.transfer_syntax == ExplicitVRLittleEndian
    assert (meta.sop_class_uid, meta.sop_instance_uid) == (CTImageStorage, "1.2.3.4.5")
    bare = without_group_length(data)
    assert read_file_meta(bare).offset == meta.offset - 12
    assert read_file_meta(bare).transfer_syntax == ExplicitVRLittleEndian


def test_a_wrong_group_length_is_not_trusted() -> None:
    data = bytearray(instance())
    struct.pack_into("<I", data, 140, 4)
    assert read_file_meta(bytes(data)).offset == read_file_meta(instance()).offset


@pytest.mark.parametrize("data", [b"", b"\x00" * 200, b"\x00" * 128 + b"DICX" + b"\x00" * 64])
def test_no_preamble_is_not_part10(data: bytes) -> None:
    assert not is_part10(data)
    with pytest.raises(MalformedInput, match="not a DICOM Part 10 file"):
        read_file_meta(data)
    with pytest.raises(MalformedInput, match="not a DICOM Part 10 file"):
        read_header(data, KEYWORDS)


@pytest.mark.parametrize("cut", [133, 140, 150, 170, 200])
def test_file_meta_cut_short(cut: int) -> None:
    """Malformed to the strict walker; the header reader, tolerant like pydicom, reads
    what is whole: here nothing of the data set."""
    with pytest.raises(MalformedInput, match="file meta cut short"):
        read_file_meta(instance()[:cut])
    header = read_header(instance()[:cut], KEYWORDS)
    assert (header.sop_instance_uid, header.study_instance_uid) == ("", "")
    assert header.file_meta.offset == cut


@pytest.mark.parametrize(
    "ts",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_header_from_bytes_memoryview_and_path_is_the_same(ts: str, tmp_path: Path) -> None:
    data = instance(ts)
    path = tmp_path / "one.dcm"
    path.write_bytes(data)
    header = read_header(data, KEYWORDS)
    assert read_header(memoryview(data), KEYWORDS) == header
    assert read_header(path, KEYWORDS) == header
    assert (header.sop_class_uid, header.sop_instance_uid) == (CTImageStorage, "1.2.3.4.5")
    assert header.study_instance_uid == "1.2.3"
    assert header.attrs == {
        "Modality": "CT",
        "SeriesNumber": 7,
        "StudyDescription": "Thorax ä",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "TransferSyntaxUID": ts,
    }
    # the same values as pydicom's full header read gives
    ds = read_dataset(path)
    assert "PixelData" not in ds
    assert header.attrs["StudyDescription"] == str(ds.StudyDescription)


def test_the_header_read_stops_before_the_pixel_data_and_after_the_last_keyword() -> None:
    data = instance()
    meta = read_file_meta(data)
    body = data[meta.offset :]
    end = header_end(body, ExplicitVRLittleEndian, 0x00080060)  # Modality
    assert body[end : end + 4] == b"\x08\x00\x30\x10"  # (0008,1030) StudyDescription is next
    assert body[header_end(body, ExplicitVRLittleEndian, 0xFFFFFFFF) :] == b""
    assert body[header_end(body, ExplicitVRLittleEndian, 0x7FE00007) :][:4] == b"\xe0\x7f\x10\x00"


def test_a_data_set_cut_short_reads_the_elements_before_the_cut() -> None:
    data = instance()
    cut = data.index(b"1.2.3\x00") - 4  # inside the Study Instance UID's header
    header = read_header(data[:cut], KEYWORDS)
    assert header.sop_instance_uid == "1.2.3.4.5"
    assert header.study_instance_uid == ""
    assert "SeriesNumber" not in header.attrs
    with pytest.raises(MalformedInput, match="malformed data set"):
        check_dataset(data[read_file_meta(data).offset : cut], ExplicitVRLittleEndian)


def test_a_file_that_cannot_be_read_is_malformed_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(MalformedInput, match="empty"):
        read_header(empty, KEYWORDS)
    with pytest.raises(MalformedInput, match="cannot read"):
        read_header(tmp_path / "missing.dcm", KEYWORDS)
    with pytest.raises(MalformedInput, match="cannot decode"):
        read_dataset(b"not DICOM at all")


def test_a_failure_inside_a_mapped_file_releases_the_map(tmp_path: Path) -> None:
    """Slices of the mapped view are released as a failure unwinds: the map closes and the
    caller sees the MalformedInput (not a BufferError)."""
    path = tmp_path / "bad.dcm"
    data = instance()
    path.write_bytes(data[:-3])  # pixel data cut short
    with pytest.raises(MalformedInput, match="malformed data set"), mapped(path) as view:
        meta = read_file_meta(view)
        assert read_header(view, KEYWORDS).study_instance_uid == "1.2.3"
        with view[meta.offset :] as body:
            check_dataset(body, ExplicitVRLittleEndian)


# --- found by fuzzing (tests/fuzz/corpus/dicom_*/regress-*) ---------------------------------


def test_a_binary_value_of_a_wrong_length_is_malformed_input() -> None:
    # US (0028,0010) Rows of 3 bytes: pydicom's BytesLengthException went through the SCP
    # as an internal error (0xC212, logged as a bug) instead of a refusal
    data = instance()
    rows = b"\x28\x00\x10\x00US\x02\x00\x02\x00"
    assert rows in data
    broken = data.replace(rows, b"\x28\x00\x10\x00US\x03\x00\x02\x00\x00")
    with pytest.raises(MalformedInput, match="BytesLengthException"):
        read_header(broken, ("Rows",))
    assert read_header(broken, KEYWORDS).sop_instance_uid == "1.2.3.4.5"  # not asked for
    # dcmread decodes the file meta as it reads: a group length of 3 bytes
    assert data[132:144] == b"\x02\x00\x00\x00UL\x04\x00" + data[140:144]
    short = data[:132] + b"\x02\x00\x00\x00UL\x03\x00\x00\x00\x00" + data[144:]
    with pytest.raises(MalformedInput, match="BytesLengthException"):
        read_dataset(short)


def test_a_deflated_data_set_that_does_not_inflate_is_malformed_input() -> None:
    data = instance(DeflatedExplicitVRLittleEndian)
    meta = read_file_meta(data)
    broken = data[: meta.offset] + b"\xff" * 16 + data[meta.offset + 16 :]
    with pytest.raises(MalformedInput, match="error"):
        read_dataset(broken)


def _deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def test_inflate_reads_a_stream_up_to_the_limit_and_ignores_the_pad_byte() -> None:
    plain = b"\x08\x00\x16\x00UI" + bytes(1000)
    assert inflate(_deflate(plain) + b"\x00", limit=len(plain)) == plain


def test_a_deflate_bomb_is_refused_after_limit_bytes_not_inflated_whole() -> None:
    """1 MiB of zeros deflates to about 1 KB; with a 64 KiB limit it is refused, and the
    inflater never holds more than the limit."""
    bomb = _deflate(bytes(1024 * 1024))
    assert len(bomb) < 2048
    with pytest.raises(MalformedInput, match="inflates past 65536 bytes"):
        inflate(bomb, limit=64 * 1024)


def test_a_deflated_stream_cut_short_is_malformed_input() -> None:
    stream = _deflate(bytes(range(256)) * 64)
    with pytest.raises(MalformedInput, match="cut short"):
        inflate(stream[: len(stream) // 2])


def test_jpip_referenced_deflate_has_a_deflated_data_set_and_deflated_frames_do_not() -> None:
    """PS3.5 A.5 / A.6.2: JPIP Referenced Deflate deflates the data set; Deflated Image
    Frame Compression (1.2.840.10008.1.2.8.1) deflates frames of encapsulated pixel data."""
    assert "1.2.840.10008.1.2.4.95" in DEFLATED
    assert "1.2.840.10008.1.2.8.1" not in DEFLATED
