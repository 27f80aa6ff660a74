"""The audit trail on a real file: the hash chain across reopen, every kind of tampering
found at the right record, torn writes, concurrency, PHI kept out, and syslog forwarding
over real TLS to a local server."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import Permanent
from gateway.security.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    Auditor,
    SyslogForwarder,
    canonical_json,
    octet_frame,
    record_hash,
    records,
    rfc5424_message,
    verify,
)
from gateway.security.audit import auditor as auditor_module
from gateway.security.certs import DevPKI, make_dev_pki

STUDY = "1.2.826.0.1.3680043.8.498.1"
PACS = {"ae_title": "PACS", "host": "127.0.0.1"}


def clock() -> dt.datetime:
    return dt.datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


def fill(path: Path, n: int, **kwargs: Any) -> list[dict[str, Any]]:
    with AuditLog.open(path, clock=clock, **kwargs) as trail:
        return [
            trail.record(
                "instances-received",
                actor=PACS,
                destination={"ae_title": "AI_GATEWAY", "port": 11112},
                objects=[
                    {"type": "study", "id": f"{STUDY}.{i}"},
                    {"type": "sop-instance", "count": i},
                ],
                detail=f"association {i}",
            )
            for i in range(1, n + 1)
        ]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --- records and the chain -------------------------------------------------------------


def test_a_record_has_the_documented_fields_and_is_what_the_file_holds(path: Path) -> None:
    rec = fill(path, 1)[0]
    assert rec == {
        "seq": 1,
        "time": "2025-03-01T12:00:00.123Z",
        "event": "instances-received",
        "outcome": "success",
        "actor": {"ae_title": "PACS", "host": "127.0.0.1"},
        "destination": {"ae_title": "AI_GATEWAY", "port": 11112},
        "objects": [{"type": "study", "id": f"{STUDY}.1"}, {"type": "sop-instance", "count": 1}],
        "detail": "association 1",
        "prev": GENESIS,
        "hash": rec["hash"],
    }
    assert rec["hash"] == record_hash(rec)
    assert path.read_text(encoding="utf-8") == canonical_json(rec) + "\n"


def test_seq_and_prev_continue_across_reopen(path: Path) -> None:
    first = fill(path, 3)
    with AuditLog.open(path) as trail:
        assert trail.head == (3, first[-1]["hash"])
        rec = trail.record("application-activity", actor={"application": "ai-gateway"})
    assert (rec["seq"], rec["prev"]) == (4, first[-1]["hash"])
    fill(path, 2)
    report = verify(path)
    assert report.ok and report.records == 6 and report.first_bad is None
    assert [json.loads(x)["seq"] for x in lines(path)] == [1, 2, 3, 4, 5, 6]


def test_file_is_0600_and_its_new_directory_0700(path: Path) -> None:
    fill(path, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_an_empty_trail_verifies(path: Path) -> None:
    AuditLog.open(path).close()
    assert verify(path).ok and verify(path).records == 0


# --- tampering: the first bad record, with the reason ----------------------------------


def forge(base: bytes, **changes: Any) -> bytes:
    """A record rewritten with *changes* and a freshly computed hash, as a forger would."""
    rec = {**json.loads(base), **changes}
    rec["hash"] = record_hash(rec)
    return (canonical_json(rec) + "\n").encode()


def edit(ls: list[bytes]) -> list[bytes]:
    ls[6] = ls[6].replace(b"association 7", b"association 9")
    return ls


def delete(ls: list[bytes]) -> list[bytes]:
    del ls[6]
    return ls


def reorder(ls: list[bytes]) -> list[bytes]:
    ls[6], ls[7] = ls[7], ls[6]
    return ls


def insert_copy(ls: list[bytes]) -> list[bytes]:
    ls.insert(6, ls[2])  # a replayed earlier record
    return ls


def insert_naive(ls: list[bytes]) -> list[bytes]:
    ls.insert(6, ls[5].replace(b"association 6", b"association X"))
    return ls


def insert_rehashed(ls: list[bytes]) -> list[bytes]:
    ls.insert(6, forge(ls[5], seq=7, prev="f" * 64, detail="forged"))
    return ls


def cut_line(ls: list[bytes]) -> list[bytes]:
    ls[6] = ls[6][:40] + b"\n"
    return ls


def cut_file(ls: list[bytes]) -> list[bytes]:
    return [*ls[:6], ls[6][:40]]


def delete_first(ls: list[bytes]) -> list[bytes]:
    return ls[1:]


def blank_line(ls: list[bytes]) -> list[bytes]:
    ls.insert(6, b"\n")
    return ls


def reseq(ls: list[bytes]) -> list[bytes]:
    ls[6] = forge(ls[6], seq=70)
    return ls


@pytest.mark.parametrize(
    ("tamper", "bad", "reason"),
    [
        (edit, 7, "record 7: hash does not match its content (edited?)"),
        (delete, 7, "record 7: seq 8 follows 6 (a record is missing)"),
        (reorder, 7, "record 7: prev does not match record 6's hash (reordered or inserted?)"),
        (insert_copy, 7, "record 7: prev does not match record 6's hash (reordered or inserted?)"),
        (insert_naive, 7, "record 7: hash does not match its content (edited?)"),
        (
            insert_rehashed,
            7,
            "record 7: prev does not match record 6's hash (reordered or inserted?)",
        ),
        (cut_line, 7, "record 7: not valid JSON (truncated or edited?)"),
        (cut_file, 7, "record 7: the last line is incomplete (torn write after a crash?)"),
        (blank_line, 7, "record 7: not valid JSON (truncated or edited?)"),
        (reseq, 7, "record 7: seq 70 follows 6 (edited?)"),
        (delete_first, 1, "record 1: seq 2 begins the trail (records are missing)"),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_tampering_is_reported_at_the_first_bad_record(
    path: Path, tamper: Callable[[list[bytes]], list[bytes]], bad: int, reason: str
) -> None:
    fill(path, 10)
    assert verify(path).ok
    path.write_bytes(b"".join(tamper(lines(path))))
    report = verify(path)
    assert (report.ok, report.first_bad, report.reason) == (False, bad, reason)
    assert report.records == bad - 1


def test_a_forger_who_chains_one_line_correctly_is_caught_at_the_next(path: Path) -> None:
    fill(path, 10)
    ls = lines(path)
    prev = json.loads(ls[5])["hash"]
    ls.insert(6, forge(ls[6], detail="forged", prev=prev))
    path.write_bytes(b"".join(ls))
    report = verify(path)
    assert report.first_bad == 8
    assert report.reason == "record 8: prev does not match record 7's hash (reordered or inserted?)"


def test_cutting_off_the_end_shows_only_against_an_anchor(path: Path) -> None:
    """A hash chain alone cannot tell a shorter trail from a complete one; a head kept
    elsewhere (or the syslog copy) can."""
    fill(path, 10)
    with AuditLog.open(path) as trail:
        anchor = trail.head
    assert verify(path, anchor=anchor).ok
    path.write_bytes(b"".join(lines(path)[:8]))
    assert verify(path).ok
    report = verify(path, anchor=anchor)
    assert (report.ok, report.first_bad) == (False, 9)
    assert "the trail ends at seq 8 but seq 10 was anchored" in report.reason


def test_a_tail_rewritten_with_fresh_hashes_shows_against_an_anchor(path: Path) -> None:
    fill(path, 5)
    with AuditLog.open(path) as trail:
        anchor = trail.head
    ls = lines(path)
    ls[3] = forge(ls[3], detail="rewritten")
    ls[4] = forge(ls[4], prev=json.loads(ls[3])["hash"])
    path.write_bytes(b"".join(ls))
    assert verify(path).ok
    report = verify(path, anchor=anchor)
    assert report.reason == "record 5: hash differs from the anchor (the trail was rewritten)"


# --- crashes -----------------------------------------------------------------------------


def test_a_torn_last_line_is_reported_then_set_aside_and_recorded_on_open(path: Path) -> None:
    fill(path, 3)
    whole = path.read_bytes()
    torn = b'{"actor":{"ae_title":"PACS"},"deta'
    path.write_bytes(whole + torn)
    report = verify(path)
    assert (report.ok, report.records, report.first_bad) == (False, 3, 4)
    assert "incomplete" in report.reason

    with AuditLog.open(path) as trail:
        rec = trail.record("application-activity", actor={"application": "ai-gateway"})
    assert rec["seq"] == 5
    aside = path.with_name("audit.jsonl.torn-1")
    assert aside.read_bytes() == torn
    assert stat.S_IMODE(aside.stat().st_mode) == 0o600
    alert = json.loads(lines(path)[3])
    assert (alert["seq"], alert["event"], alert["outcome"]) == (
        4,
        "security-alert",
        "minor-failure",
    )
    assert "after record 3 moved to audit.jsonl.torn-1" in alert["detail"]
    assert path.read_bytes().startswith(whole)
    assert verify(path).ok and verify(path).records == 5


def test_a_torn_first_line_starts_the_trail_over(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b'{"seq":1,"ti')
    with AuditLog.open(path) as trail:
        assert trail.head[0] == 1  # the security alert
    assert verify(path).ok


def test_a_damaged_complete_last_line_refuses_to_continue_the_chain(path: Path) -> None:
    fill(path, 2)
    path.write_bytes(path.read_bytes() + b"garbage\n")
    with pytest.raises(AuditError, match="cannot be continued") as info:
        AuditLog.open(path)
    assert isinstance(info.value, Permanent)


# --- concurrency -------------------------------------------------------------------------


def test_threads_writing_at_once_keep_one_unbroken_chain(path: Path) -> None:
    with AuditLog.open(path) as trail:

        def write(worker: int) -> None:
            for i in range(200):
                trail.record(
                    "message-received", objects=[{"type": "message", "id": f"{worker}-{i}"}]
                )

        threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    report = verify(path)
    assert report.ok and report.records == 800
    assert [json.loads(x)["seq"] for x in lines(path)] == list(range(1, 801))


def test_two_writers_on_one_file_interleave_without_forking_the_chain(path: Path) -> None:
    """As `gateway run` and `gateway keys rotate` would: two open trails, one file."""
    a, b = AuditLog.open(path), AuditLog.open(path)
    try:
        for i in range(10):
            (a if i % 2 else b).record(
                "key-rotation", objects=[{"type": "data-key", "id": f"k{i}"}]
            )
    finally:
        a.close()
        b.close()
    assert verify(path).ok and verify(path).records == 10


def test_verify_reads_a_live_trail_up_to_a_whole_line(path: Path) -> None:
    """Verification while records are being written never sees a half-written line."""
    with AuditLog.open(path) as trail:
        done = threading.Event()

        def write() -> None:
            for i in range(150):
                trail.record("message-received", objects=[{"type": "message", "id": f"m{i}"}])
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        reports = []
        while not done.is_set():
            reports.append(verify(path))
        writer.join()
    assert reports and all(r.ok for r in reports)
    assert verify(path).records == 150


# --- what may go in ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objects": [{"type": "patient", "id": "12345678"}]}, "type 'patient' is not allowed"),
        ({"objects": [{"type": "study", "id": STUDY, "name": "DOE^JANE"}]}, "unknown keys"),
        ({"objects": [{"type": "accession", "id": "DOE^JANE"}]}, "looks like a person name"),
        ({"objects": [{"type": "study", "id": "Jane Doe"}]}, "not a DICOM UID"),
        ({"objects": [{"type": "study"}]}, "needs an 'id' or a 'count'"),
        ({"objects": [{"type": "sop-instance", "count": -1}]}, "count must be"),
        ({"actor": {"ae_title": "PACS", "patient_name": "DOE^JANE"}}, "unknown keys"),
        ({"actor": {"host": "a\nb"}}, "control characters"),
        ({"destination": {"port": "4242"}}, "port number"),
    ],
)
def test_phi_and_malformed_fields_are_refused_and_nothing_is_written(
    path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with AuditLog.open(path) as trail:
        with pytest.raises(ValueError, match=message):
            trail.record("instances-received", **kwargs)
        assert path.read_bytes() == b""
        assert trail.record("instances-received")["seq"] == 1


def test_unknown_event_and_outcome_are_refused(path: Path) -> None:
    with AuditLog.open(path) as trail:
        with pytest.raises(ValueError, match="unknown audit event"):
            trail.record("patient-viewed")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="unknown audit outcome"):
            trail.record("login", "failure")  # type: ignore[arg-type]


def test_detail_is_scrubbed_and_bounded(path: Path) -> None:
    with AuditLog.open(path) as trail:
        rec = trail.record("security-alert", "minor-failure", detail="PN DOE^JANE\nborn 19800101")
        long = trail.record("security-alert", detail="x" * 2000)
    assert rec["detail"] == "PN [redacted] born [redacted]"
    assert len(long["detail"]) == 500


def test_a_closed_trail_refuses_to_record(path: Path) -> None:
    trail = AuditLog.open(path)
    trail.close()
    with pytest.raises(AuditError, match="closed"):
        trail.record("login")


# --- syslog over TLS ---------------------------------------------------------------------


FRAME = re.compile(
    r"<(?P<pri>\d+)>1 (?P<time>\S+) (?P<host>\S+) ai-gateway (?P<procid>\d+) (?P<msgid>\S+) - "
    "\ufeff(?P<msg>.*)",
    re.S,
)


def test_rfc5424_message_and_octet_counting() -> None:
    rec = {"seq": 1, "time": "2025-03-01T12:00:00.123Z", "event": "login", "outcome": "success"}
    msg = rfc5424_message(rec, hostname="gw 1", procid="42")
    assert msg == (
        b"<110>1 2025-03-01T12:00:00.123Z gw1 ai-gateway 42 login - \xef\xbb\xbf"
        + canonical_json(rec).encode()
    )
    assert octet_frame(b"abc") == b"3 abc"
    alert = rfc5424_message({**rec, "event": "security-alert"}, hostname="h")
    assert alert.startswith(b"<108>1 ")  # log audit (13), warning (4)
    major = rfc5424_message({**rec, "outcome": "major-failure"}, hostname="h")
    assert major.startswith(b"<106>1 ")  # critical (2)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return make_dev_pki(tmp_path_factory.mktemp("syslog-pki"))


class SyslogServer:
    """A syslog-over-TLS receiver (RFC 5425) on 127.0.0.1 requiring a client certificate.
    The first *refuse* connections are closed before the handshake."""

    def __init__(self, pki: DevPKI, refuse: int = 0) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki.server.cert, pki.server.key)
        self.ctx.load_verify_locations(cafile=str(pki.ca_cert))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.refuse = refuse
        self.frames: list[bytes] = []
        self.peers: list[dict[str, Any]] = []
        self.got = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            if self.refuse:
                self.refuse -= 1
                conn.close()
                continue
            threading.Thread(target=self.read, args=(conn,), daemon=True).start()

    def read(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with self.ctx.wrap_socket(conn, server_side=True) as tls:
            self.peers.append(tls.getpeercert() or {})
            buf = b""
            while True:
                try:
                    chunk = tls.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b" " in buf:
                    length, rest = buf.split(b" ", 1)
                    if len(rest) < int(length):
                        break
                    with self.got:
                        self.frames.append(rest[: int(length)])
                        self.got.notify_all()
                    buf = rest[int(length) :]

    def wait_for(self, n: int, timeout: float = 5) -> list[bytes]:
        with self.got:
            self.got.wait_for(lambda: len(self.frames) >= n, timeout)
            return list(self.frames)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def server(pki: DevPKI) -> Iterator[SyslogServer]:
    srv = SyslogServer(pki)
    yield srv
    srv.close()


def client_ctx(pki: DevPKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(pki.client().cert, pki.client().key)
    return ctx


def forwarder(pki: DevPKI, port: int, **kwargs: Any) -> SyslogForwarder:
    return SyslogForwarder(
        "127.0.0.1",
        port,
        client_ctx(pki),
        server_hostname="localhost",
        backoff_initial=0.02,
        backoff_max=0.1,
        timeout=2,
        **kwargs,
    )


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def test_records_reach_the_syslog_server_as_rfc5424_over_mutual_tls(
    path: Path, pki: DevPKI, server: SyslogServer
) -> None:
    fwd = forwarder(pki, server.port)
    with AuditLog.open(path, forward=fwd) as trail:
        sent = [
            trail.record("association", actor=PACS),
            trail.record("security-alert", "minor-failure", actor={"host": "10.9.9.9"}),
            trail.record("message-received", objects=[{"type": "message", "id": "MSG0001"}]),
        ]
        assert fwd.flush(5)
    frames = server.wait_for(3)
    assert len(frames) == 3
    for raw, rec in zip(frames, sent, strict=True):
        m = FRAME.fullmatch(raw.decode("utf-8"))
        assert m is not None, raw
        assert m["msgid"] == rec["event"] and m["time"] == rec["time"]
        assert json.loads(m["msg"]) == rec  # the whole record, hash included
    assert [int(FRAME.fullmatch(f.decode())["pri"]) for f in frames] == [110, 108, 110]  # type: ignore[index]
    assert dict(x[0] for x in server.peers[0]["subject"])["commonName"] == "client"
    stats = fwd.stats()
    assert (stats.sent, stats.failures, stats.dropped, stats.queued) == (3, 0, 0, 0)


def test_a_down_syslog_server_neither_blocks_nor_loses_the_local_record(
    path: Path, pki: DevPKI
) -> None:
    fwd = forwarder(pki, closed_port())
    with AuditLog.open(path, forward=fwd) as trail:
        started = time.monotonic()
        trail.record("application-activity", actor={"application": "ai-gateway"})
        assert time.monotonic() - started < 0.5
        deadline = time.monotonic() + 5
        while fwd.stats().failures < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fwd.stats().failures >= 2  # retried with backoff
        assert fwd.stats().last_error is not None
    assert verify(path).ok and verify(path).records == 1
    stats = fwd.stats()
    assert (stats.sent, stats.dropped, stats.queued) == (0, 1, 0)  # counted, not silent


def test_the_forwarder_reconnects_and_delivers_after_a_failure(path: Path, pki: DevPKI) -> None:
    srv = SyslogServer(pki, refuse=1)
    try:
        fwd = forwarder(pki, srv.port)
        with AuditLog.open(path, forward=fwd) as trail:
            rec = trail.record("login", actor={"host": "127.0.0.1", "cert_subject": "CN=client"})
            assert fwd.flush(5)
        frames = srv.wait_for(1)
    finally:
        srv.close()
    assert json.loads(FRAME.fullmatch(frames[0].decode())["msg"]) == rec  # type: ignore[index]
    stats = fwd.stats()
    assert stats.sent == 1 and stats.failures >= 1 and stats.dropped == 0


def test_a_full_queue_drops_and_counts(path: Path, pki: DevPKI) -> None:
    fwd = forwarder(pki, closed_port(), queue_size=1)
    with AuditLog.open(path, forward=fwd) as trail:
        for _ in range(3):
            trail.record("login")
        assert fwd.stats().dropped >= 1
    assert fwd.stats().dropped == 3 and fwd.stats().sent == 0
    assert verify(path).records == 3


# --- repeated refusals ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def written(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path)]


def test_a_refusal_repeated_within_the_window_is_written_once_then_counted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    now = FakeClock()
    auditor = Auditor(AuditLog.open(path), repeat_window=60, clock=now)
    intruder = records.dicom_caller_refused("INTRUDER", "10.0.0.9", "AI_GATEWAY")
    for _ in range(5):
        auditor(intruder)
        now.now += 1
    auditor(records.dicom_caller_refused("INTRUDER", "10.0.0.8", "AI_GATEWAY"))  # another host
    auditor(records.association_accepted("PACS", "10.0.0.5", "AI_GATEWAY"))  # never folded
    auditor(records.association_accepted("PACS", "10.0.0.5", "AI_GATEWAY"))
    auditor.flush()  # nothing has ended yet
    assert [(r["event"], r["actor"]["host"]) for r in written(path)] == [
        ("security-alert", "10.0.0.9"),
        ("security-alert", "10.0.0.8"),
        ("association", "10.0.0.5"),
        ("association", "10.0.0.5"),
    ]
    now.now += 60
    auditor.flush()  # 10.0.0.9's window has ended: its count; 10.0.0.8 had no repeats
    count = written(path)[-1]
    assert count["actor"] == {"ae_title": "INTRUDER", "host": "10.0.0.9"}
    assert count["outcome"] == "minor-failure"
    assert {"type": "repeats", "count": 4} in count["objects"]
    assert count["detail"] == (
        "4 more like this within 65 s: DICOM association refused: calling AE title and host "
        "not allowed"
    )
    auditor(intruder)  # a new window: written at once
    assert len(written(path)) == 6
    auditor.close()
    assert verify(path).ok


def test_a_repeat_after_its_window_writes_the_count_first_then_itself(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    now = FakeClock()
    auditor = Auditor(AuditLog.open(path), repeat_window=60, clock=now)
    refused = records.tls_refused("MLLP", "10.0.0.9", "SSLError: NO_SHARED_CIPHER")
    for _ in range(3):
        auditor(refused)
    now.now += 61
    auditor(refused)  # before the flusher got to it
    details = [r["detail"] for r in written(path)]
    assert details == [
        "MLLP TLS handshake refused: SSLError: NO_SHARED_CIPHER",
        "2 more like this within 61 s: MLLP TLS handshake refused: SSLError: NO_SHARED_CIPHER",
        "MLLP TLS handshake refused: SSLError: NO_SHARED_CIPHER",
    ]
    auditor.close()  # no repeats pending: nothing more
    assert len(written(path)) == 3


def test_repeats_queue_nothing_for_later_and_close_writes_the_pending_counts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    auditor = Auditor(AuditLog.open(path), repeat_window=3600)
    refused = records.tls_refused("MLLP", "10.0.0.9", "SSLError: NO_SHARED_CIPHER")
    for _ in range(1000):
        auditor.later(refused)
    auditor.close()
    rows = written(path)
    assert len(rows) == 2
    assert {"type": "repeats", "count": 999} in rows[1]["objects"]


def test_a_window_of_zero_writes_every_refusal(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    auditor = Auditor(AuditLog.open(path), repeat_window=0)
    refused = records.dashboard_refused({"user": "?", "host": "10.0.0.9"}, "/api/queue", 401, "x")
    for _ in range(3):
        auditor(refused)
    auditor.close()
    assert len(written(path)) == 3


def test_past_max_held_peers_a_refusal_is_written_not_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auditor_module, "MAX_HELD", 2)
    path = tmp_path / "audit.jsonl"
    now = FakeClock()
    auditor = Auditor(AuditLog.open(path), repeat_window=60, clock=now)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.3"):
        auditor(records.tls_refused("DICOM", host, "SSLError: x"))
    assert len(written(path)) == 4  # the third host was not held: its repeat is written
    now.now += 60
    auditor(records.tls_refused("DICOM", "10.0.0.3", "SSLError: x"))  # ended windows make room
    auditor(records.tls_refused("DICOM", "10.0.0.3", "SSLError: x"))  # now it is held
    assert len(written(path)) == 5
    auditor.close()
    assert {"type": "repeats", "count": 1} in written(path)[-1]["objects"]
