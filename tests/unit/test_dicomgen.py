"""The synthetic DICOM generator: files read back, carry the asked-for transfer syntaxes,
and a real dcmtk storescp receives every one of them, unconverted, over one association."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)

from tests.dicomgen import (
    DEFAULT_SERIES,
    SeriesSpec,
    dataset_bytes,
    dcmtk_env,
    free_port,
    make_ct_series,
    make_large_instance,
    make_study,
    storescp_args,
    storescu_args,
    wait_for_port,
)

needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("storescp") is None,
    reason="dcmtk (storescu/storescp) is not installed: make system-deps",
)


def test_default_study_reads_back_with_one_study_uid_and_five_transfer_syntaxes(
    tmp_path: Path,
) -> None:
    paths = make_study(tmp_path, patient_name="ROE^RICHARD", accession="ACC42")
    assert len(paths) == sum(s.count for s in DEFAULT_SERIES)
    datasets = [pydicom.dcmread(p) for p in paths]

    syntaxes = Counter(str(ds.file_meta.TransferSyntaxUID) for ds in datasets)
    assert set(syntaxes) == {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        RLELossless,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
    }
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == len(DEFAULT_SERIES)
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(paths)
    for ds in datasets:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.SOPClassUID == (MRImageStorage if ds.Modality == "MR" else CTImageStorage)
        assert str(ds.PatientName) == "ROE^RICHARD"
        assert ds.PatientID == "PID12345"
        assert ds.AccessionNumber == "ACC42"
        for keyword in ("PatientBirthDate", "StudyDescription", "SeriesDescription",
                        "BodyPartExamined", "Manufacturer"):
            assert ds.get(keyword), keyword
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns)
        assert pixels.max() > pixels.min()  # some structure, not a blank image


def test_pixels_survive_every_transfer_syntax(tmp_path: Path) -> None:
    """Same seed, same pixels: what RLE, deflate and big endian decode to equals plain LE."""
    decoded = []
    for ts in (ExplicitVRLittleEndian, RLELossless, DeflatedExplicitVRLittleEndian,
               ExplicitVRBigEndian, ImplicitVRLittleEndian):
        (path,) = make_study(tmp_path / ts.name.replace(" ", "_"),
                             series=[SeriesSpec("CT", 1, 64, 48, ts)], seed=7)
        decoded.append(pydicom.dcmread(path).pixel_array.astype(np.uint16))
    for other in decoded[1:]:
        assert np.array_equal(decoded[0], other)


def test_study_uid_and_custom_series_are_honoured(tmp_path: Path) -> None:
    paths = make_study(tmp_path, study_uid="1.2.3.4", series=[SeriesSpec("US", 2, 32, 32)])
    ds = pydicom.dcmread(paths[0])
    assert ds.StudyInstanceUID == "1.2.3.4"
    assert ds.Modality == "US"
    assert len(paths) == 2


def test_ct_series_is_512_kib_per_slice(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, count=5)
    assert len(paths) == 5
    ds = pydicom.dcmread(paths[-1])
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (512, 512, 16)
    assert len(ds.PixelData) == 512 * 512 * 2
    assert ds.InstanceNumber == 5


def test_large_instance_is_a_valid_multiframe(tmp_path: Path) -> None:
    path = make_large_instance(tmp_path, megabytes=3, rows=256, cols=256)
    assert path.stat().st_size >= 3 * 1024 * 1024
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 24
    assert ds.pixel_array.shape == (24, 256, 256)


def test_free_port_can_be_bound() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@needs_dcmtk
@pytest.mark.timeout(60)
def test_storescu_sends_whole_study_unconverted_to_dcmtk_storescp(tmp_path: Path) -> None:
    """Every file arrives, over one association, in the transfer syntax it was written in."""
    paths = make_study(tmp_path / "in")
    received = tmp_path / "out"
    received.mkdir()
    port = free_port()
    scp = subprocess.Popen(
        storescp_args(received, port=port), env=dcmtk_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port)
        result = subprocess.run(
            storescu_args(paths, port=port, aec="STORESCP", extra=["-v"]),
            env=dcmtk_env(), capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("Association Accepted") == 1
        deadline = time.monotonic() + 10
        while len(list(received.iterdir())) < len(paths) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scp.terminate()
        scp.wait(timeout=10)

    sent = {
        str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID)
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
    }
    got = {
        str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID)
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in received.iterdir())
    }
    assert got == sent


@needs_dcmtk
@pytest.mark.timeout(60)
def test_storescu_args_for_one_transfer_syntax_use_its_propose_option(tmp_path: Path) -> None:
    paths = make_study(tmp_path, series=[SeriesSpec("CT", 2, 32, 32, RLELossless)])
    args = storescu_args(paths, port=104)
    assert args[:3] == ["storescu", "-R", "-xr"]
    assert args[-2:] == [str(p) for p in paths]


def test_dataset_bytes_strips_preamble_and_file_meta(tmp_path: Path) -> None:
    """Same cut as pydicom's own reader makes, for every uncompressed transfer syntax."""
    import io

    from pydicom.filereader import _read_file_meta_info, read_preamble

    series = [SeriesSpec("CT", 1, 16, 16, ts) for ts in (
        ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)]
    for path in make_study(tmp_path, series=series):
        raw = path.read_bytes()
        fp = io.BytesIO(raw)
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        assert dataset_bytes(raw) == fp.read()
        assert dataset_bytes(raw[128:]) == dataset_bytes(raw)  # no preamble, starts at DICM
