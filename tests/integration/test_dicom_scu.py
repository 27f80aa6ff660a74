"""The C-STORE SCU against real peers on 127.0.0.1: dcmtk storescp as the reference PACS,
and a pynetdicom SCP where a test needs a particular status or rejection."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from structlog.testing import capture_logs

import gateway.deliver.dicom_scu as dicom_scu
from gateway.config import DicomDestination
from gateway.deliver import DeliveryRefused, DeliveryRetry, Outcome
from gateway.deliver.dicom_scu import (
    MAX_CONTEXTS,
    DicomSender,
    InstanceResult,
    classify_status,
    plan_contexts,
    study_outcome,
)
from gateway.errors import Permanent, Transient
from tests.dicomgen import (
    SeriesSpec,
    dataset_bytes,
    dcmtk_env,
    free_port,
    make_study,
    storescp_args,
    wait_for_port,
)

SMALL = (
    SeriesSpec("CT", 3, 32, 32, ExplicitVRLittleEndian),
    SeriesSpec("MR", 2, 32, 32, RLELossless),
)


def uid_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def sender_for(port: int, ae_title: str = "STORESCP", **kwargs: Any) -> DicomSender:
    dest = DicomDestination(ae_title=ae_title, host="127.0.0.1", port=port)
    return DicomSender(dest, calling_ae="AI_GATEWAY", uid_hash=uid_hash, **kwargs)


def items(paths: list[Path]) -> list[tuple[str, Path]]:
    return [(p.name, p) for p in paths]


class StoreSCP:
    """dcmtk storescp as a subprocess, its log kept to count associations."""

    def __init__(self, folder: Path, args: list[str]) -> None:
        self.folder = folder
        self.out = folder / "received"
        self.out.mkdir(parents=True)
        self.port = free_port()
        self.log = folder / "storescp.log"
        base = storescp_args(self.out, port=self.port)  # ends with the port
        cmd = [base[0], "-v", *args, *[a for a in base[1:] if a != "+xa"]]
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=dcmtk_env()
        )
        wait_for_port(self.port)

    def associations(self) -> int:
        return self.log.read_text(errors="replace").count("Association Acknowledged")

    def received(self) -> dict[str, Any]:
        return {str(ds.SOPInstanceUID): ds for ds in map(dcmread, self.out.iterdir())}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log_file.close()


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def start(*args: str) -> StoreSCP:
        scp = StoreSCP(tmp_path / f"scp{len(started)}", list(args))
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.close()


def assert_same_instances(sent: list[Path], received: dict[str, Any]) -> None:
    assert len(received) == len(sent)
    for path in sent:
        original = dcmread(path)
        got = received[str(original.SOPInstanceUID)]
        assert got.SOPClassUID == original.SOPClassUID
        assert np.array_equal(got.pixel_array, original.pixel_array), path.name


def test_study_in_five_transfer_syntaxes_arrives_identical_over_one_association(
    tmp_path: Path, storescp_factory: Callable[..., StoreSCP]
) -> None:
    paths = make_study(tmp_path / "study")
    scp = storescp_factory("+xa")
    results = sender_for(scp.port).send_study(items(paths))
    assert [r.key for r in results] == [p.name for p in paths]
    assert all(r.delivered and r.status == 0 for r in results), results
    assert all("sent as" not in r.message for r in results)  # no conversion was needed
    assert study_outcome(results) is Outcome.DELIVERED
    assert scp.associations() == 1
    received = scp.received()
    assert_same_instances(paths, received)
    for path in paths:  # each instance kept its own transfer syntax
        own = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert received[uid].file_meta.TransferSyntaxUID == own


def test_peer_without_rle_gets_decompressed_instances(
    tmp_path: Path, storescp_factory: Callable[..., StoreSCP]
) -> None:
    paths = make_study(tmp_path / "study", series=SMALL)
    scp = storescp_factory()  # default: uncompressed transfer syntaxes only
    results = sender_for(scp.port).send_study(items(paths))
    assert all(r.delivered for r in results), results
    rle = [r for r in results if r.key.startswith("s02")]
    assert rle and all("sent as Explicit VR Little Endian" in r.message for r in rle)
    received = scp.received()
    assert_same_instances(paths, received)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in received.values()} == {
        ExplicitVRLittleEndian
    }
    assert scp.associations() == 1


def test_implicit_only_peer_gets_every_syntax_converted_big_endian_included(
    tmp_path: Path, storescp_factory: Callable[..., StoreSCP]
) -> None:
    paths = make_study(tmp_path / "study")
    scp = storescp_factory("+xi")
    results = sender_for(scp.port).send_study(items(paths))
    assert all(r.delivered for r in results), results
    received = scp.received()
    assert_same_instances(paths, received)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in received.values()} == {
        ImplicitVRLittleEndian
    }


def test_loader_functions_and_bytes_are_sources_too(
    tmp_path: Path, storescp_factory: Callable[..., StoreSCP]
) -> None:
    paths = make_study(tmp_path / "study", series=SMALL)
    scp = storescp_factory("+xa")
    calls: list[str] = []

    def loader(path: Path) -> Callable[[], bytes]:
        def load() -> bytes:
            calls.append(path.name)
            return path.read_bytes()

        return load

    sources: list[tuple[str, Any]] = [(paths[0].name, paths[0].read_bytes())]
    sources += [(p.name, loader(p)) for p in paths[1:]]
    results = sender_for(scp.port).send_study(sources)
    assert all(r.delivered for r in results)
    assert sorted(calls) == sorted([p.name for p in paths[1:]] * 2)  # header, then send
    assert_same_instances(paths, scp.received())


def test_accepted_syntaxes_go_out_byte_identical_without_a_plaintext_file(
    tmp_path: Path, storescp_factory: Callable[..., StoreSCP], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instances whose own transfer syntax the peer accepted (all five here, deflated and
    big endian included) are sent as they are encoded: the data set bytes the peer received
    (storescp +B writes them exactly as read) are the source's, pydicom never decodes them,
    and the decrypted bytes never land in a file (temp dir and working directory stay
    empty; the anonymous memory files are closed)."""
    paths = make_study(tmp_path / "study")
    scp = storescp_factory("+xa", "+B")
    watched_tmp, watched_cwd = tmp_path / "tmpdir", tmp_path / "cwd"
    watched_tmp.mkdir()
    watched_cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(watched_tmp))
    monkeypatch.chdir(watched_cwd)
    assert tempfile.gettempdir() == str(watched_tmp)

    def no_decode(*args: Any) -> Any:
        raise AssertionError("an instance in an accepted syntax was decoded")

    monkeypatch.setattr(dicom_scu, "_load", no_decode)
    seen: list[str] = []

    def files_now() -> list[str]:
        return [str(p) for d in (watched_tmp, watched_cwd) for p in d.rglob("*")]

    def loader(path: Path) -> Callable[[], bytes]:
        def load() -> bytes:
            seen.extend(files_now())  # what the previous instance's send left behind
            return path.read_bytes()

        return load

    fds_before = set(os.listdir("/proc/self/fd"))
    results = sender_for(scp.port).send_study([(p.name, loader(p)) for p in paths])
    assert all(r.delivered and "sent as" not in r.message for r in results), results
    assert seen == [] and files_now() == []
    assert set(os.listdir("/proc/self/fd")) <= fds_before  # every memory file was closed
    received = {
        str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f.read_bytes()
        for f in scp.out.iterdir()
    }
    assert len(received) == len(paths)
    for path in paths:
        data = path.read_bytes()
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(received[uid]) == dataset_bytes(data), path.name


def test_odd_length_deflated_data_set_goes_out_with_its_pad_byte(
    storescp_factory: Callable[..., StoreSCP],
) -> None:
    """pydicom's image_dfl.dcm: a deflated data set of odd length, without the trailing NUL
    that PS3.5 A.5 pads a deflated stream with.  Sent as it is, it is an odd P-DATA
    fragment and storescp aborts the association ("Odd Fragment Length"): never delivered.
    It goes out with the NUL added, from a file (copied to a memory file) or from bytes,
    as encoded otherwise, and the file is left as it was."""
    source = Path(str(get_testdata_file("image_dfl.dcm", download=False)))
    original = source.read_bytes()
    body = dataset_bytes(original)
    assert len(body) % 2 == 1
    for name, instance in (("file", source), ("bytes", original)):
        scp = storescp_factory("+xa", "+B")
        results = sender_for(scp.port).send_study([(name, instance)])
        assert [(r.delivered, r.status) for r in results] == [(True, 0)], results
        assert "sent as" not in results[0].message
        (received,) = scp.out.iterdir()
        assert dataset_bytes(received.read_bytes()) == body + b"\x00", name
    assert source.read_bytes() == original


def test_unreadable_instance_is_refused_and_the_others_are_delivered(
    tmp_path: Path, storescp_factory: Callable[..., StoreSCP]
) -> None:
    paths = make_study(tmp_path / "study", series=SMALL[:1])
    scp = storescp_factory("+xa")
    sources: list[tuple[str, Any]] = [(p.name, p) for p in paths]
    sources.insert(1, ("junk", b"not dicom at all"))
    results = sender_for(scp.port).send_study(sources)
    assert [r.outcome for r in results] == [
        Outcome.DELIVERED,
        Outcome.PERMANENT,
        Outcome.DELIVERED,
        Outcome.DELIVERED,
    ]
    assert "not a readable DICOM" in results[1].message
    assert study_outcome(results) is Outcome.PERMANENT


def test_peer_aborting_mid_study_is_a_retry_for_the_unconfirmed_instances(
    tmp_path: Path, storescp_factory: Callable[..., StoreSCP]
) -> None:
    paths = make_study(tmp_path / "study", series=SMALL[:1])
    scp = storescp_factory("--abort-after")
    results = sender_for(scp.port).send_study(items(paths))
    assert [r.outcome for r in results] == [Outcome.TRANSIENT] * len(paths)
    assert "no C-STORE response" in results[0].message
    assert all("not sent" in r.message for r in results[1:])


def test_logs_carry_hashed_uids_only(ct_series: list[Path]) -> None:
    scp = PySCP(lambda n: {1: 0xB007, 2: 0xC210, 3: 0xA700}.get(n, 0))
    try:
        with capture_logs() as logs:
            results = sender_for(scp.port, ae_title="PYSCP").send_study(items(ct_series))
    finally:
        scp.close()
    assert len(logs) == len(ct_series)
    text = repr(logs) + repr([(r.message, r.status_text) for r in results])
    for path in ct_series:
        ds = dcmread(path, stop_before_pixels=True)
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert str(uid) not in text
        assert uid_hash(str(ds.SOPInstanceUID)) in text
    assert str(ds.PatientName) not in text


def test_peer_down_is_a_retry() -> None:
    port = free_port()
    with pytest.raises(DeliveryRetry, match=f"STORESCP@127.0.0.1:{port}") as caught:
        sender_for(port, connect_timeout=2).send_study([("x", _tiny())])
    assert isinstance(caught.value, Transient)


# --- a pynetdicom SCP for statuses and rejections -------------------------------------


class PySCP:
    """A pynetdicom storage SCP whose C-STORE answer is chosen per call by *status_for*
    (called with the 1-based request number)."""

    def __init__(
        self,
        status_for: Callable[[int], int] = lambda n: 0x0000,
        *,
        require_called_aet: bool = False,
        ssl_context: Any = None,
    ) -> None:
        self.stored: list[str] = []
        self.associations = 0
        self._lock = threading.Lock()
        self._status_for = status_for
        ae = AE(ae_title="PYSCP")
        ae.require_called_aet = require_called_aet
        for cx in StoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.port = free_port()
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._est)],
        )
        assert server is not None
        self.server = server

    def _est(self, event: Any) -> None:
        with self._lock:
            self.associations += 1

    def _store(self, event: Any) -> int:
        with self._lock:
            n = len(self.stored) + 1
            status = self._status_for(n)
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return status

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def ct_series(tmp_path: Path) -> list[Path]:
    return make_study(tmp_path / "ct", series=[SeriesSpec("CT", 5, 32, 32)])


def test_a700_for_one_instance_stops_there_earlier_ones_delivered(
    ct_series: list[Path],
) -> None:
    scp = PySCP(lambda n: 0xA700 if n == 3 else 0x0000)
    try:
        results = sender_for(scp.port, ae_title="PYSCP").send_study(items(ct_series))
    finally:
        scp.close()
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 2 + [Outcome.TRANSIENT] * 3
    assert results[2].status == 0xA700 and "0xA700" in results[2].message
    assert results[3].status is None and "not sent" in results[3].message
    assert len(scp.stored) == 3  # nothing after the transient failure was sent
    assert study_outcome(results) is Outcome.TRANSIENT


def test_retry_with_the_remaining_instances_completes_the_study(ct_series: list[Path]) -> None:
    scp = PySCP(lambda n: 0xA700 if n == 2 else 0x0000)
    sender = sender_for(scp.port, ae_title="PYSCP")
    try:
        first = sender.send_study(items(ct_series))
        missing = [(r.key, p) for r, p in zip(first, ct_series, strict=True) if not r.delivered]
        second = sender.send_study(missing)
    finally:
        scp.close()
    assert all(r.delivered for r in second)
    delivered = {r.sop_instance_uid for r in first + second if r.delivered}
    assert delivered == {str(dcmread(p).SOPInstanceUID) for p in ct_series}
    assert scp.associations == 2


def test_b007_is_delivered_with_a_warning(ct_series: list[Path]) -> None:
    scp = PySCP(lambda n: 0xB007 if n == 1 else 0x0000)
    try:
        results = sender_for(scp.port, ae_title="PYSCP").send_study(items(ct_series))
    finally:
        scp.close()
    assert all(r.delivered for r in results)
    assert results[0].status == 0xB007 and "warning" in results[0].message
    assert results[0].status_text == "0xB007"


def test_c_range_failure_is_permanent_for_that_instance_only(ct_series: list[Path]) -> None:
    scp = PySCP(lambda n: 0xC210 if n == 2 else 0x0000)
    try:
        results = sender_for(scp.port, ae_title="PYSCP").send_study(items(ct_series))
    finally:
        scp.close()
    assert [r.outcome for r in results] == [
        Outcome.DELIVERED,
        Outcome.PERMANENT,
        *[Outcome.DELIVERED] * 3,
    ]
    assert study_outcome(results) is Outcome.PERMANENT


def test_wrong_called_ae_title_is_refused_for_good(ct_series: list[Path]) -> None:
    scp = PySCP(require_called_aet=True)
    try:
        with pytest.raises(DeliveryRefused, match="rejected the association") as caught:
            sender_for(scp.port, ae_title="NOT_THE_PACS").send_study(items(ct_series))
    finally:
        scp.close()
    assert isinstance(caught.value, Permanent)
    assert "Called AE title not recognised" in str(caught.value)
    assert scp.stored == []


def test_tls_delivery(tmp_path: Path, ct_series: list[Path]) -> None:
    certs = pytest.importorskip("tests.certs")
    pki = certs.make_pki(tmp_path / "pki")
    scp = PySCP(ssl_context=pki.server_context())
    try:
        sender = sender_for(scp.port, ae_title="PYSCP", ssl_context=pki.client_context())
        results = sender.send_study(items(ct_series))
        untrusted = certs.make_pki(tmp_path / "other").client_context()
        with pytest.raises(DeliveryRetry, match="TLS"):
            sender_for(scp.port, ae_title="PYSCP", ssl_context=untrusted).send_study(
                items(ct_series[:1])
            )
    finally:
        scp.close()
    assert all(r.delivered for r in results)
    assert len(scp.stored) == len(ct_series)


# --- pure pieces ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, Outcome.DELIVERED),
        (0xB000, Outcome.DELIVERED),
        (0xB006, Outcome.DELIVERED),
        (0xB007, Outcome.DELIVERED),
        (0x0001, Outcome.DELIVERED),
        (0xA700, Outcome.TRANSIENT),
        (0xA7FF, Outcome.TRANSIENT),
        (0xFE00, Outcome.TRANSIENT),
        (0x0210, Outcome.TRANSIENT),
        (0xA900, Outcome.PERMANENT),
        (0xC000, Outcome.PERMANENT),
        (0xC211, Outcome.PERMANENT),
        (0x0122, Outcome.PERMANENT),
        (0x0124, Outcome.PERMANENT),
    ],
)
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_contexts_one_per_own_syntax_plus_an_uncompressed_fallback() -> None:
    contexts = plan_contexts({"1.2.3": [RLELossless, ExplicitVRBigEndian]})
    assert [list(c.transfer_syntax) for c in contexts] == [
        [RLELossless],
        [ExplicitVRBigEndian],
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    ]


def test_contexts_are_merged_when_128_would_be_exceeded() -> None:
    needs = {f"1.2.{i}": [RLELossless, ExplicitVRLittleEndian] for i in range(60)}
    contexts = plan_contexts(needs)
    assert len(contexts) <= MAX_CONTEXTS
    assert {c.abstract_syntax for c in contexts} == set(needs)
    # the first SOP classes keep their own contexts, the last share one
    assert len([c for c in contexts if c.abstract_syntax == "1.2.0"]) == 3
    last = [c for c in contexts if c.abstract_syntax == "1.2.59"]
    assert len(last) == 1
    assert list(last[0].transfer_syntax) == [
        RLELossless,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ]


def test_more_than_128_sop_classes_cannot_share_one_association() -> None:
    with pytest.raises(ValueError, match="129 SOP classes"):
        plan_contexts({f"1.2.{i}": [ExplicitVRLittleEndian] for i in range(129)})


def test_instance_result_flags() -> None:
    r = InstanceResult("k", "1.2", Outcome.TRANSIENT, None, "x")
    assert r.transient and not r.delivered and not r.permanent
    assert r.status_text == "no status"


def _tiny() -> bytes:
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
