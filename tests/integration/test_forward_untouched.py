"""Forwarding leaves instances untouched (issue 15): pydicom's own test files go through a
forward route and arrive at the destination with the very data set bytes they were sent
with, group length elements (gggg,0000) included.

Sender: a pynetdicom SCU with its chunked send, which streams a Part 10 file's data set as
it is encoded (never decoded), each file over a presentation context proposing only its
own transfer syntax, so what the gateway receives is exactly the file's data set.
(dcmtk's storescu decodes each file and encodes it again before sending: tried
straight into a bit-preserving storescp, 7 of these 13 data sets arrived changed.)
Receiver: dcmtk storescp accepting every transfer syntax (``+xa``) and writing what it
receives bit for bit (``+B``), every instance under its own name (``+uf``: a resent
instance would show).

Each file is sent as a Part 10 file with its data set bytes as in pydicom's copy and a
file meta made for it: ``rtstruct.dcm`` has no file meta at all, and the file meta of
``rtplan.dcm`` and ``rtdose.dcm`` names another SOP instance than their data sets (a
C-STORE names the instance of the file meta, so the gateway would refuse them as a data
set not matching the request).  Files that share a SOP Instance UID (pydicom's
``MR_small*`` family and its JPEG variants) are represented by one of them.

One file cannot pass unchanged: the deflated data set of ``image_dfl.dcm`` has an odd
length, without the trailing NUL that PS3.5 A.5 pads a deflated stream with.  Sent as it
is, it makes an odd P-DATA fragment, which storescp refuses by aborting the association
("Odd Fragment Length"): the instance could never be delivered.  The gateway stores it as
received and sends it with that one NUL byte added; everything before it is unchanged.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from tests.dicomgen import dataset_bytes, dcmtk_env, free_port, storescp_args, wait_for_port
from tests.gatewayproc import GatewayProcess, wait_until, write_config


@dataclass(frozen=True)
class Sample:
    name: str  # a file of pydicom.data's test files (shipped with pydicom, no download)
    covers: str


SAMPLES = (
    Sample("693_J2KI.dcm", "CT, JPEG 2000, group lengths (gggg,0000) in 7 groups"),
    Sample("ExplVR_BigEnd.dcm", "US, explicit VR big endian, group lengths in 6 groups"),
    Sample("CT_small.dcm", "CT, explicit VR little endian"),
    Sample("MR_small_jpeg_ls_lossless.dcm", "MR, JPEG-LS lossless"),
    Sample("SC_rgb_jpeg_dcmtk.dcm", "SC, JPEG baseline, RGB"),
    Sample("SC_rgb_rle_2frame.dcm", "SC, RLE lossless, multi-frame"),
    Sample("image_dfl.dcm", "SC, deflated explicit VR little endian"),
    Sample("rtplan.dcm", "RTPLAN, implicit VR little endian"),
    Sample("rtdose.dcm", "RTDOSE, implicit VR, multi-frame (15 frames)"),
    Sample("rtstruct.dcm", "RTSTRUCT, implicit VR, pydicom's copy has no file meta"),
    Sample("test-SR.dcm", "Comprehensive SR, nested sequences"),
    Sample("waveform_ecg.dcm", "12-lead ECG waveform"),
    Sample("liver_1frame.dcm", "Segmentation"),
)
WITH_GROUP_LENGTHS = {"693_J2KI.dcm", "ExplVR_BigEnd.dcm"}
ODD_DEFLATED = {"image_dfl.dcm"}  # arrives with the NUL pad byte of PS3.5 A.5 (see above)


def part10(sample: Sample, folder: Path) -> Path:
    """*sample* as a Part 10 file: preamble, a file meta naming the data set's SOP class and
    instance and the source's transfer syntax, then the source's data set bytes."""
    source = get_testdata_file(sample.name, download=False)
    assert isinstance(source, str), f"{sample.name} is not among pydicom's test files"
    raw = Path(source).read_bytes()
    ds = dcmread(BytesIO(raw), force=True, stop_before_pixels=True)
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
    meta = create_file_meta(
        sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=syntax
    )
    path = folder / sample.name
    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + dataset_bytes(raw))
    return path


def group_lengths(data: bytes) -> list[str]:
    """The group length elements (gggg,0000) at the top level of a Part 10 data set."""
    ds = dcmread(BytesIO(data), stop_before_pixels=True)
    return [str(e.tag) for e in ds if e.tag.element == 0]


def send_as_encoded(paths: list[Path], port: int) -> list[int]:
    """C-STORE *paths* over one association, each data set streamed as it is encoded."""
    ae = AE(ae_title="STORESCU")
    metas = [dcmread(p, stop_before_pixels=True).file_meta for p in paths]
    for pair in dict.fromkeys((m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for m in metas):
        ae.add_requested_context(*pair)  # one syntax per context: none can be swapped
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A bit-preserving storescp accepting every transfer syntax: (port, output folder)."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        [*storescp_args(out, port=port), "+B", "+uf"],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    yield port, out
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("receive_to_disk", [False, True], ids=["in-memory", "to-disk"])
def test_pydicom_test_files_are_forwarded_byte_for_byte(
    tmp_path: Path,
    storescp: tuple[int, Path],
    monkeypatch: pytest.MonkeyPatch,
    receive_to_disk: bool,
) -> None:
    scp_port, received = storescp
    sent_dir = tmp_path / "sent"
    sent_dir.mkdir()
    paths = [part10(s, sent_dir) for s in SAMPLES]
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    assert len(sent) == len(paths)  # distinct instances: none is a duplicate of another
    for path in paths:
        assert bool(group_lengths(path.read_bytes())) == (path.name in WITH_GROUP_LENGTHS)
        assert len(dataset_bytes(path.read_bytes())) % 2 == (path.name in ODD_DEFLATED)
    studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in paths}

    config = write_config(
        tmp_path,
        dicom={"study_complete_after": 1, "receive_to_disk": receive_to_disk},
        destinations={
            "pacs": {"dicom": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp_port}}
        },
        routes=[
            {"name": "all", "when": {"dicom": {"calling_ae": "STORESCU"}}, "forward": ["pacs"]}
        ],
    )
    gw = GatewayProcess(config, tmp_path / "gw.log").start()
    try:
        # the test's own SCU streams each file's data set as it is encoded
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        assert send_as_encoded(paths, gw.dicom_port) == [0x0000] * len(paths)
        wait_until(
            "every study forwarded",
            lambda: gw.queue_status()["jobs:deliver"].get("done", 0) == len(studies),
            timeout=30,
        )
        status = gw.queue_status()
    finally:
        gw.stop()
    assert status["jobs:deliver"] == {"done": len(studies)}, status

    arrived = {
        str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f.read_bytes()
        for f in received.iterdir()
    }
    assert sorted(arrived) == sorted(sent)  # each instance exactly once
    changed = []
    for uid, path in sent.items():
        data, got = path.read_bytes(), arrived[uid]
        syntax = dcmread(BytesIO(got), stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert syntax == dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        pad = b"\x00" if path.name in ODD_DEFLATED else b""
        if dataset_bytes(got) != dataset_bytes(data) + pad:
            changed.append(path.name)
        assert group_lengths(got) == group_lengths(data), path.name
    assert changed == [], f"data set bytes changed on the way: {changed}"
