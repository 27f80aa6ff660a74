"""The strict structural check that runs before a C-STORE is acknowledged."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from gateway.dicom.header import SEQUENCE_TAGS
from gateway.dicom.part10 import PixelDataMismatch, check_dataset
from gateway.errors import MalformedInput
from tests.dicomgen import SeriesSpec, dataset_bytes, make_ct_series, make_study


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
    f = make_study(tmp_path, series=[SeriesSpec("CT", 1, 32, 32, RLELossless)])[0]
    data = dataset_bytes(f.read_bytes())
    with pytest.raises(MalformedInput):
        check_dataset(data[:-12], RLELossless)


def test_deflated_garbage_is_malformed() -> None:
    with pytest.raises(MalformedInput, match="inflate"):
        check_dataset(b"\x00\x01 not deflate", DeflatedExplicitVRLittleEndian)


# --- pixel data against the image it claims to be ---------------------------------------

NATIVE = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]
PIXEL_VR = {0x7FE00010: b"OW", 0x7FE00008: b"OF", 0x7FE00009: b"OD"}
UNDEFINED = 0xFFFFFFFF


def image(
    nbytes: int,
    ts: str = ExplicitVRLittleEndian,
    *,
    rows: int = 4,
    columns: int = 4,
    bits: int | None = 16,
    samples: int | None = 1,
    frames: str | None = None,
    photometric: str = "MONOCHROME2",
    tag: int = 0x7FE00010,
    value: bytes | None = None,
) -> bytes:
    """An image data set in *ts* whose pixel data element (*tag*) says *nbytes* long and
    holds *value* (default: that many zero bytes), written by hand so that its length can
    be anything, odd included."""
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "DOE^JANE"
    if samples is not None:
        ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if frames is not None:  # raw: "many" too, as a sender may write it
        value_ = frames.encode() + b" " * (len(frames) % 2)
        ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", len(value_), value_, 0, False, True)
    ds.Rows = rows
    ds.Columns = columns
    if bits is not None:
        ds.BitsAllocated = bits
    head = encode(ds, ExplicitVRLittleEndian if ts == DeflatedExplicitVRLittleEndian else ts)
    group, element = tag >> 16, tag & 0xFFFF
    if ts == ImplicitVRLittleEndian:
        pixel = struct.pack("<HHI", group, element, nbytes)
    else:
        e = ">" if ts == ExplicitVRBigEndian else "<"
        pixel = struct.pack(e + "HH2sHI", group, element, PIXEL_VR[tag], 0, nbytes)
    data = head + pixel + (b"\x00" * nbytes if value is None else value)
    if ts == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return data


@pytest.mark.parametrize("ts", NATIVE)
def test_native_pixel_data_of_the_image_size_or_longer_passes(ts: str) -> None:
    """4 x 4 x 16 bits = 32 bytes; longer (trailing padding, seen in real files) passes."""
    for nbytes in (32, 34, 32 + 4096):
        check_dataset(image(nbytes, ts), ts)


@pytest.mark.parametrize("ts", NATIVE)
def test_native_pixel_data_one_byte_short_is_refused(ts: str) -> None:
    with pytest.raises(PixelDataMismatch, match="Pixel Data has 31 of the 32 bytes"):
        check_dataset(image(31, ts), ts)
    with pytest.raises(PixelDataMismatch, match="has 0 of the 32 bytes"):
        check_dataset(image(0, ts), ts)


def test_a_pixel_data_mismatch_is_malformed_input() -> None:
    assert issubclass(PixelDataMismatch, MalformedInput)


@pytest.mark.parametrize(
    ("attrs", "need"),
    [
        # 1 bit, bit-packed: ceil(5 x 5 x 3 frames / 8) = 10 (PS3.5 8.1.1)
        ({"rows": 5, "columns": 5, "bits": 1, "frames": "3"}, 10),
        ({"rows": 3, "columns": 3, "bits": 1}, 2),
        # multi-frame: 4 x 4 x 16 bits x 7 frames
        ({"frames": "7"}, 224),
        ({"frames": "7 "}, 224),  # IS padded to even length
        ({"frames": ""}, 32),  # empty: one frame, as absent
        # RGB: 4 x 4 x 3 samples x 8 bits
        ({"bits": 8, "samples": 3, "photometric": "RGB"}, 48),
        # YBR 4:2:2: two samples per pixel where RGB has three (PS3.3 C.7.6.3.1.2)
        ({"bits": 8, "samples": 3, "photometric": "YBR_FULL_422"}, 32),
        ({"bits": 8, "samples": 3, "photometric": "YBR_PARTIAL_422", "frames": "2"}, 64),
        ({"bits": 8, "samples": 3, "photometric": "YBR_FULL"}, 48),
        # 32 bits, 2 samples
        ({"bits": 32, "samples": 2}, 128),
        # SamplesPerPixel absent: one
        ({"samples": None}, 32),
    ],
)
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_size_an_image_needs(attrs: dict[str, object], need: int, ts: str) -> None:
    check_dataset(image(need, ts, **attrs), ts)  # type: ignore[arg-type]
    check_dataset(image(need + 1, ts, **attrs), ts)  # type: ignore[arg-type]
    with pytest.raises(PixelDataMismatch, match=f"has {need - 1} of the {need} bytes"):
        check_dataset(image(need - 1, ts, **attrs), ts)  # type: ignore[arg-type]


def test_an_odd_size_needs_its_pixels_not_its_pad_byte() -> None:
    """3 x 3 x 8 bits = 9 bytes, padded to 10 by PS3.5 7.1.1: 10 passes, and so does 9
    (every pixel is there); 8 is short."""
    ts = ExplicitVRLittleEndian
    for nbytes in (9, 10):
        check_dataset(image(nbytes, ts, rows=3, columns=3, bits=8), ts)
    with pytest.raises(PixelDataMismatch, match="has 8 of the 9 bytes"):
        check_dataset(image(8, ts, rows=3, columns=3, bits=8), ts)


@pytest.mark.parametrize(
    ("tag", "name", "need"), [(0x7FE00008, "Float Pixel Data", 64), (0x7FE00009, "Double", 128)]
)
@pytest.mark.parametrize("ts", [*NATIVE, RLELossless])
def test_float_pixel_data_is_measured_in_every_syntax(
    tag: int, name: str, need: int, ts: str
) -> None:
    """4 x 4 samples of 32 (Float) or 64 bits (Double Float), whatever BitsAllocated says;
    never encapsulated, so measured in an encapsulated syntax too."""
    encoded_as = ExplicitVRLittleEndian if ts == RLELossless else ts
    check_dataset(image(need, encoded_as, tag=tag, bits=None), encoded_as)
    check_dataset(image(need, encoded_as, tag=tag, bits=16), ts)
    with pytest.raises(PixelDataMismatch, match=f"{name}.* has {need - 4} of the {need} bytes"):
        check_dataset(image(need - 4, encoded_as, tag=tag), ts)


@pytest.mark.parametrize(
    "attrs",
    [
        {"rows": 0},
        {"bits": None},  # BitsAllocated absent: nothing to measure against
        {"frames": "many"},
        {"frames": "-1"},
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_without_the_attributes_to_measure_against_nothing_is_refused(
    attrs: dict[str, object],
) -> None:
    check_dataset(image(2, **attrs), ExplicitVRLittleEndian)  # type: ignore[arg-type]


def test_rows_of_an_unexpected_vr_are_not_read_as_us() -> None:
    """(0028,0010) written as IS "51": not read as a US (which would make it 12597)."""
    data = image(32)
    rows = data.index(struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 2))
    bad = data[:rows] + struct.pack("<HH2sH", 0x0028, 0x0010, b"IS", 2) + b"51" + data[rows + 10 :]
    check_dataset(bad, ExplicitVRLittleEndian)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("tag", [0x7FE00010, 0x7FE00008])
def test_pixel_data_of_undefined_length_in_a_native_syntax_is_malformed(ts: str, tag: int) -> None:
    """Fragments well formed, but a native syntax has no encapsulated pixel data."""
    value = FRAGMENTS_OK
    with pytest.raises(MalformedInput, match="Pixel Data has undefined length") as caught:
        check_dataset(image(UNDEFINED, ts, tag=tag, value=value), ts)
    assert not isinstance(caught.value, PixelDataMismatch)  # 0xC210, a broken encoding


def item(value: bytes, tag: bytes = b"\xfe\xff\x00\xe0", length: int | None = None) -> bytes:
    return tag + struct.pack("<I", len(value) if length is None else length) + value


DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
FRAGMENTS_OK = item(b"") + item(b"\x01" * 10) + item(b"\x02" * 6) + DELIMITER


def encapsulated(fragments: bytes) -> bytes:
    """An RLE Lossless data set (explicit VR little endian) whose Pixel Data is OB of
    undefined length holding *fragments*, as they are."""
    return image(UNDEFINED, RLELossless, value=fragments).replace(b"OW", b"OB")


def test_encapsulated_pixel_data_with_whole_fragments_passes() -> None:
    """The codestream is not decoded: ten bytes stand for a 4 x 4 x 16 bits image."""
    check_dataset(encapsulated(FRAGMENTS_OK), RLELossless)
    with_offsets = item(struct.pack("<2I", 0, 18)) + item(b"\x01" * 10) + item(b"\x02") + DELIMITER
    check_dataset(encapsulated(with_offsets), RLELossless)


@pytest.mark.parametrize(
    "fragments",
    [
        item(b"") + item(b"\x01" * 10, tag=b"\xfe\xff\x00\xe1") + DELIMITER,  # not an item
        item(b"") + item(b"\x01" * 10, tag=b"\xe0\x7f\x10\x00") + DELIMITER,
        item(b"") + item(b"\x01" * 10, length=1000) + DELIMITER,  # runs past the end
        item(b"") + item(b"\x01" * 10, length=UNDEFINED) + DELIMITER,
        item(b"") + item(b"\x01" * 10),  # no delimiter
        item(b"", length=100),
    ],
)
def test_broken_fragments_are_malformed(fragments: bytes) -> None:
    with pytest.raises(MalformedInput, match="malformed data set") as caught:
        check_dataset(encapsulated(fragments), RLELossless)
    assert not isinstance(caught.value, PixelDataMismatch)


@pytest.mark.parametrize("fragments", [item(b"") + DELIMITER, DELIMITER])
def test_encapsulated_pixel_data_without_a_fragment_is_refused(fragments: bytes) -> None:
    """Only the Basic Offset Table item, or not even that: no image at all."""
    with pytest.raises(PixelDataMismatch, match="encapsulated Pixel Data has no fragment"):
        check_dataset(encapsulated(fragments), RLELossless)


def test_a_ct_slice_cut_to_1000_bytes_is_refused(tmp_path: Path) -> None:
    """The case of the issue: a 512 x 512 CT slice whose Pixel Data was cut to 1,000 bytes
    (its length says so; the data set is otherwise well formed).  The reason fits an
    Error Comment (64 characters); the detail, for the log, names the attributes."""
    f = make_ct_series(tmp_path, count=1)[0]
    body = dataset_bytes(f.read_bytes())
    check_dataset(body, ExplicitVRLittleEndian)
    at = body.index(struct.pack("<HH2sH", 0x7FE0, 0x0010, b"OW", 0))
    cut = body[:at] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 1000) + b"\x00" * 1000
    with pytest.raises(PixelDataMismatch) as caught:
        check_dataset(cut, ExplicitVRLittleEndian)
    message, detail = caught.value.message, caught.value.detail
    assert message == "Pixel Data has 1000 of the 524288 bytes the image needs"
    assert len(message) <= 64
    assert detail == "Rows 512, Columns 512, 1 frame(s), 1 sample(s) of 16 bits"


def test_only_the_top_level_pixel_data_is_measured() -> None:
    """An Icon Image Sequence item has its own Rows, Columns and Pixel Data: they do not
    count for the image, and the icon's pixel data is not measured."""
    icon = Dataset()
    icon.Rows = icon.Columns = 64
    icon.BitsAllocated = 8
    icon.PixelData = b"\x00" * 2
    ds = Dataset()
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 16
    ds.IconImageSequence = Sequence([icon])
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.PixelData = b"\x00" * 32
        check_dataset(encode(ds, ts), ts)
        ds.PixelData = b"\x00" * 30
        with pytest.raises(PixelDataMismatch, match="has 30 of the 32 bytes"):
            check_dataset(encode(ds, ts), ts)


def test_the_detail_names_a_subsampled_photometric_interpretation() -> None:
    ybr = image(31, bits=8, samples=3, photometric="YBR_FULL_422")
    with pytest.raises(PixelDataMismatch) as caught:
        check_dataset(ybr, ExplicitVRLittleEndian)
    detail = "Rows 4, Columns 4, 1 frame(s), 3 sample(s) of 8 bits, YBR_FULL_422"
    assert caught.value.detail == detail


# --- found by fuzzing (tests/fuzz/corpus/dicom_*/regress-*): each was answered 0x0000 --------


def test_an_explicit_vr_that_is_no_dicom_vr_is_malformed() -> None:
    data = encode(sample(), ExplicitVRLittleEndian)
    at = data.index(b"PN")  # (0010,0010) PatientName
    with pytest.raises(MalformedInput, match="invalid VR b'PQ'"):
        check_dataset(data[:at] + b"PQ" + data[at + 2 :], ExplicitVRLittleEndian)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_an_element_twice_in_one_data_set_is_malformed(ts: str) -> None:
    # two values of one attribute: the header read may take the first, a full read the last
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    one = encode(ds, ts)
    with pytest.raises(MalformedInput, match=r"\(0008,0018\) occurs twice"):
        check_dataset(one + one, ts)


def test_an_element_twice_in_one_item_is_malformed() -> None:
    code = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"1 "  # (0008,0100) CodeValue
    for body in (code, code + code):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
        data = struct.pack("<HH2sHI", 0x0008, 0x1032, b"SQ", 0, len(item)) + item
        if body == code:
            check_dataset(data, ExplicitVRLittleEndian)
    with pytest.raises(MalformedInput, match=r"\(0008,0100\) occurs twice"):
        check_dataset(data, ExplicitVRLittleEndian)


def implicit_sequence(code_length: int = 6) -> bytes:
    """(0008,1032) Procedure Code Sequence in implicit VR, defined lengths, one item whose
    (0008,0100) says it is *code_length* bytes long (it is 6)."""
    code = struct.pack("<HHI", 0x0008, 0x0100, code_length) + b"71250 "
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(code)) + code
    return struct.pack("<HHI", 0x0008, 0x1032, len(item)) + item


def test_an_implicit_vr_sequence_of_defined_length_is_walked() -> None:
    check_dataset(implicit_sequence(), ImplicitVRLittleEndian, sequences=SEQUENCE_TAGS)
    broken = implicit_sequence(0x60006)  # runs past its item
    check_dataset(broken, ImplicitVRLittleEndian)  # without the dictionary: opaque bytes
    with pytest.raises(MalformedInput, match=r"\(0008,0100\) needs 393222 bytes"):
        check_dataset(broken, ImplicitVRLittleEndian, sequences=SEQUENCE_TAGS)


def test_un_of_defined_length_on_a_sequence_tag_holds_implicit_vr_items() -> None:
    def as_un(implicit: bytes) -> bytes:  # (0008,1032) with VR UN: its items, as they are
        items = implicit[8:]
        return struct.pack("<HH2sHI", 0x0008, 0x1032, b"UN", 0, len(items)) + items

    check_dataset(as_un(implicit_sequence()), ExplicitVRLittleEndian, sequences=SEQUENCE_TAGS)
    with pytest.raises(MalformedInput, match="needs 393222 bytes"):
        check_dataset(
            as_un(implicit_sequence(0x60006)), ExplicitVRLittleEndian, sequences=SEQUENCE_TAGS
        )


@pytest.mark.parametrize("vr", [b"SQ", b"UN"])
def test_pixel_data_of_undefined_length_is_fragments_only_as_ob_or_ow(vr: bytes) -> None:
    # found by fuzzing (tests/fuzz/corpus/dicom_dataset/regress-pixel-data-sq): (7FE0,0010)
    # with VR SQ was walked as fragments by its tag, and pydicom, reading a sequence,
    # could not read the data set that had been answered 0x0000
    fragments = (
        struct.pack("<HHI", 0xFFFE, 0xE000, 0)  # the basic offset table
        + struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"\x01\x02\x03\x04"
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )  # fmt: skip
    for ok in (b"OB", b"OW"):
        head = struct.pack("<HH2sHI", 0x7FE0, 0x0010, ok, 0, 0xFFFFFFFF)
        check_dataset(head + fragments, RLELossless, sequences=SEQUENCE_TAGS)
    head = struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, 0xFFFFFFFF)
    with pytest.raises(MalformedInput):
        check_dataset(head + fragments, RLELossless, sequences=SEQUENCE_TAGS)
