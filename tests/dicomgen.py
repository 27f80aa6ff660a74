"""Synthetic DICOM Part 10 files for tests and benchmarks (pydicom + numpy, no real data).

Typical use::

    from tests.dicomgen import make_study, storescu_args, free_port

    paths = make_study(tmp_path)                       # 5 series, 5 transfer syntaxes
    subprocess.run(storescu_args(paths, port=port, aec="AI_GATEWAY"), check=True,
                   env=dcmtk_env())

Every instance carries a proper SOP class, fresh UIDs (one StudyInstanceUID shared by all
series, one SeriesInstanceUID per series), the usual patient/study/series attributes and
pixel data with some structure (a bright sphere in a noisy background), so a model or a
viewer sees something plausible. Files are written in the DICOM File Format with valid
file meta information, in the transfer syntax that the series asks for.

Sending each file in its own transfer syntax with dcmtk ``storescu`` (3.6.x) takes an
association profile (``-xf``) with one presentation context per (SOP class, transfer
syntax) found in the files; ``-R`` alone still converts everything to an uncompressed
syntax. :func:`storescu_args` builds the right command line.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    PositronEmissionTomographyImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

__all__ = [
    "DEFAULT_SERIES",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "SeriesSpec",
    "dataset_bytes",
    "dcmtk_env",
    "free_port",
    "iter_transfer_syntaxes",
    "make_ct_series",
    "make_large_instance",
    "make_study",
    "storescp_args",
    "storescu_args",
    "storescu_profile",
    "wait_for_port",
]

#: SOP class per modality; anything not listed becomes Secondary Capture.
SOP_CLASS_BY_MODALITY: dict[str, UID] = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "PT": PositronEmissionTomographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "US": UltrasoundImageStorage,
}

#: Transfer syntaxes this module can write with plain pydicom 3 + numpy (no extra codecs).
SUPPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
)

_UNCOMPRESSED = {
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
}


@dataclass(frozen=True)
class SeriesSpec:
    """One series of a synthetic study: what kind, how many instances, how big, how encoded."""

    modality: str = "CT"
    count: int = 3
    rows: int = 512
    cols: int = 512
    transfer_syntax: str = ExplicitVRLittleEndian
    body_part: str = "CHEST"
    description: str | None = None

    def __post_init__(self) -> None:
        if self.count < 1 or self.rows < 1 or self.cols < 1:
            raise ValueError(f"count, rows and cols must be >= 1, got {self}")
        if UID(self.transfer_syntax) not in SUPPORTED_TRANSFER_SYNTAXES:
            raise ValueError(
                f"transfer syntax {self.transfer_syntax} is not one of "
                f"{[str(u) for u in SUPPORTED_TRANSFER_SYNTAXES]}"
            )

    @property
    def sop_class(self) -> UID:
        return SOP_CLASS_BY_MODALITY.get(self.modality.upper(), SecondaryCaptureImageStorage)


#: The default study: five series, five transfer syntaxes.
DEFAULT_SERIES: tuple[SeriesSpec, ...] = (
    SeriesSpec("CT", 4, 512, 512, ExplicitVRLittleEndian, "CHEST", "CT CHEST 5mm"),
    SeriesSpec("MR", 3, 256, 256, ImplicitVRLittleEndian, "BRAIN", "MR T1 AX"),
    SeriesSpec("CT", 3, 256, 256, RLELossless, "CHEST", "CT CHEST RLE"),
    SeriesSpec("CT", 2, 128, 128, DeflatedExplicitVRLittleEndian, "ABDOMEN", "CT ABD DEFLATED"),
    SeriesSpec("CT", 2, 128, 128, ExplicitVRBigEndian, "PELVIS", "CT PELVIS BIG ENDIAN"),
)


# --- pixels ----------------------------------------------------------------------------


@dataclass
class _Phantom:
    """A sphere in a noisy body-sized ellipse, sliced along z; stored values are 12-bit."""

    rows: int
    cols: int
    slices: int
    rng: np.random.Generator
    _r2: np.ndarray = field(init=False, repr=False)
    _body: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        y, x = np.ogrid[: self.rows, : self.cols]
        cy, cx = (self.rows - 1) / 2, (self.cols - 1) / 2
        ny, nx = (y - cy) / (self.rows / 2), (x - cx) / (self.cols / 2)
        self._r2 = (nx * nx + ny * ny).astype(np.float32)
        self._body = ((nx / 0.9) ** 2 + (ny / 0.7) ** 2) <= 1.0

    def slice(self, index: int) -> np.ndarray:
        z = 0.0 if self.slices == 1 else (2.0 * index / (self.slices - 1) - 1.0)
        radius2 = max(0.0, 0.35**2 * (1.0 - z * z))
        img = self.rng.integers(0, 40, size=(self.rows, self.cols), dtype=np.uint16)
        img[self._body] += 1024  # water (0 HU with intercept -1024)
        img[self._r2 <= radius2] += 400  # the "lesion"
        return img


# --- datasets --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Study:
    patient_name: str
    patient_id: str
    accession: str
    study_uid: str
    study_date: str = "20240102"
    study_time: str = "101500"


def _base_dataset(study: _Study, spec: SeriesSpec, series_number: int, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = spec.sop_class
    # Patient
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    # General Study
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = "REFERRER^ROB"
    ds.StudyID = "1"
    ds.AccessionNumber = study.accession
    ds.StudyDescription = "SYNTHETIC STUDY"
    # General Series
    ds.Modality = spec.modality.upper()
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = spec.description or f"{spec.modality.upper()} SERIES {series_number}"
    ds.BodyPartExamined = spec.body_part
    ds.PatientPosition = "HFS"
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    # Frame of Reference + General Equipment
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "SYNTHETIC"
    ds.ManufacturerModelName = "dicomgen"
    ds.InstitutionName = "TEST HOSPITAL"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    # Image Plane
    ds.PixelSpacing = [round(350.0 / spec.cols, 4), round(350.0 / spec.rows, 4)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 5.0
    modality = ds.Modality
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.WindowCenter = 40
        ds.WindowWidth = 400
    elif modality == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500.0
        ds.EchoTime = 15.0
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        if spec.sop_class == SecondaryCaptureImageStorage:
            ds.ConversionType = "WSD"
    ds.ContentDate = study.study_date
    ds.ContentTime = study.study_time
    return ds


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationVersionName = "DICOMGEN_1"
    return meta


def _set_pixels(ds: Dataset, pixels: np.ndarray, transfer_syntax: UID) -> None:
    """Put ``pixels`` (uint16, native order) into ``ds`` encoded for ``transfer_syntax``."""
    if transfer_syntax == RLELossless:
        # pydicom 3 ships a pure numpy RLE encoder: no extra package needed. compress()
        # wants to know the current (uncompressed) state from the file meta.
        ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
        ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
        return
    if transfer_syntax == ExplicitVRBigEndian:
        # dcmwrite does not byte-swap OW values: hand it big endian words.
        ds.PixelData = pixels.astype(">u2").tobytes()
    else:
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"


def _write(ds: Dataset, path: Path, transfer_syntax: UID) -> None:
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax)
    dcmwrite(
        path,
        ds,
        implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
        little_endian=transfer_syntax != ExplicitVRBigEndian,
        enforce_file_format=True,
    )


def _write_series(
    folder: Path,
    study: _Study,
    spec: SeriesSpec,
    series_number: int,
    rng: np.random.Generator,
    prefix: str,
) -> list[Path]:
    ts = UID(spec.transfer_syntax)
    series_uid = generate_uid()
    phantom = _Phantom(spec.rows, spec.cols, spec.count, rng)
    ds = _base_dataset(study, spec, series_number, series_uid)
    paths: list[Path] = []
    for i in range(spec.count):
        if ts == RLELossless:
            # compress() changes the dataset; start every instance from a fresh one.
            ds = _base_dataset(study, spec, series_number, series_uid)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        z = -float(i) * float(ds.SliceThickness)
        ds.ImagePositionPatient = [-175.0, -175.0, z]
        ds.SliceLocation = z
        _set_pixels(ds, phantom.slice(i), ts)
        path = folder / f"{prefix}{series_number:02d}_{spec.modality.upper()}_{i + 1:04d}.dcm"
        _write(ds, path, ts)
        paths.append(path)
    return paths


# --- public API ------------------------------------------------------------------------


def make_study(
    folder: Path | str,
    *,
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID12345",
    accession: str = "ACC0001",
    study_uid: str | None = None,
    series: Sequence[SeriesSpec] = DEFAULT_SERIES,
    seed: int = 0,
) -> list[Path]:
    """Write one study (all series share ``study_uid``) under ``folder``; return the files.

    ``series`` defaults to :data:`DEFAULT_SERIES`: CT 512x512 Explicit VR LE, MR 256x256
    Implicit VR LE, CT RLE Lossless, CT Deflated Explicit VR LE and CT Explicit VR Big
    Endian. Use e.g. ``[SeriesSpec("MR", count=10, rows=64, cols=64)]`` for something else.
    UIDs are fresh on each call; ``seed`` fixes the pixel noise only.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study = _Study(patient_name, patient_id, accession, study_uid or generate_uid())
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for number, spec in enumerate(series, start=1):
        paths += _write_series(folder, study, spec, number, rng, prefix="s")
    return paths


def make_ct_series(
    folder: Path | str,
    count: int = 300,
    rows: int = 512,
    cols: int = 512,
    *,
    patient_name: str = "DOE^JOHN",
    patient_id: str = "PID-BENCH",
    accession: str = "ACCBENCH",
    study_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
) -> list[Path]:
    """Write one CT series of ``count`` slices (512x512x16 bit = 512 KiB each by default).

    Fast enough for benchmarks: 300 slices take about a second.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study = _Study(patient_name, patient_id, accession, study_uid or generate_uid())
    spec = SeriesSpec("CT", count, rows, cols, transfer_syntax, "CHEST", "CT CHEST BENCH")
    return _write_series(folder, study, spec, 1, np.random.default_rng(seed), prefix="ct")


def make_large_instance(
    folder: Path | str,
    megabytes: float = 64,
    *,
    rows: int = 512,
    cols: int = 512,
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID12345",
    study_uid: str | None = None,
    seed: int = 0,
) -> Path:
    """Write one multi-frame instance with at least ``megabytes`` MiB of pixel data.

    Multi-frame Grayscale Word Secondary Capture, Explicit VR Little Endian. The pixel data
    is streamed to the file frame by frame, so a multi-GB instance needs only one frame of
    memory here, while a receiver that buffers whole datasets will notice.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame_bytes = rows * cols * 2
    frames = max(1, math.ceil(megabytes * 1024 * 1024 / frame_bytes))
    if frames * frame_bytes >= 0xFFFFFFFE:
        raise ValueError(f"{megabytes} MiB does not fit one defined-length Pixel Data element")
    study = _Study(patient_name, patient_id, "ACCLARGE", study_uid or generate_uid())
    spec = SeriesSpec("OT", 1, rows, cols, ExplicitVRLittleEndian, "CHEST", "LARGE MULTIFRAME")
    ds = _base_dataset(study, spec, 1, generate_uid())
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 100.0
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP", "SliceThickness"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    path = folder / f"large_{frames}x{rows}x{cols}.dcm"
    _write(ds, path, ExplicitVRLittleEndian)
    phantom = _Phantom(rows, cols, frames, np.random.default_rng(seed))
    with path.open("ab") as f:
        # (7FE0,0010) OW, explicit VR little endian, 4-byte length: the last element.
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame_bytes))
        for i in range(frames):
            f.write(phantom.slice(i).astype("<u2").tobytes())
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, ask, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on ``host:port``; TimeoutError if not."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(
            (host, port), timeout=0.5
        ) as s:
            # A port from the ephemeral range can "connect" to itself (TCP simultaneous
            # open) while nobody listens yet: that is not a server.
            if s.getsockname() != s.getpeername():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(0.05)


def dcmtk_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for dcmtk tools: ``TCP_NODELAY=1`` (dcmtk leaves Nagle on by default,
    which adds ~40 ms stalls per small PDU on loopback)."""
    env = dict(os.environ if base is None else base)
    env["TCP_NODELAY"] = "1"
    return env


#: storescu's own option that proposes a transfer syntax first (and gives it its own
#: presentation context), for a batch of files that all use that one transfer syntax.
STORESCU_PROPOSE_OPTION: dict[str, str] = {
    ExplicitVRLittleEndian: "-xe",
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd",
    RLELossless: "-xr",
}


def storescu_profile(paths: Sequence[Path | str], config_file: Path | str) -> Path:
    """Write a storescu association profile (``-xf FILE Send``) with one presentation
    context per (SOP class, transfer syntax) pair found in ``paths``, each proposing only
    that transfer syntax, so every file goes over the wire exactly as it is stored."""
    from pydicom.filereader import read_file_meta_info

    pairs: dict[tuple[str, str], None] = {}
    for p in paths:
        meta = read_file_meta_info(p)
        pairs[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    if len(pairs) > 128:
        raise ValueError(f"{len(pairs)} presentation contexts needed, DICOM allows 128")
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes, start=1):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["", "[[PresentationContexts]]", "[SendContexts]"]
    for n, (sop, ts) in enumerate(pairs, start=1):
        lines.append(f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts) + 1}")
    lines += ["", "[[Profiles]]", "[Send]", "PresentationContexts = SendContexts", ""]
    config_file = Path(config_file)
    config_file.write_text("\n".join(lines), encoding="ascii")
    return config_file


def storescu_args(
    paths: Sequence[Path | str],
    *,
    port: int,
    host: str = "127.0.0.1",
    aet: str = "PACS",
    aec: str = "AI_GATEWAY",
    profile_dir: Path | str | None = None,
    halt: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The dcmtk ``storescu`` (3.6.x) command line that sends ``paths`` over ONE
    association, each file in the transfer syntax it is stored in.

    How storescu picks a transfer syntax: it looks for an accepted presentation context
    whose transfer syntax is the file's own, and otherwise converts the file to whatever
    context was accepted for its SOP class (and fails for RLE it cannot decode). ``-R``
    alone is not enough: it limits the SOP classes to those in the files but still proposes
    only the uncompressed syntaxes. So:

    - all files in one transfer syntax: the matching ``--propose-*`` option
      (:data:`STORESCU_PROPOSE_OPTION`: ``-xe`` explicit LE, ``-xi`` implicit LE, ``-xb``
      big endian, ``-xd`` deflated, ``-xr`` RLE) plus ``-R``; that syntax gets its own
      presentation context, so no conversion happens.
    - mixed transfer syntaxes: an association profile written by :func:`storescu_profile`
      to ``profile_dir`` (default: the first file's folder) and ``-xf FILE Send``: one
      context per (SOP class, transfer syntax), each with only that syntax.
    - ``halt=True`` (the default): storescu stops at the first C-STORE that fails or gets
      a non-success status and exits non-zero (e.g. 167), so ``returncode == 0`` means
      every file got 0x0000. ``halt=False`` adds ``-nh`` (``--no-halt``): it goes on after a
      failure, and then exits 0 even though some stores failed (dcmtk 3.6.7); add ``-v`` to
      ``extra`` and read the "Received Store Response" lines if you need the statuses.

    storescu sends every file of one invocation over a single association (one
    A-ASSOCIATE, one C-STORE per file, one A-RELEASE). Run it with :func:`dcmtk_env`
    (``TCP_NODELAY=1``).
    """
    from pydicom.filereader import read_file_meta_info

    if not paths:
        raise ValueError("no files to send")
    syntaxes = {str(read_file_meta_info(p).TransferSyntaxUID) for p in paths}
    if len(syntaxes) == 1 and (ts := syntaxes.pop()) in STORESCU_PROPOSE_OPTION:
        negotiation = ["-R", STORESCU_PROPOSE_OPTION[ts]]
    else:
        folder = Path(profile_dir) if profile_dir is not None else Path(paths[0]).parent
        profile = storescu_profile(paths, folder / "storescu-profile.cfg")
        negotiation = ["-xf", str(profile), "Send"]
    return [
        "storescu",
        *negotiation,
        *([] if halt else ["-nh"]),
        "-aet",
        aet,
        "-aec",
        aec,
        *extra,
        host,
        str(port),
        *(str(p) for p in paths),
    ]


def storescp_args(output_dir: Path | str, *, port: int, aet: str = "STORESCP") -> list[str]:
    """A reference dcmtk ``storescp`` on ``port`` that accepts every transfer syntax it knows
    (``+xa``), writes each received instance to ``output_dir`` (``-od``) in the transfer
    syntax it arrived in (the default ``+t=``), and skips DNS lookups (``-dhl``)."""
    return ["storescp", "+xa", "-dhl", "-aet", aet, "-od", str(output_dir), str(port)]


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def dataset_bytes(data: bytes) -> bytes:
    """The data set of a Part 10 stream: ``data`` without preamble, ``DICM`` and the file
    meta information (group 0002, always explicit VR little endian). This is what goes over
    the wire in a C-STORE, so a receiver that keeps the bytes "as sent" can be compared
    with the file that was sent."""
    if data[128:132] == b"DICM":
        pos = 132
    elif data[:4] == b"DICM":
        pos = 4
    else:
        pos = 0
    while pos + 8 <= len(data):
        group, _element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return data[pos:]


def iter_transfer_syntaxes(paths: Sequence[Path]) -> Iterator[tuple[Path, UID]]:
    """(path, transfer syntax) for each file, reading the file meta only."""
    from pydicom.filereader import read_file_meta_info

    for p in paths:
        yield p, UID(read_file_meta_info(p).TransferSyntaxUID)
