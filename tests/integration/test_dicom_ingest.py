"""The DICOM edge from outside: dcmtk echoscu/storescu and a pynetdicom SCU against the
real gateway process on 127.0.0.1."""

from __future__ import annotations

import json
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, _config

from gateway.dicom.part10 import DEFLATED, INFLATED_MAX_BYTES, encode_file_meta
from gateway.store.store import Store
from tests.dicomgen import SeriesSpec, dataset_bytes, dcmtk_env, make_study, storescu_args
from tests.gatewayproc import GatewayProcess, write_config


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(write_config(tmp_path), tmp_path / "gateway.log").start()
    yield gw
    gw.stop()


def run_dcmtk(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=120)


def open_store(gw: GatewayProcess) -> Store:
    return Store(gw.data_dir, gw.key_file, create=False)


def test_echo_from_allowed_caller_succeeds(gateway: GatewayProcess) -> None:
    r = run_dcmtk(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "AI_GATEWAY", "127.0.0.1", str(gateway.dicom_port)]
    )
    assert r.returncode == 0, r.stderr


def test_unknown_calling_ae_is_rejected_with_reason(gateway: GatewayProcess) -> None:
    r = run_dcmtk(
        ["echoscu", "-aet", "INTRUDER", "-aec", "AI_GATEWAY", "127.0.0.1", str(gateway.dicom_port)]
    )
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stderr
    events = [e for e in gateway.log_events() if "rejected" in str(e.get("event"))]
    assert events and events[-1]["calling_ae"] == "INTRUDER"


def test_wrong_called_ae_is_rejected(gateway: GatewayProcess) -> None:
    r = run_dcmtk(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "SOMEONE_ELSE", "127.0.0.1", str(gateway.dicom_port)]
    )
    assert r.returncode != 0
    assert "Called AE Title Not Recognized" in r.stderr


def test_multi_series_study_in_five_transfer_syntaxes_is_stored_as_received(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study")
    syntaxes = {str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    assert len(syntaxes) >= 4  # explicit/implicit LE, deflated, RLE (compressed), ...
    r = run_dcmtk(storescu_args(files, port=gateway.dicom_port, aet="STORESCU"))
    assert r.returncode == 0, r.stderr

    store = open_store(gateway)
    try:
        for f in files:
            original = dcmread(f, stop_before_pixels=True)
            envelope_id = store.find_instance(str(original.SOPInstanceUID))
            assert envelope_id is not None, f"{f.name} not stored"
            env, data = store.read(envelope_id)
            assert dataset_bytes(data) == dataset_bytes(f.read_bytes()), f.name
            stored = dcmread(__import__("io").BytesIO(data), stop_before_pixels=True)
            assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
            assert env.source == "STORESCU@127.0.0.1"
        assert store.queue.counts()["received"]["dicom"] == len(files)
    finally:
        store.close()


def test_resent_instance_is_success_and_stored_once(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=2, rows=64, cols=64)])
    for _ in range(2):
        r = run_dcmtk(storescu_args(files, port=gateway.dicom_port, aet="STORESCU"))
        assert r.returncode == 0, r.stderr
    status = json.loads(gateway.cli("queue", "status", "--json").stdout)
    assert status["received"]["dicom"] == 2


def _send_raw(port: int, path: Path) -> int:
    """Send a file's data set bytes as they are (pynetdicom's chunked send does not decode)."""
    return _send_raw_each(port, [path])[0][0]


def _send_raw_each(port: int, paths: list[Path]) -> list[tuple[int, str]]:
    """Send files as they are over one association: (status, Error Comment) of each."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="PACS")
        for path in paths:
            meta = dcmread(path, stop_before_pixels=True).file_meta
            ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
        assert assoc.is_established
        try:
            answers = []
            for path in paths:
                rsp = assoc.send_c_store(path)
                answers.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
            return answers
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def test_malformed_data_set_gets_c210_and_nothing_is_stored(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    good = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=1, rows=64, cols=64)])[0]
    raw = good.read_bytes()
    body = dataset_bytes(raw)
    bad = tmp_path / "bad.dcm"
    # keep preamble + meta, then a data set whose first element claims more bytes than follow
    bad.write_bytes(raw[: len(raw) - len(body)] + b"\x08\x00\x05\x00CS\xff\x7f" + b"ISO")
    assert _send_raw(gateway.dicom_port, bad) == 0xC210
    status = json.loads(gateway.cli("queue", "status", "--json").stdout)
    assert status["received"].get("dicom", 0) == 0


@pytest.mark.parametrize("receive_to_disk", [False, True])
def test_a_ct_slice_cut_to_1000_bytes_is_refused_and_the_next_one_stored(
    tmp_path: Path, receive_to_disk: bool
) -> None:
    """A 512 x 512 CT slice whose Pixel Data element was cut to 1,000 bytes (its length
    says 1,000: well formed, but not the image it claims to be) gets 0xC213 with the reason
    in the Error Comment and the log, and nothing is stored; the next instance, on the same
    association, is stored."""
    gw = GatewayProcess(
        write_config(tmp_path, dicom={"receive_to_disk": receive_to_disk}),
        tmp_path / "gateway.log",
    ).start()
    try:
        cut, good = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=2)])
        raw = cut.read_bytes()
        at = raw.index(struct.pack("<HH2sH", 0x7FE0, 0x0010, b"OW", 0))
        header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 1000)
        cut.write_bytes(raw[:at] + header + raw[at + 12 : at + 12 + 1000])

        comment = "Pixel Data has 1000 of the 524288 bytes the image needs"
        assert _send_raw_each(gw.dicom_port, [cut]) == [(0xC213, comment)]
        status_json = json.loads(gw.cli("queue", "status", "--json").stdout)
        assert status_json["received"].get("dicom", 0) == 0
        refused = [e for e in gw.log_events() if e.get("event") == "dicom.instance.refused"]
        assert len(refused) == 1 and refused[0]["status"] == "C213"
        assert refused[0]["reason"] == comment
        assert refused[0]["detail"] == "Rows 512, Columns 512, 1 frame(s), 1 sample(s) of 16 bits"

        assert _send_raw_each(gw.dicom_port, [cut, good]) == [(0xC213, comment), (0x0000, "")]
        status_json = json.loads(gw.cli("queue", "status", "--json").stdout)
        assert status_json["received"]["dicom"] == 1
        store = open_store(gw)
        try:
            assert store.find_instance(str(dcmread(cut).SOPInstanceUID)) is None
            assert store.find_instance(str(dcmread(good).SOPInstanceUID)) is not None
        finally:
            store.close()
    finally:
        gw.stop()


def test_instance_without_study_uid_is_refused(gateway: GatewayProcess, tmp_path: Path) -> None:
    f = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=1, rows=64, cols=64)])[0]
    ds = dcmread(f)
    del ds.StudyInstanceUID
    ds.save_as(f)
    assert _send_raw(gateway.dicom_port, f) == 0xC211


# the quiet period: long enough for `gateway queue status` to start and answer before it
# ends, on a loaded machine (the CLI imports the whole gateway)
QUIET = 4


def test_study_completes_after_quiet_period_and_reopens_for_a_late_instance(
    tmp_path: Path,
) -> None:
    gw = GatewayProcess(
        write_config(tmp_path, dicom={"study_complete_after": QUIET}), tmp_path / "gateway.log"
    ).start()
    try:
        files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=3, rows=64, cols=64)])
        assert (
            run_dcmtk(storescu_args(files[:2], port=gw.dicom_port, aet="STORESCU")).returncode == 0
        )
        status = json.loads(gw.cli("queue", "status", "--json").stdout)
        assert status["studies"] == {"open": 1}
        time.sleep(QUIET + 1.5)
        status = json.loads(gw.cli("queue", "status", "--json").stdout)
        assert status["studies"] == {"complete": 1}
        # routed at once: no route matches in this config, so it is stored, not processed
        assert status["jobs:route"] in ({"ready": 1}, {"leased": 1}, {"done": 1})
        # a late instance reopens the study; once quiet again it is queued again, marked reopened
        assert (
            run_dcmtk(storescu_args(files[2:], port=gw.dicom_port, aet="STORESCU")).returncode == 0
        )
        time.sleep(QUIET + 1.5)
        store = open_store(gw)
        try:
            study_key = store.keys.index("study", str(dcmread(files[0]).StudyInstanceUID))
            info = store.queue.study(study_key)
            assert info is not None
            assert (info.state, info.instances, info.generation, info.reopened) == (
                "complete",
                3,
                2,
                True,
            )
        finally:
            store.close()
    finally:
        gw.stop()


def test_study_timer_survives_a_restart(tmp_path: Path) -> None:
    gw = GatewayProcess(
        write_config(tmp_path, dicom={"study_complete_after": 2}), tmp_path / "gateway.log"
    ).start()
    files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=2, rows=64, cols=64)])
    assert run_dcmtk(storescu_args(files, port=gw.dicom_port, aet="STORESCU")).returncode == 0
    gw.kill9()
    time.sleep(2.5)  # the quiet period passes while the gateway is down
    gw.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = json.loads(gw.cli("queue", "status", "--json").stdout)
            if status["studies"] == {"complete": 1}:
                break
            time.sleep(0.2)
        assert status["studies"] == {"complete": 1}
    finally:
        gw.stop()


def test_metrics_count_instances_and_associations(gateway: GatewayProcess, tmp_path: Path) -> None:
    files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=2, rows=64, cols=64)])
    assert run_dcmtk(storescu_args(files, port=gateway.dicom_port, aet="STORESCU")).returncode == 0
    code, body = gateway.get("/metrics")
    text = body.decode()
    assert code == 200
    assert 'gateway_dicom_instances_received_total{outcome="stored"} 2.0' in text
    assert 'gateway_dicom_associations_total{outcome="accepted"} 1.0' in text
    assert "gateway_queue_jobs" in text
    assert gateway.get("/healthz")[0] == 200


def test_a_caller_allowed_by_host_name_is_accepted(tmp_path: Path) -> None:
    """Host names in allowed_callers are resolved at start (as for HL7 senders)."""
    import socket

    callers = [{"ae_title": "NAMED", "hosts": [socket.gethostname()]}]  # in /etc/hosts
    gw = GatewayProcess(
        write_config(tmp_path, dicom={"allowed_callers": callers}), tmp_path / "gateway.log"
    ).start()
    try:
        r = run_dcmtk(
            ["echoscu", "-aet", "NAMED", "-aec", "AI_GATEWAY", "127.0.0.1", str(gw.dicom_port)]
        )
        assert r.returncode == 0, r.stderr
    finally:
        gw.stop()


def _deflate_bomb(good: Path, out: Path, padding: int) -> Path:
    """*good*'s data set followed by Data Set Trailing Padding (FFFC,FFFC) of *padding*
    zero bytes, deflated (Deflated Explicit VR Little Endian): about a thousandth of
    *padding* on the wire."""
    raw = good.read_bytes()
    body = dataset_bytes(raw)
    ds = dcmread(good, stop_before_pixels=True)
    meta = encode_file_meta(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), DEFLATED[0], "1.2.3.4", "BOMB"
    )
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(body + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, padding))]
    chunk = bytes(16 * 1024 * 1024)
    for _ in range(padding // len(chunk)):
        parts.append(deflater.compress(chunk))
    parts.append(deflater.flush())
    stream = b"".join(parts)
    out.write_bytes(bytes(128) + b"DICM" + meta + stream + b"\x00" * (len(stream) % 2))
    return out


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_deflate_bomb_is_refused_without_inflating_it_and_the_next_instance_stored(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    """A deflated data set of about 1 MB that inflates to 1 GiB (a "deflate bomb") gets
    0xC210 with the reason; the receiving process never holds the gigabyte (its peak RSS
    stays far below it), keeps serving, and the next instance on the association is
    stored."""
    ct = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=2, rows=64, cols=64)])
    bomb = _deflate_bomb(ct[0], tmp_path / "bomb.dcm", padding=1024 * 1024 * 1024)
    assert bomb.stat().st_size < 2 * 1024 * 1024
    comment = f"deflated data set inflates past {INFLATED_MAX_BYTES} bytes"
    assert _send_raw_each(gateway.dicom_port, [bomb, ct[1]]) == [
        (0xC210, comment),
        (0x0000, ""),
    ]
    status = json.loads(gateway.cli("queue", "status", "--json").stdout)
    assert status["received"]["dicom"] == 1
    refused = [e for e in gateway.log_events() if e.get("event") == "dicom.instance.refused"]
    assert [e["reason"] for e in refused] == [comment]
    pids = [p["pid"] for p in gateway.processes() if p["role"] == "ingest"]
    assert pids
    for pid in pids:  # two inflations of at most 256 MiB each, one after the other
        assert _peak_rss_bytes(pid) < 700 * 1024 * 1024
