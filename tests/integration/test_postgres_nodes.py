"""Gateways on PostgreSQL, as a larger site runs them: real processes, one throwaway
PostgreSQL server (tests/pg.py), loopback only.

- one gateway on PostgreSQL carries the whole flow (ingest, assembly, routing, delivery);
- two nodes (two ``gateway run`` processes with their own config, ports and local data
  dir) share one database, one spool directory and one key file: studies and messages
  sent to either node are delivered exactly once (the receivers deduplicate nothing:
  storescp with unique file names, an MLLP sink that keeps every message);
- ``gateway db status|migrate`` on a PostgreSQL config;
- PostgreSQL stopped and started again under a running gateway;
- an ingest-only node and a worker-only node (distributed inference).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pynetdicom import AE

from gateway.store.postgres import MIGRATIONS, SCHEMA_VERSION
from tests import pg
from tests.dicomgen import SeriesSpec, dcmtk_env, free_port, make_study, storescp_args
from tests.gatewayproc import REPO, GatewayProcess, wait_until, write_config
from tests.hl7msgs import oru_r01, send_mllp
from tests.mllpsink import MLLPSink

FAST_RETRY = {"initial": 0.2, "max": 1, "give_up_after": 60}


@pytest.fixture
def sink() -> Iterator[MLLPSink]:
    with MLLPSink() as s:
        yield s


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp with unique file names: a resent instance would show as a second file."""
    port, received = free_port(), tmp_path / "pacs"
    received.mkdir()
    proc = subprocess.Popen(
        [*storescp_args(received, port=port), "+uf"],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port, received
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def node_config(
    folder: Path, dsn: str, shared: Path, pacs_port: int, sink: MLLPSink, **extra: Any
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(
        folder,
        gateway={
            "database": dsn,
            "spool_dir": str(shared / "spool"),
            "encryption_key_file": str(shared / "keys.json"),
        },
        dicom={"study_complete_after": 1},
        destinations={
            "pacs": {
                "dicom": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port},
                "retry": FAST_RETRY,
            },
            "ehr": {"hl7": {"host": "127.0.0.1", "port": sink.port}, "retry": FAST_RETRY},
        },
        **{
            "routes": [
                {"name": "ct", "when": {"dicom": {"Modality": "CT"}}, "forward": ["pacs"]},
                {"name": "reports", "when": {"hl7": {"MSH-9": "ORU^R01"}}, "forward": ["ehr"]},
            ],
            **extra,
        },
    )


def ct_study(folder: Path, count: int, seed: int) -> list[Path]:
    spec = SeriesSpec("CT", count=count, rows=64, cols=64)
    return make_study(folder, series=[spec], accession=f"ACC{seed}", seed=seed)


def all_done(gw: GatewayProcess) -> bool:
    status = gw.queue_status()
    jobs = {k: v for k, v in status.items() if k.startswith("jobs:")}
    return bool(jobs) and all(set(states) == {"done"} for states in jobs.values())


def test_one_gateway_on_postgresql_carries_the_whole_flow(
    tmp_path: Path,
    pg_dsn: Callable[[], str],
    pacs: tuple[int, Path],
    sink: MLLPSink,
) -> None:
    pacs_port, received = pacs
    config = node_config(tmp_path / "node", pg_dsn(), tmp_path / "shared", pacs_port, sink)
    gw = GatewayProcess(config, tmp_path / "node.log").start()
    try:
        files = ct_study(tmp_path / "study", 4, seed=1)
        gw.send_study(files)
        message = oru_r01(control_id="PGONE0001")
        assert b"MSA|AA|PGONE0001" in send_mllp(gw.hl7_port, [message])[0]
        wait_until("the study at the PACS", lambda: len(list(received.iterdir())) >= 4, 60)
        assert sink.wait_for(1, timeout=30) == [message]
        wait_until("every job done", lambda: all_done(gw), 30)
        status = gw.queue_status()
        assert status["received"] == {"dicom": 4, "hl7": 1}
        assert not (gw.data_dir / "queue.sqlite3").exists()  # nothing went to SQLite
    finally:
        assert gw.stop() == 0


def test_two_nodes_on_one_database_deliver_what_either_received_exactly_once(
    tmp_path: Path,
    pg_dsn: Callable[[], str],
    pacs: tuple[int, Path],
    sink: MLLPSink,
) -> None:
    pacs_port, received = pacs
    dsn, shared = pg_dsn(), tmp_path / "shared"
    a = GatewayProcess(
        node_config(tmp_path / "a", dsn, shared, pacs_port, sink), tmp_path / "a.log"
    ).start()  # the first node makes the key file the second one shares
    b = GatewayProcess(
        node_config(tmp_path / "b", dsn, shared, pacs_port, sink), tmp_path / "b.log"
    ).start()
    try:
        studies = [ct_study(tmp_path / f"s{i}", 3, seed=10 + i) for i in range(4)]
        for i, files in enumerate(studies):
            (a if i % 2 == 0 else b).send_study(files)
        messages = [oru_r01(control_id=f"NODE{i:04d}") for i in range(6)]
        for i, message in enumerate(messages):
            gw = a if i % 2 == 0 else b
            assert f"MSA|AA|NODE{i:04d}".encode() in send_mllp(gw.hl7_port, [message])[0]

        sent = sum(len(files) for files in studies)
        wait_until("every instance at the PACS", lambda: len(list(received.iterdir())) >= sent)
        assert sorted(sink.wait_for(len(messages), timeout=30)) == sorted(messages)
        wait_until("every job done", lambda: all_done(a), 30)
        time.sleep(2)  # a duplicate would still be on its way
        assert len(list(received.iterdir())) == sent
        assert len(sink.received) == len(messages)
        assert a.queue_status() == b.queue_status()  # one queue, seen from either node
        assert a.queue_status()["received"] == {"dicom": sent, "hl7": len(messages)}
        done_by = {
            node: [e for e in gw.log_events() if e.get("event") == "job.done"]
            for node, gw in (("a", a), ("b", b))
        }
        # four studies routed + forwarded, six messages routed + forwarded: each job once
        assert sum(len(events) for events in done_by.values()) == 2 * (len(studies) + 6)
    finally:
        assert a.stop() == 0
        assert b.stop() == 0


def test_db_status_and_migrate_on_postgresql(
    tmp_path: Path, pg_dsn: Callable[[], str], sink: MLLPSink
) -> None:
    dsn = pg_dsn()
    config = node_config(tmp_path / "n", dsn, tmp_path / "shared", free_port(), sink)
    gw = GatewayProcess(config, tmp_path / "n.log")  # not started: the CLI only
    r = gw.cli("db", "status", "--json")
    assert r.returncode == 1, r.stderr
    status = json.loads(r.stdout)
    assert status["engine"] == "postgresql" and status["schema"] is None
    assert status["database"].startswith("127.0.0.1:") and "postgres@" not in status["database"]
    r = gw.cli("db", "migrate")
    every = ", ".join(str(m.version) for m in MIGRATIONS)
    assert r.returncode == 0 and r.stdout.startswith(f"applied {every}: postgresql"), r.stderr
    assert f"is at schema {SCHEMA_VERSION}" in r.stdout
    r = gw.cli("db", "status")
    assert r.returncode == 0 and "pending         none: up to date" in r.stdout


def c_store(port: int, path: Path) -> int:
    """One C-STORE on its own association; the status the gateway answered."""
    ae = AE(ae_title="PACS")
    meta = dcmread(path, stop_before_pixels=True).file_meta
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(dcmread(path)).Status)
    finally:
        assoc.release()


def test_a_database_outage_is_refused_truthfully_and_ingest_recovers_by_itself(
    tmp_path: Path, sink: MLLPSink
) -> None:
    """PostgreSQL stopped: the C-STORE gets 0xA700 (out of resources) and the HL7 message
    AE, never a false success, and the gateway stays up; started again, the next ones are
    stored with no restart, and everything acknowledged is there."""
    server = pg.start_private()
    try:
        config = node_config(
            tmp_path / "n", server.dsn(), tmp_path / "shared", free_port(), sink, routes=[]
        )
        gw = GatewayProcess(config, tmp_path / "n.log").start()
        files = ct_study(tmp_path / "study", 3, seed=5)
        assert c_store(gw.dicom_port, files[0]) == 0x0000
        assert b"MSA|AA|OUT0001" in send_mllp(gw.hl7_port, [oru_r01(control_id="OUT0001")])[0]

        server.halt()
        assert c_store(gw.dicom_port, files[1]) == 0xA700
        reply = send_mllp(gw.hl7_port, [oru_r01(control_id="OUT0002")])[0]
        assert b"MSA|AE|OUT0002" in reply
        assert gw.proc is not None and gw.proc.poll() is None  # still up

        server.resume()
        wait_until("a C-STORE stored again", lambda: c_store(gw.dicom_port, files[1]) == 0, 30)
        assert b"MSA|AA|OUT0002" in send_mllp(gw.hl7_port, [oru_r01(control_id="OUT0002")])[0]
        assert c_store(gw.dicom_port, files[2]) == 0x0000
        assert gw.queue_status()["received"] == {"dicom": 3, "hl7": 2}
        assert gw.stop() == 0
    finally:
        server.remove()


def test_an_ingest_node_and_a_worker_node_carry_the_flow_with_a_model_between_them(
    tmp_path: Path, pg_dsn: Callable[[], str], sink: MLLPSink
) -> None:
    """Distributed inference: node A only listens and stores (``--role ingest``), node B,
    with its own data dir, only works (``--role worker``): it routes what A stored, runs the
    note model on it and sends the result ORU^R01 to the EHR."""
    dsn, shared = pg_dsn(), tmp_path / "shared"
    model = {"report-findings": {"bundle": str(REPO / "models" / "report_findings")}}
    routes = [
        {
            "name": "reports",
            "when": {"hl7": {"MSH-9": "ORU^R01"}},
            "run": ["report-findings"],
            "send": ["ehr"],
        }
    ]
    a_config = node_config(
        tmp_path / "a", dsn, shared, free_port(), sink, routes=routes, models=model
    )
    b_config = node_config(
        tmp_path / "b", dsn, shared, free_port(), sink, routes=routes, models=model
    )
    a = GatewayProcess(a_config, tmp_path / "a.log", args=("--role", "ingest")).start()
    b = GatewayProcess(b_config, tmp_path / "b.log", args=("--role", "worker")).start(timeout=90)
    try:
        message = oru_r01(control_id="DIST0001")
        assert b"MSA|AA|DIST0001" in send_mllp(a.hl7_port, [message])[0]
        (result,) = sink.wait_for(1, timeout=90)
        msh = result.split(b"\r", 1)[0].split(b"|")
        assert msh[8].startswith(b"ORU^R01") and msh[9].startswith(b"AI"), msh
        assert any(e.get("event") == "infer.done" for e in b.log_events())
        assert not any(e.get("event") == "infer.done" for e in a.log_events())
        assert not any(e.get("event") == "hl7.message.stored" for e in b.log_events())
    finally:
        assert a.stop() == 0
        assert b.stop() == 0


def test_a_node_killed_mid_delivery_loses_nothing_the_other_finishes_after_the_lease(
    tmp_path: Path, pg_dsn: Callable[[], str], sink: MLLPSink
) -> None:
    """Node A takes the delivery and waits on an EHR that does not answer; A is killed
    (kill -9 of its supervisor: its children go with it). Its lease is no longer renewed;
    when it expires node B takes the job over and delivers: the acknowledged message is
    not lost (the EHR sees it twice, with the same MSH-10: at least once, recognisable)."""
    dsn, shared = pg_dsn(), tmp_path / "shared"
    workers = {"lease_seconds": 4}
    reports = [{"name": "reports", "when": {"hl7": {"MSH-9": "ORU^R01"}}, "forward": ["ehr"]}]
    a_config = node_config(
        tmp_path / "a", dsn, shared, free_port(), sink, routes=reports, workers=workers
    )
    b_config = node_config(
        tmp_path / "b", dsn, shared, free_port(), sink, routes=reports, workers=workers
    )
    cfg = yaml.safe_load(a_config.read_text())
    cfg["destinations"]["ehr"]["hl7"]["ack_timeout"] = 60  # A waits long on the silent EHR
    a_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    a = GatewayProcess(a_config, tmp_path / "a.log", args=("--role", "all")).start()
    b = GatewayProcess(b_config, tmp_path / "b.log", args=("--role", "ingest")).start()
    try:
        sink.reply = "NONE"  # the EHR takes the message and never answers
        message = oru_r01(control_id="KILL0001")
        assert b"MSA|AA|KILL0001" in send_mllp(b.hl7_port, [message])[0]
        sink.wait_for(1, timeout=30)  # node A's worker has it in hand, waiting
        sink.reply = "AA"  # the EHR answers again (A's connection stays unanswered)
        # a worker on node B (a second `gateway run` there), started while A is alive:
        # it cannot tell that A will die, so only the lease can hand the job over
        b_cfg = yaml.safe_load(b_config.read_text())
        b_cfg["gateway"]["http"]["port"] = free_port()
        b_worker_config = tmp_path / "b" / "worker.yaml"
        b_worker_config.write_text(yaml.safe_dump(b_cfg, sort_keys=False))
        b_worker = GatewayProcess(
            b_worker_config, tmp_path / "b-worker.log", args=("--role", "worker")
        ).start()
        try:
            a.kill9()
            killed = time.monotonic()
            wait_until("node A's processes gone", lambda: not a_children_alive(a), 10)
            received = sink.wait_for(2, timeout=30)
            assert received == [message, message]
            assert time.monotonic() - killed < 20  # the 4 s lease, not a restart
            wait_until("the delivery done", lambda: all_done(b), 30)
            assert b.queue_status()["jobs:deliver"] == {"done": 1}
            assert any(e.get("event") == "queue.leases_expired" for e in b_worker.log_events())
        finally:
            assert b_worker.stop() == 0
    finally:
        assert b.stop() == 0


def a_children_alive(gw: GatewayProcess) -> bool:
    """Whether any process of *gw*'s log is still running (its children by pid)."""
    pids = {e.get("child_pid") for e in gw.log_events() if e.get("event") == "process.spawned"}
    alive = False
    for pid in pids:
        if isinstance(pid, int):
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                pass
    return alive
