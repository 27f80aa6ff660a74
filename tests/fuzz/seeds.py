"""The seed corpora: small, synthetic inputs for each target, written by
``python -m tests.fuzz seeds`` into ``tests/fuzz/corpus/TARGET/`` (committed).

A seed is a starting point for the fuzzer, not a test: a few valid inputs of each kind the
target reads (so that mutations start deep in the code) and a few invalid ones (so that
the refusals are covered from the first run).  Files named ``regress-*`` are reproducers of
bugs the fuzzer found, kept with the seeds; this module does not write or delete them.
"""

from __future__ import annotations

import struct
import tempfile
import textwrap
import zlib
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from tests.dicomgen import SeriesSpec, dataset_bytes, make_study
from tests.fuzz import CORPUS, TARGETS
from tests.fuzz.dicomscp import SYNTAXES
from tests.hl7msgs import oru_r01

CT = "1.2.840.10008.5.1.4.1.1.2"
SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.1"
STUDY = "1.2.826.0.1.3680043.8.498.2"


def _encode(ds: Dataset, syntax: str) -> bytes:
    buf = DicomBytesIO()
    buf.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buf.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(buf, ds)
    data = buf.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = packer.compress(data) + packer.flush()
    return data


def _small(*, pixels: bytes | None = None, syntax: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = SOP_INSTANCE
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    ds.Manufacturer = "FUZZ"
    ds.StudyDescription = "CT CHEST"
    item = Dataset()
    item.CodeValue = "71250"
    item.CodingSchemeDesignator = "CPT"
    item.CodeMeaning = "CT chest"
    ds.ProcedureCodeSequence = Sequence([item, item])
    ds.PatientName = "FUZZ^PATIENT"
    ds.PatientID = "FUZZ01"
    ds.SliceThickness = "2.5"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = STUDY + ".1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if pixels is not None:
        ds.PixelData = pixels
        ds["PixelData"].VR = "OB"
        if syntax == RLELossless:
            ds["PixelData"].is_undefined_length = True
    return ds


def dicom_data_sets() -> dict[str, tuple[str, bytes]]:
    """name -> (transfer syntax, data set bytes)."""
    sets: dict[str, tuple[str, bytes]] = {}
    for syntax in SYNTAXES:
        short = syntax.name.lower().replace(" ", "-")
        pixels = (
            encapsulate([b"\x01\x02\x03\x04"]) if syntax == RLELossless else b"\x00\x01\x02\x03"
        )
        sets[f"{short}"] = (syntax, _encode(_small(pixels=pixels, syntax=syntax), syntax))
    # a private sequence (explicit VR SQ), and the same as UN of undefined length, whose
    # items are implicit VR little endian (PS3.5 6.2.2)
    ds = _small()
    private = Dataset()
    private.add_new(0x00091010, "LO", "FUZZ")
    ds.add_new(0x00090010, "LO", "FUZZ CREATOR")
    ds.add_new(0x00091011, "SQ", Sequence([private]))
    explicit = _encode(ds, ExplicitVRLittleEndian)
    sets["explicit-private-sequence"] = (ExplicitVRLittleEndian, explicit)
    del ds[0x00091011]
    item = _encode(private, ImplicitVRLittleEndian)
    un = (
        struct.pack("<HH2sHI", 0x0009, 0x1011, b"UN", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, len(item))
        + item
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    without = _encode(ds, ExplicitVRLittleEndian)
    at = without.index(b"\x10\x00\x10\x00PN")  # (0010,0010) follows (0009,1011)
    sets["explicit-un-sequence"] = (ExplicitVRLittleEndian, without[:at] + un + without[at:])
    sets["empty"] = (ExplicitVRLittleEndian, b"")
    sets["cut-short"] = (ExplicitVRLittleEndian, explicit[:-5])
    # generated CT instances (tests/dicomgen.py), 4 x 4 pixels: real headers
    with tempfile.TemporaryDirectory() as tmp:
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless):
            (path,) = make_study(
                Path(tmp) / syntax.name,
                series=[SeriesSpec("CT", count=1, rows=4, cols=4, transfer_syntax=syntax)],
            )
            short = syntax.name.lower().replace(" ", "-")
            sets[f"dicomgen-{short}"] = (syntax, dataset_bytes(path.read_bytes()))
    return sets


def _part10(syntax: str, body: bytes) -> bytes:
    meta = Dataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = SOP_INSTANCE
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.3"
    encoded = _encode(meta, ExplicitVRLittleEndian)
    length = Dataset()
    length.FileMetaInformationGroupLength = len(encoded)
    return _encode(length, ExplicitVRLittleEndian) + encoded + body  # after preamble + DICM


def _pdata(syntax_index: int, body: bytes, max_pdu: int) -> bytes:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = SOP_INSTANCE
    request.Priority = 2
    request.DataSet = BytesIO(body)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    out = b""
    for primitive in message.encode_msg(2 * syntax_index + 1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    return out


def hl7_messages() -> dict[str, bytes]:
    msh = "MSH|^~\\&|EHR|HOSP|AI_GATEWAY|AI|20260101120000||"
    return {
        "oru-r01": oru_r01(),
        "oru-r01-v23": oru_r01(version="2.3"),
        "adt-a01-lf": (msh + "ADT^A01^ADT_A01|C1|P|2.5\nEVN|A01\nPID|1||X^^^H^MR\n").encode(),
        "adt-enhanced": (msh + "ADT^A08|C2|P|2.5.1|||AL|NE||8859/1\rPID|1\r").encode(),
        "v27-truncation": b"MSH|^~\\&#|EHR|HOSP|GW|AI|20260101||ORU^R01^ORU_R01|C3|P|2.7\r"
        b"OBX|1|TX|||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\P\\g\r",
        "escapes": (
            msh + "ORU^R01|C\\F\\4|P|2.5\r"
            "OBX|1|FT|||line\\.br\\two\\.sp 2\\\\X41\\\\H\\bold\\N\\\\Zlocal\\\r"
        ).encode(),
        "other-separators": b"MSH#:!?*#EHR#HOSP#GW#AI#20260101##ORU:R01#C5#P#2.5\r",
        "continuation": (msh + "ORU^R01|C6|P|2.5\rOBX|1|TX|||first line\nsecond line\r").encode(),
        "utf8": (msh + "ORU^R01|C7|P|2.5|||||UNICODE UTF-8\rPID|1||||MÜLLER^ÉVA\r").encode(),
        "latin1": (msh + "ORU^R01|C8|P|2.5\rPID|1||||MÜLLER\r").encode("latin-1"),
        "bom-framed": b"\x0b\xef\xbb\xbf" + oru_r01(control_id="C9") + b"\x1c\r",
        "batch": b"FHS|^~\\&|EHR\rBHS|^~\\&|EHR\r"
        + oru_r01(control_id="B1")
        + b"\r\n"
        + oru_r01(control_id="B2")
        + b"BTS|2\rFTS|1\r",
        "no-msh": b"PID|1||X\r",
        "bad-separators": b"MSH|^~\\|EHR|HOSP\r",
        "no-control-id": (msh + "ORU^R01||P|2.5\r").encode(),
        "bad-version": (msh + "ORU^R01|C10|P|9.9\r").encode(),
        "bad-type": (msh + "O^R01|C11|P|2.5\r").encode(),
    }


def mllp_streams() -> dict[str, bytes]:
    one = b"\x0b" + oru_r01() + b"\x1c\r"
    two = one + b"\n" + b"\x0b" + oru_r01(control_id="M2") + b"\x1c\r\r\n"
    return {
        # selector bytes: limit / max_bytes, then the piece size
        "one-frame": bytes([0x37, 0x06]) + one,
        "two-frames-small-pieces": bytes([0x36, 0x00]) + two,
        "small-limit": bytes([0x32, 0x02]) + two,
        "too-big": bytes([0x1F, 0x05]) + one,
        "garbage-between": bytes([0x37, 0x04]) + one + b"x" + one,
        "lost-end-block": bytes([0x37, 0x04]) + b"\x0bMSH|^~\\&|A\x0bMSH|^~\\&|B\x1c\r",
        "end-inside": bytes([0x37, 0x01]) + b"\x0bMSH|^~\\&|\x1cX\x1c\r",
        "cut-short": bytes([0x37, 0x03]) + one[:-1],
        "empty-frames": bytes([0x30, 0x01]) + b"\x0b\x1c\r\x0b\x1c\r",
    }


def config_files() -> dict[str, bytes]:
    minimal = textwrap.dedent("""\
        dicom:
          allowed_callers:
            - {ae_title: PACS, hosts: [127.0.0.1]}
        hl7:
          allowed_senders:
            - {application: EHR, facility: HOSP, hosts: [127.0.0.1]}
        """)
    full = textwrap.dedent("""\
        gateway:
          data_dir: ../var
          database: postgresql://gateway@db.example:5432/gateway
          database_password_file: ./pw
          retention_days: 7
          inference: {processes: 2, device: cpu}
        dicom:
          ae_title: AI_GATEWAY
          port: null
          tls: {port: 11113, cert: c.pem, key: k.pem, ca: ca.pem}
          allowed_callers:
            - {ae_title: PACS, hosts: [10.0.0.0/8, pacs.example], cert_subject: "CN=pacs,O=H"}
          receive_to_disk: true
        hl7:
          allowed_senders:
            - {application: EHR, hosts: ["*"]}
          max_frame_bytes: 2048
        ingest: {processes: 2}
        workers: {processes: 2, lease_seconds: 30}
        destinations:
          pacs: {dicom: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}, one_at_a_time: true}
          ehr:
            hl7: {host: ehr.example, port: 2576, tls: {ca: ca.pem, cert: c.pem, key: k.pem}}
            retry: {initial: 1, max: 60, give_up_after: 3600}
        models:
          m: {bundle: ../models/m, timeout: 10, memory_mb: 512, deidentify: true}
        routes:
          - name: ct
            when: {dicom: {Modality: [CT, MR], BodyPartExamined: {regex: "^CHEST"},
                           calling_ae: PACS}}
            run: [m]
            send: [pacs]
            forward: [pacs]
          - name: reports
            when: {hl7: {MSH-9: ORU^R01, OBX-3: {present: true}}}
            send: [ehr]
        """)
    anchors = minimal + textwrap.dedent("""\
        destinations:
          a: &dest {dicom: {ae_title: A, host: 127.0.0.1, port: 104}}
          b: *dest
        """)
    return {
        "shipped": (Path(__file__).resolve().parents[2] / "config" / "gateway.yaml").read_bytes(),
        "minimal": minimal.encode(),
        "full": full.encode(),
        "anchors": anchors.encode(),
        "duplicate-key": (minimal + "hl7: {}\n").encode(),
        "unknown-key": (minimal + "dicom_typo: 1\n").encode(),
        "bad-references": (
            minimal + "routes:\n  - {name: r, when: {hl7: {}}, run: [nope]}\n"
            "  - {name: r, when: {dicom: {X: 1}}, send: [x]}\n"
        ).encode(),
        "not-a-mapping": b"- a\n- b\n",
        "empty": b"",
        "bad-yaml": b"dicom: [\n",
    }


def write(corpus: Path = CORPUS) -> dict[str, int]:
    """(Re)write the generated seeds of every target; return how many each has."""
    seeds: dict[str, dict[str, bytes]] = {t: {} for t in TARGETS}
    for name, (syntax, body) in dicom_data_sets().items():
        index = SYNTAXES.index(syntax)
        seeds["dicom_dataset"][name] = bytes([index]) + body
        if name in ("explicit-vr-little-endian", "implicit-vr-little-endian", "empty"):
            seeds["dicom_dataset"][f"{name}-on-disk"] = bytes([0x80 | index]) + body
        seeds["dicom_file"][name] = _part10(syntax, body)
        if not name.startswith("dicomgen") and name != "cut-short":
            seeds["dicom_pdata"][name] = _pdata(index, body, 16384)
    seeds["dicom_pdata"]["fragmented"] = _pdata(
        1, dicom_data_sets()["explicit-vr-little-endian"][1], 64
    )
    for name, message in hl7_messages().items():
        seeds["hl7_message"][name] = message
        seeds["hl7_ack"][name] = message
    seeds["mllp"] = mllp_streams()
    seeds["config"] = config_files()
    counts = {}
    for target, files in seeds.items():
        folder = corpus / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if not old.name.startswith("regress-"):
                old.unlink()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        counts[target] = len(list(folder.iterdir()))
    return counts
