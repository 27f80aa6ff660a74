"""Fault drills (issue 15): what the gateway promises when its disk fills up in the middle
of a study, when its queue database is locked by someone else, and when a destination
resets the connection, answers slowly or refuses for ever.

Each drill runs the whole gateway as a subprocess (tests/gatewayproc.py) against peers
this module starts on 127.0.0.1 (pynetdicom SCUs and SCPs), and checks the promise from
outside: the DICOM status and HL7 ACK a sender gets, what is in the queue and the spool
afterwards, what a destination received, and ``gateway queue dead --json``.

Related drills elsewhere: kill -9 and a full disk for one instance and one message
(test_durability.py), PostgreSQL stopped under a running gateway (test_postgres_nodes.py),
a destination down then up and an EHR refusing (test_delivery.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import sqlite3
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from gateway.store.store import Store
from tests.dicomgen import SeriesSpec, free_port, make_study
from tests.gatewayproc import GatewayProcess, wait_until, write_config
from tests.hl7msgs import oru_r01, send_mllp
from tests.integration.test_durability import fill, tiny_filesystem

SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700

# --- peers ---------------------------------------------------------------------------


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Sender:
    """One association to the gateway as the PACS (pynetdicom), instance by instance, so a
    test can change the world between two C-STOREs of the same association."""

    def __init__(self, port: int, files: list[Path], timeout: float = 60.0) -> None:
        self.ae = AE(ae_title="PACS")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout
        meta = dcmread(files[0], stop_before_pixels=True).file_meta  # one class and syntax
        self.ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        self.assoc = self.ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
        assert self.assoc.is_established

    def store(self, path: Path) -> int | None:
        """The C-STORE status, or None when no response came."""
        rsp = self.assoc.send_c_store(dcmread(path))
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def echo(port: int) -> int | None:
    """A C-ECHO on its own association: the status, or None."""
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        assoc.release()


def ok(event: Any) -> int:
    return SUCCESS


def out_of_resources(event: Any) -> int:
    return OUT_OF_RESOURCES


def reset(event: Any) -> int:
    """Drop the association with a TCP reset in the middle of the C-STORE: the request was
    received, no response goes back (SO_LINGER 0, then close: RST, not FIN)."""
    sock = event.assoc.dul.socket.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return OUT_OF_RESOURCES  # never reaches the gateway (and is not counted as stored)


def slow(seconds: float) -> Callable[[Any], int]:
    def answer(event: Any) -> int:
        time.sleep(seconds)
        return SUCCESS

    return answer


class Destination:
    """A pynetdicom storage SCP on 127.0.0.1 whose C-STORE answer *answer* gives.

    ``requests``: the SOP Instance UID of every C-STORE request that reached it (a resend
    shows twice); ``stored``: those it answered 0x0000 to (and whose answer was sent)."""

    def __init__(self, ae_title: str, answer: Callable[[Any], int]) -> None:
        self.ae_title = ae_title
        self.requests: list[str] = []
        self.stored: list[str] = []
        self.associations = 0
        self._lock = threading.Lock()
        self._answer = answer
        ae = AE(ae_title=ae_title)
        for cx in StoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 120
        self.port = free_port()
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._est)],
        )
        assert server is not None
        self.server = server

    def _est(self, event: Any) -> None:
        with self._lock:
            self.associations += 1

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.requests.append(uid)
        status = self._answer(event)
        if status == SUCCESS and event.assoc.is_established:
            with self._lock:
                self.stored.append(uid)
        return status

    def config(self, retry: dict[str, float]) -> dict[str, Any]:
        return {
            "dicom": {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port},
            "retry": retry,
        }

    def close(self) -> None:
        self.server.shutdown()


@contextlib.contextmanager
def destinations(*peers: tuple[str, Callable[[Any], int]]) -> Iterator[list[Destination]]:
    started: list[Destination] = []
    try:
        for ae_title, answer in peers:
            started.append(Destination(ae_title, answer))
        yield started
    finally:
        for peer in started:
            peer.close()


def forward_config(
    folder: Path, peers: list[Destination], retry: dict[str, float], **extra: Any
) -> Path:
    """Every CT study forwarded to each of *peers* (destination names: their AE titles in
    lower case), with *retry* as their retry policy."""
    return write_config(
        folder,
        destinations={p.ae_title.lower(): p.config(retry) for p in peers},
        routes=[
            {
                "name": "ct",
                "when": {"dicom": {"Modality": "CT"}},
                "forward": [p.ae_title.lower() for p in peers],
            }
        ],
        **extra,
    )


def dead_letters(gw: GatewayProcess) -> list[dict[str, Any]]:
    r = gw.cli("queue", "dead", "--json")
    assert r.returncode == 0, r.stderr
    dead: list[dict[str, Any]] = json.loads(r.stdout)
    return dead


def log_events(gw: GatewayProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in gw.log_events() if e.get("event") == event]


# --- disk full in the middle of a study ---------------------------------------------


def unnamed_spool_files(data_dir: Path) -> list[Path]:
    """Non-empty spool files that no queue row names (a partial or orphaned object), read
    from the queue file without writing (the disk may be full)."""
    db = sqlite3.connect(f"{(data_dir / 'queue.sqlite3').as_uri()}?mode=ro", uri=True)
    try:
        named = {
            r[0] for r in db.execute("SELECT spool_key FROM envelopes WHERE spool_key IS NOT NULL")
        }
    finally:
        db.close()
    return [
        p
        for p in (data_dir / "spool").glob("*/*/*.blob")
        if p.stat().st_size > 0 and p.name.removesuffix(".blob") not in named
    ]


def stored_count(data_dir: Path) -> int:
    db = sqlite3.connect(f"{(data_dir / 'queue.sqlite3').as_uri()}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0])
    finally:
        db.close()


@pytest.mark.slow
def test_disk_full_mid_study_refuses_what_it_cannot_store_and_recovers_on_the_same_association(
    tmp_path: Path,
) -> None:
    """One association carries a study of small instances (kept sealed in their queue row:
    on a full disk SQLite's own write fails) and large ones (spool files).  The disk fills
    up after the first instances and frees up again before the last ones.  Promise: each
    instance is acknowledged 0x0000 and stored, or refused 0xA700 and not stored; no
    partial object is left; the gateway keeps answering (C-ECHO, /healthz, HL7 AE) and
    needs nobody to recover; the study, once complete, is routed and delivered once."""
    small = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=6, rows=64, cols=64)])
    large = make_study(
        tmp_path / "l",
        series=[SeriesSpec("CT", count=6, rows=256, cols=256)],
        study_uid=str(dcmread(small[0], stop_before_pixels=True).StudyInstanceUID),
    )
    # small, large, small, large... in one study, one SOP class, one transfer syntax
    files = [f for pair in zip(small, large, strict=True) for f in pair]
    assert max(f.stat().st_size for f in small) < 64 * 1024 < min(f.stat().st_size for f in large)
    with tiny_filesystem(tmp_path / "small", 24) as disk, destinations(("PACS1", ok)) as [pacs]:
        cfg = forward_config(
            tmp_path,
            [pacs],
            {"initial": 0.2, "max": 1, "give_up_after": 60},
            gateway={
                "data_dir": str(disk / "var"),
                "encryption_key_file": str(tmp_path / "keys.json"),
                "min_free_mb": 0,  # no floor: the writes themselves fail (the floor: below)
            },
            # the study must not complete while the disk is full: it is routed once
            dicom={"study_complete_after": 6},
        )
        gw = GatewayProcess(cfg, tmp_path / "gateway.log").start()
        statuses: dict[Path, list[int | None]] = {f: [] for f in files}
        try:
            sender = Sender(gw.dicom_port, files)
            for f in files[:4]:  # two small, two large, with space
                statuses[f].append(sender.store(f))
            assert all(s == [SUCCESS] for s in statuses.values() if s), statuses

            filler = fill(disk)
            for f in files[4:8]:  # two small, two large, on a full disk
                statuses[f].append(sender.store(f))
            full = [statuses[f][0] for f in files[4:8]]
            acked = [f for f in files if SUCCESS in statuses[f]]
            # never a false success: what was acknowledged is stored, the rest is not
            assert full == [OUT_OF_RESOURCES] * 4, full  # small ones: SQLite's own write
            assert stored_count(gw.data_dir) == len(acked)
            assert unnamed_spool_files(gw.data_dir) == []
            # still serving: a C-ECHO, /healthz, an HL7 message refused truthfully
            assert echo(gw.dicom_port) == SUCCESS
            assert gw.get("/healthz")[0] == 200
            ack = send_mllp(gw.hl7_port, [oru_r01(control_id="DISKFULL1")])[0]
            assert b"MSA|AE|DISKFULL1" in ack
            assert [p["restarts"] for p in gw.processes()] == [0] * len(gw.processes())

            filler.unlink()  # space returns: no restart, no operator action
            for f in files:  # the refused ones again, then the rest
                if SUCCESS not in statuses[f]:
                    statuses[f].append(sender.store(f))
            sender.release()
            assert all(s[-1] == SUCCESS for s in statuses.values()), statuses
            wait_until("the study at the destination", lambda: len(pacs.stored) >= len(files))
            time.sleep(2)  # room for a second routing or a resend to show
            status = gw.queue_status()
        finally:
            gw.stop()
        assert sorted(pacs.requests) == sorted(uid_of(f) for f in files)  # each once
        assert status["jobs:route"] == {"done": 1} and status["jobs:deliver"] == {"done": 1}
        assert len(log_events(gw, "route.matched")) == 1
        reasons = Counter(e["reason"] for e in log_events(gw, "dicom.instance.not_stored"))
        assert reasons == {
            "queue database cannot be written: database or disk is full": 2,  # small
            "spool cannot write: No space left on device": 2,  # large
        }, reasons

        # afterwards: every instance stored whole, nothing else in the spool
        assert unnamed_spool_files(gw.data_dir) == []
        db = sqlite3.connect(gw.data_dir / "queue.sqlite3")
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
        store = Store(gw.data_dir, gw.key_file, create=False)
        try:
            assert len(store.queue.envelopes()) == len(files)
            for f in files:
                envelope_id = store.find_instance(uid_of(f))
                assert envelope_id is not None, f.name
                kept = dcmread(io.BytesIO(store.read(envelope_id)[1]))
                assert kept.PixelData == dcmread(f).PixelData, f.name
        finally:
            store.close()


def fill_to(path: Path, free: int) -> Path:
    """Fill the filesystem under *path* until about *free* bytes are left; the filler."""
    filler = path / "floor-filler.bin"
    st = os.statvfs(path)
    left = st.f_bavail * st.f_frsize - free
    with filler.open("wb") as f:
        while left > 0:
            n = min(left, 1 << 20)
            f.write(b"\0" * n)
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return filler


@pytest.mark.slow
def test_below_the_free_space_floor_new_data_waits_while_accepted_work_is_delivered(
    tmp_path: Path,
) -> None:
    """gateway.min_free_mb: below it, the gateway stops taking new data before the disk is
    full, so the work it has accepted still has room.  A study received with space is
    forwarded while the volume is below the floor; new instances get 0xA700 with the
    reason, an HL7 message AE; /readyz and the gauge say why; once space returns the same
    association's next instances are stored, with nobody's help."""
    first = make_study(tmp_path / "a", series=[SeriesSpec("CT", count=3, rows=64, cols=64)])
    second = make_study(tmp_path / "b", series=[SeriesSpec("CT", count=3, rows=64, cols=64)])
    with tiny_filesystem(tmp_path / "small", 64) as disk, destinations(("PACS1", ok)) as [pacs]:
        cfg = forward_config(
            tmp_path,
            [pacs],
            {"initial": 0.2, "max": 1, "give_up_after": 60},
            gateway={
                "data_dir": str(disk / "var"),
                "encryption_key_file": str(tmp_path / "keys.json"),
                "min_free_mb": 16,
            },
            dicom={"study_complete_after": 3},
        )
        gw = GatewayProcess(cfg, tmp_path / "gateway.log").start()
        try:
            sender = Sender(gw.dicom_port, first + second)
            assert [sender.store(f) for f in first] == [SUCCESS] * 3
            filler = fill_to(disk, 8 * 1024 * 1024)  # 8 MB left: below the floor
            time.sleep(1.2)  # the free space is read at most once a second
            assert [sender.store(f) for f in second] == [OUT_OF_RESOURCES] * 3
            ack = send_mllp(gw.hl7_port, [oru_r01(control_id="FLOOR0001")])[0]
            assert b"MSA|AE|FLOOR0001" in ack and b"disk space low" in ack, ack
            code, body = gw.get("/readyz")
            assert code == 503 and json.loads(body)["checks"]["disk_space"] is False, body
            low = json.loads(body)["details"]["disk_space"]["data"]
            assert low["min_free_mb"] == 16 and low["free_mb"] < 16, body
            free = re.search(
                rb'gateway_disk_free_bytes\{volume="data"\} (\S+)', gw.get("/metrics")[1]
            )
            assert free is not None and float(free.group(1)) < 16 * 1024 * 1024
            # what was accepted goes on: the first study completes and is forwarded
            wait_until("the first study at the destination", lambda: len(pacs.stored) >= 3)

            filler.unlink()  # space returns: the same association goes on
            time.sleep(1.2)
            assert [sender.store(f) for f in second] == [SUCCESS] * 3
            sender.release()
            wait_until("the second study at the destination", lambda: len(pacs.stored) >= 6)
            assert gw.get("/readyz")[0] == 200
        finally:
            gw.stop()
    assert sorted(pacs.requests) == sorted(uid_of(f) for f in first + second)  # each once
    reasons = {e["reason"] for e in log_events(gw, "dicom.instance.not_stored")}
    assert len(reasons) == 1 and re.fullmatch(r"disk space low: \d MB free on data", *reasons)
    # said once per process that reads it, per volume (here the spool is on the same one)
    low = log_events(gw, "storage.space_low")
    assert {e["volume"] for e in low} == {"data", "spool"}
    assert {e["min_free_mb"] for e in low} == {16}
    assert {e["volume"] for e in log_events(gw, "storage.space_ok")} == {"data", "spool"}


@pytest.mark.slow
def test_a_worker_killed_mid_study_resends_only_what_was_not_yet_recorded(
    tmp_path: Path,
) -> None:
    """A forward of 40 instances to a PACS answering each C-STORE after 0.15 s; the worker
    process is killed (SIGKILL) once 30 have arrived.  Promise: the study arrives whole,
    and the restarted worker resends only what was confirmed since the last progress
    record (every 100 instances or 2 s: about 13 here), not the 30 of the first
    association (at least once allows duplicates; fewer is better for the PACS)."""

    def slow(event: Any) -> int:
        time.sleep(0.15)
        return SUCCESS

    files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=40, rows=64, cols=64)])
    with destinations(("PACS1", slow)) as [pacs]:
        cfg = forward_config(
            tmp_path,
            [pacs],
            {"initial": 0.2, "max": 1, "give_up_after": 120},
            dicom={"study_complete_after": 1},
        )
        gw = GatewayProcess(cfg, tmp_path / "gateway.log").start()
        try:
            gw.send_study(files)
            wait_until("30 instances at the PACS", lambda: len(pacs.stored) >= 30, 60)
            (worker,) = [p for p in gw.processes() if p["role"] == "worker"]
            os.kill(int(worker["pid"]), signal.SIGKILL)
            wait_until(
                "the whole study at the PACS",
                lambda: set(pacs.stored) >= {uid_of(f) for f in files},
                90,
            )
            wait_until(
                "the delivery done",
                lambda: gw.queue_status()["jobs:deliver"] == {"done": 1},
                30,
            )
        finally:
            gw.stop()
    resent = len(pacs.requests) - len(files)
    print(f"resent after the kill: {resent} of the 30+ sent before it")
    assert 0 <= resent < 20, resent


# --- the queue database locked --------------------------------------------------------


@pytest.mark.slow
def test_a_locked_queue_database_is_refused_truthfully_and_ingest_resumes_when_released(
    tmp_path: Path,
) -> None:
    """Another process holds the SQLite queue's write lock (BEGIN EXCLUSIVE) for longer
    than the gateway's busy timeout (10 s).  Promise: a C-STORE gets 0xA700 and an HL7
    message AE (never 0x0000 / AA for what was not stored); the process stays up and keeps
    answering /healthz; once the lock is released the next sends are stored, with no
    restart."""
    gw = GatewayProcess(write_config(tmp_path), tmp_path / "gateway.log").start()
    files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=2, rows=64, cols=64)])
    answers: dict[str, tuple[Any, float]] = {}

    def dicom() -> None:
        started = time.monotonic()
        sender = Sender(gw.dicom_port, files, timeout=300)
        try:
            answers["dicom"] = sender.store(files[0]), time.monotonic() - started
        finally:
            sender.release()

    def hl7() -> None:
        started = time.monotonic()
        ack = send_mllp(gw.hl7_port, [oru_r01(control_id="LOCKED01")], timeout=300)[0]
        answers["hl7"] = ack, time.monotonic() - started

    holder = sqlite3.connect(gw.data_dir / "queue.sqlite3", timeout=30, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # the write lock, held by another process
        senders = [threading.Thread(target=dicom), threading.Thread(target=hl7)]
        for t in senders:
            t.start()
        while any(t.is_alive() for t in senders):
            assert gw.get("/healthz")[0] == 200
            time.sleep(1)
        assert gw.proc is not None and gw.proc.poll() is None
        assert [p["restarts"] for p in gw.processes()] == [0] * len(gw.processes())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    try:
        status, dicom_took = answers["dicom"]
        ack, hl7_took = answers["hl7"]
        print(f"locked: C-STORE answered in {dicom_took:.1f} s, HL7 in {hl7_took:.1f} s")
        assert status == OUT_OF_RESOURCES
        assert b"MSA|AE|LOCKED01" in ack and b"ERR|" in ack
        assert gw.queue_status().get("received", {}) == {}  # nothing stored meanwhile

        sender = Sender(gw.dicom_port, files)  # released: no restart, no operator action
        assert [sender.store(f) for f in files] == [SUCCESS, SUCCESS]
        sender.release()
        assert b"MSA|AA|LOCKED01" in send_mllp(gw.hl7_port, [oru_r01(control_id="LOCKED01")])[0]
        assert gw.queue_status()["received"] == {"dicom": 2, "hl7": 1}
    finally:
        gw.stop()
    events = [e.get("event") for e in gw.log_events()]
    assert "dicom.instance.not_stored" in events and "hl7.message.not_stored" in events


# --- destinations that fail -----------------------------------------------------------

#: short enough for a test: retried for 10 s, then a dead letter
SHORT_RETRY = {"initial": 0.3, "max": 1, "give_up_after": 10}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("answer", "error"),
    [
        # pynetdicom sees the reset either as the connection closing or, when its DUL
        # thread got there first, as an abort: both say what happened, neither a timeout
        pytest.param(
            reset,
            r"no C-STORE response: the (connection closed|association was aborted) after",
            id="reset-mid-c-store",
        ),
        pytest.param(out_of_resources, "status 0xA700", id="a700-for-ever"),
    ],
)
def test_a_failing_destination_is_retried_then_dead_lettered_and_blocks_no_other(
    tmp_path: Path, answer: Callable[[Any], int], error: str
) -> None:
    """A destination that accepts the association and then resets the connection in the
    middle of each C-STORE, or that answers 0xA700 to every one.  Promise: the delivery is
    retried with backoff; the other destination's lane delivers meanwhile, a study sent
    later too; once the retry time runs out the job is a dead letter with the last error."""
    with destinations(("BAD", answer), ("GOOD", ok)) as [bad, good]:
        cfg = forward_config(tmp_path, [bad, good], SHORT_RETRY, dicom={"study_complete_after": 1})
        gw = GatewayProcess(cfg, tmp_path / "gateway.log").start()
        try:
            first = make_study(tmp_path / "a", series=[SeriesSpec("CT", count=3, rows=64, cols=64)])
            gw.send_study(first)
            wait_until("the first study at the good destination", lambda: len(good.stored) == 3)
            wait_until("the bad destination to be tried again", lambda: bad.associations >= 2)
            second = make_study(
                tmp_path / "b", series=[SeriesSpec("CT", count=2, rows=64, cols=64)], seed=1
            )
            gw.send_study(second)
            wait_until(
                "the second study at the good destination",
                lambda: len(good.stored) == 5,
                timeout=15,
            )
            assert dead_letters(gw) == []  # still retrying the bad one meanwhile
            dead = wait_until(
                "two dead letters", lambda: len(d := dead_letters(gw)) == 2 and d, timeout=60
            )
            status = gw.queue_status()
        finally:
            gw.stop()
    assert sorted(good.requests) == sorted(uid_of(f) for f in first + second)  # each once
    assert bad.stored == []
    assert status["jobs:deliver"] == {"done": 2, "dead": 2}
    for letter in dead:
        assert letter["stage"] == "deliver" and letter["subject"].startswith("bad|")
        assert letter["attempts"] >= 3, letter
        assert letter["last_error"].startswith("gave up after"), letter
        assert re.search(error, letter["last_error"]), letter
    retries = [e for e in log_events(gw, "job.retry") if e.get("lane") == "bad"]
    assert len(retries) >= 4
    # with backoff: the waits grow (0.3 s doubling, capped at 1 s, with jitter)
    assert max(r["retry_in"] for r in retries) > min(r["retry_in"] for r in retries)
    print(
        f"bad destination: {bad.associations} associations, "
        f"{Counter(bad.requests).most_common(1)[0][1]} requests for one instance at most"
    )


@pytest.mark.slow
def test_a_destination_slower_than_the_lease_gets_each_instance_once(tmp_path: Path) -> None:
    """A destination that answers each C-STORE only after longer than the workers' lease
    (here 3 s against a 2 s lease: the default lease is 60 s, and a PACS answering after a
    minute is the same case).  The gateway waits for the answer (the DIMSE timeout is
    120 s), keeps the job's lease while it waits, and so records every confirmed instance:
    each is sent once, the job completes, and the other destination's lane delivers
    meanwhile."""
    with destinations(("SLOW", slow(3.0)), ("GOOD", ok)) as [late, good]:
        cfg = forward_config(
            tmp_path,
            [late, good],
            SHORT_RETRY | {"give_up_after": 120},
            dicom={"study_complete_after": 1},
            workers={"lease_seconds": 2},
        )
        gw = GatewayProcess(cfg, tmp_path / "gateway.log").start()
        try:
            files = make_study(tmp_path / "a", series=[SeriesSpec("CT", count=3, rows=64, cols=64)])
            gw.send_study(files)
            wait_until("the study at the good destination", lambda: len(good.stored) == 3)
            assert len(late.stored) < 3  # the slow lane is still at it: it blocked no other
            wait_until(
                "the study at the slow destination", lambda: len(set(late.stored)) >= 3, timeout=60
            )
            wait_until(
                "both deliveries done",
                lambda: gw.queue_status()["jobs:deliver"] == {"done": 2},
                timeout=30,
            )
            time.sleep(2)  # room for a resend to show
        finally:
            gw.stop()
    assert sorted(late.requests) == sorted(uid_of(f) for f in files)  # each once
    assert sorted(good.requests) == sorted(uid_of(f) for f in files)
    assert log_events(gw, "job.lease_lost") == []
    assert dead_letters(gw) == []
